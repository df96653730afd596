"""Prompts for ``es-lightning predict``: a lazily indexed, Arrow-backed torch ``Dataset`` of prompt strings.

The rows stay in the ``datasets.Dataset`` (memory-mapped Arrow); nothing is copied into Python objects up
front. The checks that run at construction (prompt column present and made of non-empty strings, ids unique)
use Arrow compute kernels on whole columns. A resumed ``predict`` drops the prompts already written with
:meth:`PromptDataset.without`; :attr:`PromptDataset.fingerprint` covers the settings and the file's bytes, so
an edited prompt file never reuses old predictions.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import Dataset

from es_lightning.data.sources import load_records
from es_lightning.io import sha256_file, sha256_json

DEFAULT_ID_FIELD = "id"


@dataclass
class PromptSource:
    """Where the prompts come from.

    ``path`` is a local ``.jsonl``/``.json``/``.csv``/``.parquet`` file or a ``datasets`` id (with ``name`` and
    ``split``). ``prompt_field`` names the prompt column. ``id_field`` names a column of unique ids; when it is
    the default ``"id"`` and the data has no such column, or when it is ``None``, the row number is the id. A
    non-default ``id_field`` that is missing is an error (a typo would otherwise go unnoticed). ``limit`` keeps
    only the first ``limit`` rows.
    """

    path: str
    name: str | None = None
    split: str = "train"
    prompt_field: str = "prompt"
    id_field: str | None = DEFAULT_ID_FIELD
    limit: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.path, os.PathLike):
            self.path = os.fspath(self.path)
        if not isinstance(self.path, str) or not self.path.strip():
            raise ValueError(f"PromptSource.path must be a file path or dataset id, got {self.path!r}.")
        if not isinstance(self.prompt_field, str) or not self.prompt_field:
            raise ValueError(f"PromptSource.prompt_field must be a column name, got {self.prompt_field!r}.")
        if self.id_field is not None and (not isinstance(self.id_field, str) or not self.id_field):
            raise ValueError(f"PromptSource.id_field must be a column name or null, got {self.id_field!r}.")
        limit = self.limit
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"PromptSource.limit must be a positive int or null (all rows), got {self.limit!r}.")


def _column(table: datasets.Dataset, field: str) -> pa.ChunkedArray:
    """One column as Arrow (no Python objects; zero-copy for a memory-mapped table)."""
    column = table.with_format("arrow")[field]
    return column if isinstance(column, pa.ChunkedArray) else pa.chunked_array([column])


def _first_true(mask: pa.ChunkedArray) -> int:
    """Index of the first true value of a boolean column (nulls count as false), or -1."""
    return int(pc.index(pc.fill_null(mask, False), True).as_py())


class PromptDataset(Dataset):
    """A torch ``Dataset`` of ``{"index": int, "id": str, "prompt": str}`` items, read lazily from Arrow.

    ``index`` is the row number (0-based, after ``limit``), ``id`` the id column's value as a string (or the
    row number as a string), ``prompt`` the prompt text as stored. Pickles cheaply (the table is memory-mapped),
    so it works with DataLoader workers.
    """

    _keep: torch.Tensor | None = None  # rows served (a view made by `without`); None: every row

    def __init__(self, source: PromptSource):
        self.source = source
        table = load_records(source.path, split=source.split, name=source.name)
        label = source.path
        if source.prompt_field not in table.column_names:
            raise KeyError(
                f"Prompt source {label!r} has no column {source.prompt_field!r}; it has {table.column_names}. "
                f"Set prompt_field to the column that holds the prompts."
            )
        id_field = source.id_field
        if id_field is not None and id_field not in table.column_names:
            if id_field != DEFAULT_ID_FIELD:
                raise KeyError(
                    f"Prompt source {label!r} has no id column {id_field!r}; it has {table.column_names}. Set "
                    f"id_field to an existing column, or to null to use row numbers as ids."
                )
            id_field = None
        if source.limit is not None and source.limit < len(table):
            table = table.select(range(source.limit))  # contiguous: a zero-copy slice, no index mapping
        self.id_field = id_field
        columns = [source.prompt_field] + ([id_field] if id_field else [])
        self._table = table.select_columns(columns)
        self._check_prompts(label)
        if id_field:
            self._check_ids(label, id_field)

    def _check_prompts(self, label: str) -> None:
        field = self.source.prompt_field
        column = _column(self._table, field)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise TypeError(
                f"Prompt source {label!r}: column {field!r} holds {column.type}, not text. Point prompt_field at a "
                f"column of strings."
            )
        first = _first_true(pc.is_null(column))
        if first >= 0:
            raise ValueError(
                f"Prompt source {label!r}: row {first} (0-based) has no prompt (null {field!r}). Fill it in or "
                f"remove the row."
            )
        blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0)
        first = _first_true(blank)
        if first >= 0:
            count = int(pc.sum(pc.cast(blank, pa.int64())).as_py() or 0)
            raise ValueError(
                f"Prompt source {label!r}: row {first} (0-based) has an empty prompt in column {field!r} "
                f"({count} empty row(s) in all). Every prompt must contain text: fill in or remove those rows."
            )

    def _check_ids(self, label: str, field: str) -> None:
        column = _column(self._table, field)
        first = _first_true(pc.is_null(column))
        if first >= 0:
            raise ValueError(
                f"Prompt source {label!r}: row {first} (0-based) has no id (null {field!r}). Give every row an id, "
                f"or set id_field: null to use row numbers."
            )
        try:
            as_text = pc.cast(column, pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            raise TypeError(
                f"Prompt source {label!r}: id column {field!r} holds {column.type}, which is not a string or number."
            ) from err
        counts = pc.value_counts(as_text)
        if len(counts) != len(as_text):
            values, repeats = counts.field("values"), counts.field("counts")
            duplicated = pc.filter(values, pc.greater(repeats, 1))
            examples = duplicated.to_pylist()[:5]
            rows = pc.indices_nonzero(pc.is_in(as_text, value_set=pa.array(examples, pa.string()))).to_pylist()[:10]
            raise ValueError(
                f"Prompt source {label!r}: ids in column {field!r} are not unique: {examples} occur more than once "
                f"({len(duplicated)} duplicated id(s); rows {rows}, 0-based). Make the ids unique, or set "
                f"id_field: null to use row numbers."
            )

    @property
    def fingerprint(self) -> str:
        """Hash of the source settings and the content: a local file's bytes (wherever it lies: the path is left
        out), else the ``datasets`` id and fingerprint."""
        path = Path(self.source.path).expanduser()
        if path.is_file():
            return sha256_json({"source": {**asdict(self.source), "path": None}, "content": sha256_file(path)})
        return sha256_json({"source": asdict(self.source), "content": getattr(self._table, "_fingerprint", None)})

    def without(self, done: Iterable[int]) -> PromptDataset:
        """A view without the prompts whose row numbers are in ``done``; items keep their original ``index``."""
        done = set(done)
        view = object.__new__(PromptDataset)
        view.__dict__.update(self.__dict__)
        rows = range(len(self._table)) if self._keep is None else self._keep.tolist()
        view._keep = torch.tensor([r for r in rows if r not in done], dtype=torch.long)
        return view

    def __len__(self) -> int:
        return len(self._table) if self._keep is None else len(self._keep)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"Prompt index {index} is out of range for {len(self)} prompts.")
        if self._keep is not None:
            index = int(self._keep[index])
        row = self._table[index]
        ident = str(row[self.id_field]) if self.id_field else str(index)
        return {"index": index, "id": ident, "prompt": row[self.source.prompt_field]}


def collate_prompts(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate :class:`PromptDataset` items: ``index`` becomes a long tensor, ``id`` and ``prompt`` lists of str."""
    return {
        "index": torch.tensor([int(item["index"]) for item in batch], dtype=torch.long),
        "id": [item["id"] for item in batch],
        "prompt": [item["prompt"] for item in batch],
    }
