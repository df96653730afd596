"""Stream steered generations to disk during ``trainer.predict``, resumably, and merge them into one JSONL file.

Layout under ``output_dir``::

    parts/run.json          what made the parts: {"format", "fingerprint", "world_size"}
    parts/rank{r}.jsonl     rank r's rows, appended batch by batch
    predictions.jsonl       the merged result (written at the end; the parts are then removed)

**Part files.** Each batch is appended as its rows (one JSON object per line, each with integer ``index`` and
``order``) followed by one commit line ``{"_commit": <number of rows>}``, then flushed. Only rows followed by
their commit line count; a crash mid-batch leaves an uncommitted tail (possibly a truncated last line) that
is detected, cut off when the run restarts and regenerated, never used. Within a file rows are in strictly
ascending ``(index, order)``.

**Resuming.** Restarting the same command continues: at ``on_predict_start`` each rank scans its part file
and records which prompt indices are complete (a bitmap: one bit per prompt, no rows in memory).
``predict_step`` asks :meth:`SteeredPredictionWriter.is_done` (or :meth:`~SteeredPredictionWriter.pending`)
and skips finished prompts; rows for finished prompts that still arrive are dropped, so nothing is
duplicated. If ``parts/run.json`` records another ``run_fingerprint`` (other model, bundles, settings or
prompts), the old parts are deleted with a warning and the run starts fresh. If only the number of processes
changed, the old part files are kept as read-only ``prev-*`` parts: their prompts count as done and their
rows are merged.

**Merging.** At the end of the predict epoch every rank closes its file, all ranks meet at a barrier, and rank
0 k-way merges (``heapq.merge``, streaming) all part files into ``predictions.jsonl`` in ``(index, order)``
order, dropping duplicate ``(index, order)`` keys, writes it atomically and removes the parts. Ranks must
share a filesystem.

**Contract for ``predict_step``** (see :meth:`SteeredPredictionWriter.write_on_batch_end`)::

    def predict_step(self, batch, batch_idx):
        writer = find_prediction_writer(self.trainer)
        todo = writer.pending(batch["index"]) if writer else list(range(len(batch["index"])))
        if not todo:
            return []                      # every prompt of this batch is already on disk
        ...generate for batch positions `todo` only...
        return [{"index": i, "id": ..., "prompt": ..., "output": ..., "method": ..., "coefficient": ...}, ...]

Return a list of JSON-serialisable dicts; each needs an integer ``"index"`` (the dataset row) and may carry an
integer ``"order"`` (the row's rank among its prompt's rows). Without ``"order"`` rows of one prompt are
numbered 0, 1, ... in the order returned, so all rows of a prompt must come from one ``predict_step`` call in
a deterministic order (e.g. by method, then coefficient). The prompt dataloader must not shuffle. Call
``trainer.predict(..., return_predictions=False)``, or Lightning keeps every returned row in memory.
"""

from __future__ import annotations

import heapq
import json
import logging
import numbers
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from es_lightning.io import atomic_path, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

PARTS_DIR = "parts"
RUN_FILE = "run.json"
PARTS_FORMAT = 1
COMMIT = "_commit"


class PartFileError(ValueError):
    """A part file is damaged before its last commit (not just a truncated tail), so it cannot be trusted."""


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _as_index(value: Any, what: str) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 0:
        raise ValueError(f"{what} must be an int >= 0, got {value!r}.")
    return int(value)


class _PartReader:
    """Reads one part file: committed batches in order, and where the committed part of the file ends."""

    def __init__(self, path: Path):
        self.path = path
        self.committed_end = 0  # byte offset just after the last commit line
        self.tail_lines = 0  # lines after the last commit (uncommitted rows, a truncated line)
        self.truncated = False  # the file ends inside a line

    def batches(self) -> Iterator[list[tuple[int, int, bytes]]]:
        """Yield each committed batch as ``[(index, order, line), ...]``; raise :class:`PartFileError` if damaged."""
        pending: list[tuple[int, int, bytes]] = []
        last_key: tuple[int, int] | None = None
        offset = 0
        bad: tuple[int, str] | None = None  # first unusable line after the last commit
        with open(self.path, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                offset += len(line)
                if not line.endswith(b"\n"):
                    self.truncated = True
                    bad = bad or (number, "truncated line (no newline)")
                    break
                try:
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise ValueError("not a JSON object")
                    if COMMIT in row and "index" not in row:
                        count = row[COMMIT]
                        if bad is not None:
                            raise PartFileError(
                                f"{self.path}:{bad[0]}: {bad[1]}, followed by a commit at line {number}. The part "
                                f"file is damaged; delete {self.path.parent} to regenerate from scratch."
                            )
                        if count != len(pending):
                            raise PartFileError(
                                f"{self.path}:{number}: commit of {count} rows but {len(pending)} rows precede it. "
                                f"The part file is damaged; delete {self.path.parent} to regenerate from scratch."
                            )
                        if pending:
                            yield pending
                        pending = []
                        self.committed_end, self.tail_lines = offset, 0
                        continue
                    key = (_as_index(row.get("index"), "index"), _as_index(row.get("order"), "order"))
                except PartFileError:
                    raise
                except (ValueError, TypeError) as err:
                    bad = bad or (number, f"unreadable line ({err})")
                    self.tail_lines += 1
                    continue
                if bad is None:
                    if last_key is not None and key <= last_key:
                        raise PartFileError(
                            f"{self.path}:{number}: row (index, order) {key} does not follow {last_key}; part files "
                            f"are in ascending order. Delete {self.path.parent} to regenerate from scratch."
                        )
                    last_key = key
                    pending.append((key[0], key[1], line))
                self.tail_lines += 1
        if self.truncated:
            self.tail_lines += 1

    def rows(self) -> Iterator[tuple[int, int, bytes]]:
        for batch in self.batches():
            yield from batch


class SteeredPredictionWriter(BasePredictionWriter):
    """Write predict rows as they arrive to per-rank JSONL parts; merge them into one file when predicting ends.

    ``output_dir`` defaults (``None``) to ``trainer.default_root_dir``. ``filename`` is the merged file's name.
    ``run_fingerprint`` identifies the configuration that produces the rows (model, bundles, coefficients,
    generation settings, prompts): parts written under another fingerprint are discarded, never mixed in.
    See the module docstring for the file layout and the contract with ``predict_step``.
    """

    def __init__(self, output_dir: str | None = None, filename: str = "predictions.jsonl", run_fingerprint: str = ""):
        super().__init__(write_interval="batch")
        if not isinstance(filename, str) or not filename or Path(filename).name != filename or filename in (".", ".."):
            raise ValueError(f"filename must be a plain file name such as 'predictions.jsonl', got {filename!r}.")
        if not isinstance(run_fingerprint, str):
            raise TypeError(f"run_fingerprint must be a string, got {type(run_fingerprint).__name__}.")
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.filename = filename
        self.run_fingerprint = run_fingerprint
        self.rank = 0
        self.world_size = 1
        self.rows_written = 0  # rows appended by this process in this predict run
        self.rows_merged = 0  # rows in the merged file (rank 0, after the merge)
        self._root: Path | None = None
        self._handle = None
        self._done = bytearray()  # bit i set: prompt index i is complete on disk
        self._last_key: tuple[int, int] | None = None
        self._complete: int | None = None

    # --- paths -------------------------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        if self._root is None:
            if self.output_dir is None:
                raise RuntimeError("The prediction writer has no output directory yet: it is set when predict starts.")
            return self.output_dir
        return self._root

    @property
    def output_path(self) -> Path:
        """The merged predictions file."""
        return self.root / self.filename

    @property
    def parts_dir(self) -> Path:
        return self.root / PARTS_DIR

    def part_path(self, rank: int | None = None) -> Path:
        """The part file of ``rank`` (default: this process's rank)."""
        return self.parts_dir / f"rank{self.rank if rank is None else rank}.jsonl"

    # --- what is done ------------------------------------------------------------------------------------

    def is_done(self, index: int) -> bool:
        """Whether every row of prompt ``index`` is already on disk (so ``predict_step`` may skip it)."""
        index = int(index)
        byte = index >> 3
        return 0 <= index and byte < len(self._done) and bool(self._done[byte] >> (index & 7) & 1)

    def pending(self, indices: Iterable[int] | torch.Tensor) -> list[int]:
        """Positions in ``indices`` (a batch's ``"index"`` list or tensor) whose prompts still need generating."""
        values = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
        return [position for position, index in enumerate(values) if not self.is_done(index)]

    def done_indices(self) -> set[int]:
        """All prompt indices this process knows to be complete (its own part and earlier ``prev-*`` parts)."""
        bits = enumerate(self._done)
        return {byte * 8 + bit for byte, value in bits if value for bit in range(8) if value >> bit & 1}

    def _mark(self, index: int) -> None:
        byte = index >> 3
        if byte >= len(self._done):
            self._done.extend(bytes(max(byte + 1 - len(self._done), len(self._done))))
        self._done[byte] |= 1 << (index & 7)

    # --- lifecycle ---------------------------------------------------------------------------------------

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()
        self._root = Path(self.output_dir if self.output_dir is not None else trainer.default_root_dir)
        self.rank, self.world_size = int(trainer.global_rank), int(trainer.world_size)
        self.rows_written = self.rows_merged = 0
        self._done, self._last_key = bytearray(), None
        self._complete = self._already_complete()
        if self._complete is not None:  # a finished run of the same configuration: nothing to generate again
            for index in range(self._complete + 1):
                self._mark(index)
            log.warning("Predictions already complete for this configuration: %s (delete it to regenerate).", self.output_path)
            return
        parts = self.parts_dir
        parts.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            expected = {"format": PARTS_FORMAT, "fingerprint": self.run_fingerprint, "world_size": self.world_size}
            self._reconcile(self._read_run_file(), expected)
        trainer.strategy.barrier("prediction_writer_ready")  # no rank reads its part before rank 0 has sorted them
        self._open_part()

    @property
    def complete_marker(self) -> Path:
        """Written beside the merged file: the fingerprint it was made with and its last prompt index."""
        return self.root / f".{self.filename}.complete.json"

    def _already_complete(self) -> int | None:
        """The last prompt index of a merged file made with this fingerprint (and no parts pending), else None."""
        if not self.run_fingerprint or not self.output_path.exists() or list(self.parts_dir.glob("*.jsonl")):
            return None
        try:
            marker = json.loads(self.complete_marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return marker.get("last_index") if marker.get("fingerprint") == self.run_fingerprint else None

    def _read_run_file(self) -> dict | None:
        try:
            return json.loads((self.parts_dir / RUN_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def _reconcile(self, recorded: dict | None, expected: dict) -> None:
        """Rank 0: drop parts of another configuration, set aside parts of another world size; write run.json."""
        parts = self.parts_dir
        existing = sorted(parts.glob("*.jsonl"))
        if existing and (recorded is None or recorded.get("format") != PARTS_FORMAT
                         or recorded.get("fingerprint") != expected["fingerprint"]):
            reason = (
                "there is no readable run.json saying which configuration made them" if recorded is None
                else f"they were made by another configuration (fingerprint {recorded.get('fingerprint')!r}, now "
                f"{expected['fingerprint']!r})"
            )
            warnings.warn(
                f"Discarding {len(existing)} partial prediction file(s) in {parts}: {reason}. Starting the "
                f"predictions from scratch.",
                UserWarning, stacklevel=2,
            )
            for path in existing:
                path.unlink()
        elif existing and recorded.get("world_size") != expected["world_size"]:
            stamp = 0
            while any(parts.glob(f"prev-{stamp}-*")):
                stamp += 1
            for path in parts.glob("rank*.jsonl"):
                path.rename(parts / f"prev-{stamp}-{path.name}")
            log.warning("Resuming predictions with %d processes instead of %s: earlier parts kept as prev-%d-*.",
                        expected["world_size"], recorded.get("world_size"), stamp)
        if recorded != expected:
            atomic_write_json(parts / RUN_FILE, expected)

    def _open_part(self) -> None:
        """Cut off this rank's uncommitted tail, load what is done (also from prev-* parts), open for appending."""
        path = self.part_path()
        if path.exists():
            reader = _PartReader(path)
            for batch in reader.batches():
                for index, _order, _line in batch:
                    self._mark(index)
                self._last_key = batch[-1][:2]
            if path.stat().st_size > reader.committed_end:
                warnings.warn(
                    f"{path}: dropping {reader.tail_lines} uncommitted line(s) after the last complete batch"
                    f"{' (the last line is truncated)' if reader.truncated else ''}, left by an interrupted run; "
                    f"those prompts are generated again.",
                    UserWarning, stacklevel=2,
                )
                with open(path, "rb+") as handle:
                    handle.truncate(reader.committed_end)
                    os.fsync(handle.fileno())
        for previous in sorted(self.parts_dir.glob("prev-*.jsonl")):
            for index, _order, _line in _PartReader(previous).rows():
                self._mark(index)
        self._handle = open(path, "ab")

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
        """Append one batch's rows (those of prompts not yet done), then its commit line, and flush.

        ``prediction`` is ``predict_step``'s return value: ``None`` or a list of dict rows (see the module
        docstring). Rows are sorted by ``(index, order)`` here; they must come after every row written before.
        """
        if self._complete is not None:
            return
        if dataloader_idx != 0:
            raise ValueError("SteeredPredictionWriter supports a single predict dataloader (indices would collide).")
        if self._handle is None:
            raise RuntimeError("The prediction writer is not open: it opens in on_predict_start (use trainer.predict).")
        rows = self._normalise(prediction)
        if self._last_key is not None and rows and rows[0][:2] <= self._last_key:
            late = [row for row in rows if row[:2] <= self._last_key]
            if self.world_size == 1 or any(index >= self.world_size for index, _order, _row in late):
                raise ValueError(
                    f"Prediction rows arrive out of order: (index, order) {late[0][:2]} after {self._last_key}. "
                    f"The predict dataloader must not shuffle (shuffle=False, no random sampler) and each prompt's "
                    f"rows must all come from one predict_step call."
                )
            # torch's DistributedSampler (drop_last=False) pads a rank's last batch with the first indices (< world
            # size), which another rank writes; Lightning's own predict sampler never pads. The merge de-duplicates.
            log.info("Dropping %d rows of repeated (padding) indices %s", len(late), sorted({row[0] for row in late}))
            rows = rows[len(late):]
        if not rows:
            return
        lines = []
        for index, order, row in rows:
            try:
                lines.append(json.dumps({**row, "index": index, "order": order}, ensure_ascii=False,
                                        allow_nan=False, default=_json_default))
            except (TypeError, ValueError) as err:
                raise ValueError(f"Prediction row for index {index} is not JSON-serialisable: {err}") from err
        lines.append(json.dumps({COMMIT: len(rows)}))
        self._handle.write(("\n".join(lines) + "\n").encode("utf-8"))
        self._handle.flush()
        for index, _order, _row in rows:
            self._mark(index)
        self._last_key = rows[-1][:2]
        self.rows_written += len(rows)

    def _normalise(self, prediction: Any) -> list[tuple[int, int, dict]]:
        """``[(index, order, row)]`` sorted, without rows of prompts already done; validates the rows."""
        if prediction is None:
            return []
        if isinstance(prediction, dict) or not isinstance(prediction, (list, tuple)):
            raise TypeError(
                f"predict_step must return a list of dict rows for SteeredPredictionWriter, got "
                f"{type(prediction).__name__}."
            )
        counters: dict[int, int] = {}
        keyed = []
        for row in prediction:
            if not isinstance(row, dict):
                raise TypeError(f"Each prediction row must be a dict, got {type(row).__name__}.")
            if "index" not in row:
                raise ValueError(f"Prediction row without an 'index' (the dataset row): {sorted(row)}.")
            index = _as_index(row["index"], "A prediction row's 'index'")
            if "order" in row:
                order = _as_index(row["order"], "A prediction row's 'order'")
            else:
                order = counters.get(index, 0)
                counters[index] = order + 1
            if not self.is_done(index):
                keyed.append((index, order, row))
        keyed.sort(key=lambda item: item[:2])
        for before, after in zip(keyed, keyed[1:]):
            if before[:2] == after[:2]:
                raise ValueError(f"Two prediction rows share (index, order) {after[:2]}; give each its own 'order'.")
        return keyed

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._complete is not None:
            return
        self._close()
        trainer.strategy.barrier("prediction_writer_merge")  # every rank's part is complete and closed
        error: BaseException | None = None
        if self.rank == 0:
            try:
                self._merge(trainer)
            except BaseException as err:  # noqa: BLE001 - re-raised after the barrier, so other ranks do not hang
                error = err
        trainer.strategy.barrier("prediction_writer_merged")
        if error is not None:
            raise error

    def _merge(self, trainer: L.Trainer) -> None:
        parts = sorted(self.parts_dir.glob("*.jsonl"))
        streams = [_PartReader(path).rows() for path in parts]
        last: tuple[int, int] | None = None
        rows = prompts = 0
        last_index = -1
        with atomic_path(self.output_path) as tmp:
            with open(tmp, "wb") as out:
                for index, order, line in heapq.merge(*streams, key=lambda item: item[:2]):
                    if (index, order) == last:
                        continue  # the same row from two parts (a repeated sample, or a prev-* part)
                    last = (index, order)
                    out.write(line)
                    rows += 1
                    if index != last_index:
                        prompts, last_index = prompts + 1, index
        self.rows_merged = rows
        expected = _dataset_length(trainer)
        if expected is not None and prompts != expected:
            warnings.warn(
                f"{self.output_path} holds rows for {prompts} prompts but the predict dataset has {expected}; "
                f"predict_step returned no rows for some prompts.",
                UserWarning, stacklevel=2,
            )
        atomic_write_text(self.complete_marker, json.dumps({"fingerprint": self.run_fingerprint, "last_index": last_index,
                                                            "rows": rows, "prompts": prompts}))
        for path in parts:
            path.unlink()
        (self.parts_dir / RUN_FILE).unlink(missing_ok=True)
        try:
            self.parts_dir.rmdir()
        except OSError:
            pass  # something else lives there; leave it
        log.info("Wrote %d rows for %d prompts to %s", rows, prompts, self.output_path)

    def _close(self) -> None:
        if self._handle is not None:
            try:
                self._handle.flush()
            finally:
                self._handle.close()
                self._handle = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._close()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._close()


def _dataset_length(trainer: L.Trainer) -> int | None:
    loaders = trainer.predict_dataloaders
    if isinstance(loaders, (list, tuple)):
        if len(loaders) != 1:
            return None
        loaders = loaders[0]
    dataset = getattr(loaders, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:
        return None


def find_prediction_writer(trainer: L.Trainer) -> SteeredPredictionWriter | None:
    """The trainer's :class:`SteeredPredictionWriter` callback, if any (for ``predict_step`` to skip done prompts)."""
    return next((callback for callback in trainer.callbacks if isinstance(callback, SteeredPredictionWriter)), None)
