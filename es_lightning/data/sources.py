"""Read labelled or unlabelled records from local files or any ``datasets`` source."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def check_jsonl(path: Path) -> None:
    """Fail with the file and line number of the first malformed JSON Lines row."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}:{number}: malformed JSON ({err.msg} at column {err.colno}). "
                    f"Fix that line: every line must be one JSON object."
                ) from err
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object per line, found {type(row).__name__}.")


def load_records(source: str, split: str = "train", name: str | None = None) -> datasets.Dataset:
    """Load ``source`` as a ``datasets.Dataset``.

    A path ending in .jsonl/.json/.csv/.parquet is read locally; anything else is passed to
    ``datasets.load_dataset(source, name, split=split)`` (a Hub id or a local dataset script/folder).
    """
    path = Path(source).expanduser()
    builder = LOCAL_BUILDERS.get(path.suffix.lower())
    if builder is not None:
        if not path.exists():
            raise FileNotFoundError(
                f"Data file {str(path)!r} does not exist. Fix the data path in the config "
                f"(relative paths are resolved from the current directory {str(Path.cwd())!r})."
            )
        if path.suffix.lower() == ".jsonl":
            check_jsonl(path)
        try:
            table = datasets.load_dataset(builder, data_files=str(path), split="train")
        except ValueError as err:
            if "no data" not in str(err):
                raise
            raise ValueError(
                f"Data source {str(path)!r} is empty: it has no rows. Point the config at a file with examples."
            ) from err
    else:
        try:
            table = datasets.load_dataset(source, name, split=split)
        except Exception as err:  # noqa: BLE001 - datasets raises many types for "not found"
            raise FileNotFoundError(
                f"Data source {source!r} is neither a local .jsonl/.json/.csv/.parquet file nor a loadable "
                f"`datasets` dataset ({type(err).__name__}: {err}). Fix the path or the dataset id in the config."
            ) from err
    if len(table) == 0:
        raise ValueError(f"Data source {source!r} is empty: it has no rows. Point the config at a file with examples.")
    return table


def require_columns(table: datasets.Dataset, columns: list[str], source: str) -> None:
    """Raise a clear error if any configured column is missing."""
    missing = [column for column in columns if column not in table.column_names]
    if missing:
        raise KeyError(
            f"Data source {source!r} has no column {missing}; it has {table.column_names}. "
            f"Set the matching *_field option in the data config."
        )


def rows(table: datasets.Dataset) -> list[dict[str, Any]]:
    """All rows as plain dicts (the labelled sets here are small)."""
    return [dict(row) for row in table]
