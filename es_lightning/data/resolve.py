"""Where the default run's multiple-choice data comes from: a configured file, ``shared/data``, or the Hub.

:func:`resolve_data_path` tries, in order:

1. the configured ``path``, if that file exists (relative paths from the current directory);
   any later step taken for a configured path is announced at WARNING with the path actually used;
2. ``shared/data/<file name>`` in or beside the repository checkout or the current directory, that is in that
   folder or in its parent folder (the checkout lives at e.g. ``/work/main`` and the benchmark data at
   ``/work/shared/data``); never further up, so a ``shared/data`` folder higher up is never read by chance;
3. for the TruthfulQA file only: the Hub dataset ``truthfulqa/truthful_qa`` (``multiple_choice``,
   ``validation``), its ``mc1_targets`` converted to our format and written to
   ``<cache_dir>/data/truthfulqa_mc1.jsonl`` (reused on later runs);
4. otherwise one :class:`FileNotFoundError` that names every place tried and how to fix it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from es_lightning.data.sources import LOCAL_BUILDERS
from es_lightning.io import atomic_write_text

log = logging.getLogger(__name__)

HUB_DEFAULT = ("truthfulqa/truthful_qa", "multiple_choice", "validation")
HUB_CACHE_NAME = "truthfulqa_mc1.jsonl"
_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_PROXY_ENV = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def truthfulqa_mc1_rows(hf_rows: Iterable[dict[str, Any]], seed: int | None = None) -> list[dict[str, Any]]:
    """Hub TruthfulQA ``multiple_choice`` rows -> ``{"id", "question", "choices", "answer"}`` (MC1: one true choice).

    ``mc1_targets`` is ``{"choices": [...], "labels": [1, 0, ...]}``; ``answer`` is the index of the label 1.
    On the Hub the true choice always comes first; ``seed`` (optional) shuffles each row's choices with
    ``random.Random(f"{seed}:{index}")`` so that it does not, like ``shared/data/truthfulqa_mc.jsonl``.
    """
    out = []
    for index, row in enumerate(hf_rows):
        where = f"TruthfulQA Hub row {index + 1}"
        targets = row.get("mc1_targets") if isinstance(row, dict) else None
        if not isinstance(targets, dict) or "choices" not in targets or "labels" not in targets:
            raise ValueError(
                f"{where}: no 'mc1_targets' with 'choices' and 'labels'. "
                "Use the 'multiple_choice' config of truthfulqa/truthful_qa."
            )
        choices, labels = list(targets["choices"]), [int(x) for x in targets["labels"]]
        if len(choices) != len(labels) or len(choices) < 2 or labels.count(1) != 1:
            raise ValueError(f"{where}: expected >= 2 choices with exactly one label 1, got labels {labels}.")
        answer = labels.index(1)
        if seed is not None:
            order = list(range(len(choices)))
            random.Random(f"{seed}:{index}").shuffle(order)
            choices, answer = [choices[i] for i in order], order.index(answer)
        out.append(
            {
                "id": f"truthfulqa-{index}",
                "question": str(row["question"]),
                "choices": [str(c) for c in choices],
                "answer": answer,
            }
        )
    return out


def _checkout_dir() -> Path:
    return Path(__file__).resolve().parents[2]


def _search_shared(name: str, starts: list[Path]) -> tuple[Path | None, list[Path]]:
    """First ``<dir>/shared/data/<name>`` for ``<dir>`` each start and then its parent folder; all candidates tried."""
    tried: list[Path] = []
    for start in starts:
        for directory in (start, start.parent):
            candidate = directory / "shared" / "data" / name
            if candidate in tried:
                continue
            tried.append(candidate)
            if candidate.is_file():
                return candidate, tried
    return None, tried


def _hub_reachable(timeout: float = 3.0) -> str | None:
    """``None`` if a TCP connection to the Hub endpoint opens within ``timeout``, else why not.

    ``datasets`` retries an unreachable Hub for ~20 s before failing; this probe makes "no network" fail at
    once. It is skipped in offline mode (``datasets`` then fails fast itself, or uses its local cache) and
    behind a proxy (a direct connection says nothing there).
    """
    if any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in _OFFLINE_ENV):
        return None
    if any(os.environ.get(v) for v in _PROXY_ENV):
        return None
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as err:
        return f"the Hub ({host}:{port}) is unreachable: {err}"


def _from_hub(hub: tuple[str, str, str], target: Path) -> tuple[Path | None, str]:
    """Download and convert the Hub dataset to ``target``; (path, "") on success, (None, why) on failure."""
    if target.is_file():
        return target, ""
    unreachable = _hub_reachable()
    if unreachable:
        return None, unreachable
    dataset_id, config, split = hub
    try:
        import datasets

        table = datasets.load_dataset(dataset_id, config, split=split)
        rows = truthfulqa_mc1_rows(table, seed=0)
    except Exception as err:  # noqa: BLE001 - offline, missing, renamed or malformed: all mean "not from here"
        return None, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".strip()
    if not rows:
        return None, "the split has no rows"
    atomic_write_text(target, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    log.info("Wrote %d TruthfulQA MC1 questions from the Hub (%s) to %s.", len(rows), dataset_id, target)
    return target, ""


def resolve_data_path(
    path: str | None,
    filename: str = "truthfulqa_mc.jsonl",
    search_from: Path | None = None,
    hub: tuple[str, str, str] | None = HUB_DEFAULT,
    cache_dir: Path | None = None,
) -> str:
    """A local path to the multiple-choice JSONL file to read (see the module docstring for the order).

    ``path``: the configured path, or ``None``. When it is given, steps 2-3 look for a file of the same name
    (``../shared/data/pubmedqa_pqal.jsonl`` -> ``shared/data/pubmedqa_pqal.jsonl``), and the Hub step
    applies only when that name is ``filename`` (the Hub copy stands in for TruthfulQA, nothing else).
    A ``path`` that is not a local file type (.jsonl/.json/.csv/.parquet) is a ``datasets`` id and is
    returned unchanged. ``search_from``: the folder in and beside which ``shared/data`` is looked for (default:
    this repository's checkout and the current directory). ``hub``: ``(id, config, split)`` or ``None`` to skip the Hub.
    ``cache_dir``: where the Hub copy is written (default: the es_lightning cache directory).
    """
    if path is not None and Path(path).suffix.lower() not in LOCAL_BUILDERS:
        return path
    if path is not None and Path(path).expanduser().is_file():
        return path
    name = Path(path).name if path is not None else filename

    starts = _search_starts(search_from)
    found, tried = _search_shared(name, starts)
    if found is not None:
        if path is not None:
            log.warning("Data file %r does not exist (from %s); using %s instead.", path, Path.cwd(), found)
        return str(found)

    hub_target = _hub_target(cache_dir)
    got, hub_why = _try_hub(hub, name, filename, hub_target)
    if got is not None:
        if path is not None:
            log.warning("Data file %r does not exist (from %s); using the Hub copy %s instead.", path, Path.cwd(), got)
        return str(got)
    raise _not_found(path, name, starts, tried, hub, hub_target, hub_why)


def _search_starts(search_from: Path | None) -> list[Path]:
    """The folders in and beside which ``shared/data`` is looked for: ``search_from``, or the checkout and cwd."""
    if search_from is not None:
        return [Path(search_from).expanduser().resolve()]
    return list(dict.fromkeys([_checkout_dir(), Path.cwd().resolve()]))


def _hub_target(cache_dir: Path | None) -> Path:
    """Where the Hub copy is cached: ``<cache_dir>/data/`` (default: the es_lightning cache directory)."""
    if cache_dir is None:
        from es_lightning.models.loading import default_cache_dir

        cache_dir = default_cache_dir()
    return Path(cache_dir).expanduser() / "data" / HUB_CACHE_NAME


def _try_hub(hub: tuple[str, str, str] | None, name: str, filename: str, hub_target: Path) -> tuple[Path | None, str]:
    """The Hub copy's path and ``""``, or ``None`` and why the Hub step was skipped or failed."""
    if hub is None:
        return None, "skipped (no Hub source configured)"
    if name != filename:
        return None, f"skipped (the Hub copy stands in for {filename!r} only, not {name!r})"
    got, why = _from_hub(hub, hub_target)
    return (got, "") if got is not None else (None, f"failed: {why}")


def _not_found(
    path: str | None,
    name: str,
    starts: list[Path],
    tried: list[Path],
    hub: tuple[str, str, str] | None,
    hub_target: Path,
    hub_why: str,
) -> FileNotFoundError:
    """The error naming every place tried for ``name`` and how to fix it."""
    configured = (
        f"{path!r} (resolved from the current directory {str(Path.cwd())!r}): does not exist"
        if path is not None
        else "none configured"
    )
    searched = ", ".join(str(p) for p in tried[:6]) + (f" and {len(tried) - 6} more" if len(tried) > 6 else "")
    hub_text = f"{hub[0]!r} (config {hub[1]!r}, split {hub[2]!r}) -> {hub_target}" if hub else "none"
    return FileNotFoundError(
        f"No data file {name!r} found. Tried:\n"
        f"  1. the configured path: {configured};\n"
        f"  2. shared/data/{name} in or beside {', '.join(str(s) for s in starts)}: {searched}: none exists;\n"
        f"  3. the Hub dataset {hub_text}: {hub_why}.\n"
        f"Fix: set data.data.path to an existing multiple-choice .jsonl file, put {name!r} into a shared/data/ folder "
        f"beside the checkout (e.g. ../shared/data/{name} from the repository root), or run once with Hub access "
        f"so the TruthfulQA copy is cached."
    )
