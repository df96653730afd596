"""Stream steered generations to disk during ``trainer.predict`` and merge them into one JSONL file.

Layout under ``output_dir`` (default: the run folder)::

    parts/run.json          the fingerprint of the configuration that wrote the parts
    parts/rank{r}.jsonl     rank r's finished prompts, one line each: {"index": i, "rows": [row, ...]}
    predictions.jsonl       the merged result: one row per (prompt, variant), in prompt order
    .predictions.jsonl.complete.json   the fingerprint the merged file was made with

**Resuming.** Before the predict dataloader is built, the LightningModule calls :meth:`~SteeredPredictionWriter.start`
with a fingerprint of everything that makes the rows (checkpoint, settings, prompt file bytes); it returns the
indices of the prompts already on disk, and the module removes them from the prompt dataset
(:meth:`es_lightning.data.prompts.PromptDataset.without`), so ``predict_step`` never sees a finished prompt.
Parts written under another fingerprint are deleted first; a merged file of the same fingerprint means every
prompt is done. Each prompt's line is written with one ``write`` and flushed, so a crash leaves at most a
torn last line (no newline): it is cut off and that prompt is generated again. Every rank reads every part,
so all ranks filter the same prompts, and a run may resume with another number of processes.

**Merging.** When ``trainer.predict`` ends (``teardown``, so also when nothing was left to generate), rank 0
sorts the parts' lines by prompt index (holding one ``(index, part, offset)`` per prompt, never the outputs),
writes ``predictions.jsonl`` atomically, records its fingerprint and removes the parts. Ranks must share a
filesystem.

``predict_step`` returns a list of JSON-serialisable dict rows, each with an integer ``"index"`` (the prompt's
dataset row); all rows of a prompt come from one call, in the order they should appear. Call
``trainer.predict(..., return_predictions=False)``, or Lightning keeps every row in memory as well.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from es_lightning.io import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

PARTS_DIR = "parts"
RUN_FILE = "run.json"


class PartFileError(ValueError):
    """A part file has a damaged line before its end (not a torn tail left by a crash), so it cannot be trusted."""


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _scan(path: Path) -> tuple[list[tuple[int, int]], int]:
    """``([(prompt index, byte offset), ...], end of the last complete line)`` of one part file."""
    entries, offset = [], 0
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.endswith(b"\n"):
                break  # a torn tail: the crash came while this prompt's line was written
            try:
                index = json.loads(line)["index"]
                if isinstance(index, bool) or not isinstance(index, int) or index < 0:
                    raise ValueError(f"index {index!r}")
            except (ValueError, KeyError, TypeError) as err:
                raise PartFileError(
                    f"{path}:{number}: unreadable line ({err}). The part file is damaged; delete {path.parent} to "
                    f"generate the predictions from scratch."
                ) from err
            entries.append((index, offset))
            offset += len(line)
    return entries, offset


class SteeredPredictionWriter(BasePredictionWriter):
    """Write each finished prompt's rows to this rank's JSONL part; merge the parts when predicting ends.

    ``output_dir`` defaults (``None``) to ``trainer.default_root_dir``; ``filename`` is the merged file's name.
    See the module docstring for the layout and for how resuming works.
    """

    def __init__(self, output_dir: str | None = None, filename: str = "predictions.jsonl"):
        super().__init__(write_interval="batch")
        if not isinstance(filename, str) or not filename or Path(filename).name != filename or filename in (".", ".."):
            raise ValueError(f"filename must be a plain file name such as 'predictions.jsonl', got {filename!r}.")
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.filename = filename
        self.fingerprint = ""
        self.rank = 0
        self.complete = False  # a merged file of this fingerprint exists: nothing to write or merge
        self.rows_written = 0  # rows appended by this process in this predict run
        self._root: Path | None = None
        self._handle: BinaryIO | None = None

    @property
    def root(self) -> Path:
        if self._root is not None:
            return self._root
        if self.output_dir is None:
            raise RuntimeError("The prediction writer has no output directory yet: it is set when predict starts.")
        return self.output_dir

    @property
    def output_path(self) -> Path:
        """The merged predictions file."""
        return self.root / self.filename

    @property
    def parts_dir(self) -> Path:
        return self.root / PARTS_DIR

    @property
    def complete_marker(self) -> Path:
        return self.root / f".{self.filename}.complete.json"

    def start(self, trainer: L.Trainer, fingerprint: str = "") -> set[int] | None:
        """Prepare this predict run; return the prompt indices already on disk, or ``None`` if all are.

        Call it on every rank before the predict dataloader is built (the module's ``setup``).
        """
        self._close()
        self._root = Path(self.output_dir if self.output_dir is not None else trainer.default_root_dir)
        self.fingerprint, self.rank, self.rows_written = fingerprint, int(trainer.global_rank), 0
        self.complete = self._merged_fingerprint() == fingerprint and bool(fingerprint)
        if self.complete:
            return None
        if self.rank == 0:
            self._reconcile()
        trainer.strategy.barrier("prediction_writer_ready")  # no rank reads the parts before rank 0 has cleaned them
        done = {index for part in sorted(self.parts_dir.glob("rank*.jsonl")) for index, _ in _scan(part)[0]}
        self._handle = open(self.parts_dir / f"rank{self.rank}.jsonl", "ab")
        return done

    def _merged_fingerprint(self) -> str | None:
        if not self.output_path.exists() or any(self.parts_dir.glob("rank*.jsonl")):
            return None
        try:
            return json.loads(self.complete_marker.read_text(encoding="utf-8")).get("fingerprint")
        except (OSError, ValueError):
            return None

    def _reconcile(self) -> None:
        """Rank 0: delete parts of another configuration, cut torn tails, record the fingerprint."""
        parts = sorted(self.parts_dir.glob("rank*.jsonl"))
        try:
            recorded = json.loads((self.parts_dir / RUN_FILE).read_text(encoding="utf-8")).get("fingerprint")
        except (OSError, ValueError):
            recorded = None
        if parts and recorded != self.fingerprint:
            log.info(
                "Discarding %d partial prediction file(s) in %s made by another configuration.",
                len(parts),
                self.parts_dir,
            )
            for path in parts:
                path.unlink()
            parts = []
        for path in parts:
            end = _scan(path)[1]
            if path.stat().st_size > end:
                log.warning(
                    "%s: cutting off a torn last line left by an interrupted run; that prompt is generated again.", path
                )
                with open(path, "rb+") as handle:
                    handle.truncate(end)
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.parts_dir / RUN_FILE, {"fingerprint": self.fingerprint})

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._handle is None and not self.complete:  # a module that does not resume: start from what is on disk
            self.start(trainer, self.fingerprint)

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        """Append one line per prompt of this batch (its rows, in the order returned), then flush."""
        if dataloader_idx != 0:
            raise ValueError("SteeredPredictionWriter supports a single predict dataloader (indices would collide).")
        if self._handle is None:
            raise RuntimeError("The prediction writer is not open: it opens when predict starts (use trainer.predict).")
        if prediction is None:
            return
        if isinstance(prediction, dict) or not isinstance(prediction, (list, tuple)):
            raise TypeError(f"predict_step must return a list of dict rows, got {type(prediction).__name__}.")
        by_prompt: dict[int, list[dict]] = {}
        for row in prediction:
            if not isinstance(row, dict) or "index" not in row:
                raise ValueError(
                    f"Each prediction row must be a dict with an 'index' (the prompt's row), got {row!r:.200}."
                )
            index = row["index"].item() if isinstance(row["index"], torch.Tensor) else row["index"]
            if isinstance(index, bool) or not isinstance(index, int) or index < 0:
                raise ValueError(f"A prediction row's 'index' must be an int >= 0, got {index!r}.")
            by_prompt.setdefault(index, []).append({**row, "index": index})
        try:
            text = "".join(
                json.dumps({"index": index, "rows": rows}, ensure_ascii=False, allow_nan=False, default=_json_default)
                + "\n"
                for index, rows in by_prompt.items()
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"A prediction row is not JSON-serialisable: {err}") from err
        self._handle.write(text.encode("utf-8"))
        self._handle.flush()
        self.rows_written += len(prediction)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """After a successful ``trainer.predict``: rank 0 merges every rank's part into the output file."""
        self._close()
        if stage != "predict" or self.complete or self._root is None:
            return
        trainer.strategy.barrier("prediction_writer_merge")  # every rank's part is complete and closed
        if self.rank == 0:
            self.merge()
        trainer.strategy.barrier("prediction_writer_merged")

    def merge(self) -> int:
        """Write ``predictions.jsonl`` from the parts (prompt order, each prompt once); returns the row count."""
        parts = sorted(self.parts_dir.glob("rank*.jsonl"))
        entries = sorted((index, part, offset) for part, path in enumerate(parts) for index, offset in _scan(path)[0])
        handles = [open(path, "rb") for path in parts]
        rows = prompts = 0
        try:
            with atomic_path(self.output_path) as tmp, open(tmp, "w", encoding="utf-8") as out:
                last = None
                for index, part, offset in entries:
                    if index == last:
                        continue  # the same prompt twice (a padding sampler repeats indices)
                    last = index
                    handles[part].seek(offset)
                    for row in json.loads(handles[part].readline())["rows"]:
                        out.write(json.dumps(row, ensure_ascii=False) + "\n")
                        rows += 1
                    prompts += 1
        finally:
            for handle in handles:
                handle.close()
        atomic_write_json(self.complete_marker, {"fingerprint": self.fingerprint, "prompts": prompts, "rows": rows})
        for path in parts:
            path.unlink()
        (self.parts_dir / RUN_FILE).unlink(missing_ok=True)
        try:
            self.parts_dir.rmdir()
        except OSError:
            pass  # something else lives there; leave it
        self.complete = True
        log.info("Wrote %d rows for %d prompts to %s", rows, prompts, self.output_path)
        return rows

    def _close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._close()


def find_prediction_writer(trainer: L.Trainer) -> SteeredPredictionWriter | None:
    """The trainer's :class:`SteeredPredictionWriter` callback, if any."""
    callbacks = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's CallbackConnector, undeclared
    return next((callback for callback in callbacks if isinstance(callback, SteeredPredictionWriter)), None)
