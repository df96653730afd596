"""The labelled data as questions: where records come from (:class:`DataSource`), how they split
(:class:`SplitConfig`), and the :class:`QuestionTable` built from both, which code outside ``data/`` reads (rows
per question, questions per split) instead of the data module's internals."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from es_lightning.data.adapters import adapt_rows
from es_lightning.data.examples import (
    Example,
    ExampleFormat,
    Question,
    check_two_classes,
    examples_from_questions,
    examples_from_text_rows,
    questions_from_rows,
)
from es_lightning.data.resolve import resolve_data_path
from es_lightning.data.sources import load_records, require_columns, rows
from es_lightning.data.splits import SPLITS, group_split

log = logging.getLogger(__name__)


@dataclass
class DataSource:
    """Where records come from: a local .jsonl/.json/.csv/.parquet path or a ``datasets`` id, and their format.

    ``adapter`` names a row adapter (:mod:`es_lightning.data.adapters`, e.g. ``gsm8k_mc``) applied before the
    format; ``limit`` keeps the first rows only (after adapting).
    """

    path: str
    name: str | None = None
    split: str = "train"
    format: ExampleFormat = field(default_factory=ExampleFormat)
    adapter: str | None = None
    adapter_options: dict[str, Any] = field(default_factory=dict)
    limit: int | None = None


@dataclass
class SplitConfig:
    """Train/val/test by group-wise fractions with a seed, or from separate files (``val_path``/``test_path``)."""

    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    val_path: str | None = None
    test_path: str | None = None


def read_source(source: DataSource, cache_dir: Path) -> tuple[list[Example], list[Question]]:
    """The examples (rows) of a source and, for multiple choice, its questions."""
    source = replace(source, path=resolve_data_path(source.path, cache_dir=cache_dir))
    table = load_records(source.path, source.split, source.name)
    fmt = source.format
    if source.adapter:
        records = adapt_rows(rows(table), source.adapter, **source.adapter_options)
    else:
        require_columns(table, fmt.required_columns(), source.path)
        records = rows(table)
    if source.limit is not None:
        if source.limit < 1:
            raise ValueError(f"data limit must be >= 1 or null, got {source.limit}.")
        records = records[: source.limit]
    if fmt.kind == "multiple_choice":
        questions = questions_from_rows(records, fmt, source.path)
        return examples_from_questions(questions, fmt), questions
    return examples_from_text_rows(records, fmt, source.path), []


@dataclass
class QuestionTable:
    """The examples (cache rows) and the questions they come from, split into train/val/test by question.

    ``examples[r]`` is cache row ``r``; ``split_indices[split]`` its rows; ``questions[split]`` its questions;
    ``all_questions`` every split's questions (train, val, test); ``question_rows[q]`` the rows of
    ``all_questions[q]``; ``question_split[split]`` indices into ``all_questions``."""

    examples: list[Example]
    split_indices: dict[str, list[int]]
    questions: dict[str, list[Question]]
    all_questions: list[Question]
    question_rows: list[list[int]]
    question_split: dict[str, list[int]]

    @classmethod
    def build(cls, source: DataSource, splits: SplitConfig, cache_dir: Path) -> QuestionTable:
        """Read ``source`` and split it (by question, seeded, or from the split files); refuse a train split with one
        class and warn about such val/test splits."""
        examples, split_indices, questions = _split(source, splits, cache_dir)
        all_questions = [q for name in SPLITS for q in questions.get(name, [])]
        rows_of: dict[str, list[int]] = {}
        for index, example in enumerate(examples):
            rows_of.setdefault(example.id.rsplit("/", 1)[0], []).append(index)
        offset, question_split = 0, {}
        for name in SPLITS:
            count = len(questions.get(name, []))
            question_split[name] = list(range(offset, offset + count))
            offset += count
        table = cls(
            examples,
            split_indices,
            questions,
            all_questions,
            [rows_of.get(q.id, []) for q in all_questions],
            question_split,
        )
        if source.format.label_field or source.format.kind == "multiple_choice":
            table.check_labels()
        return table

    def check_labels(self) -> None:
        """Both classes in the train split (else an error); a warning for a val or test split of one class."""
        labels = [e.label for e in self.examples]
        check_two_classes([labels[i] for i in self.split_indices["train"]], "train split")
        for name in ("val", "test"):
            present = {labels[i] for i in self.split_indices[name]}
            if len(present) == 1:
                log.warning(
                    "The %s split has labels of only one class (%s): label-based results on it (e.g. `test` with "
                    "folds: null) would be meaningless. Use a larger %s fraction, another split seed, or rebalance "
                    "the data.",
                    name,
                    sorted(present),
                    name,
                )

    def groups(self, split: str) -> list[str]:
        """The group key (question) of every row of a split, in row order."""
        return [self.examples[i].group for i in self.split_indices[split]]


def _split(
    source: DataSource, splits: SplitConfig, cache_dir: Path
) -> tuple[list[Example], dict[str, list[int]], dict[str, list[Question]]]:
    """Examples, rows per split and questions per split: from the split files, or a seeded split by question."""
    examples, questions = read_source(source, cache_dir)
    if not (splits.val_path or splits.test_path):
        split_indices = group_split([e.group for e in examples], splits.val_fraction, splits.test_fraction, splits.seed)
        by_group: dict[str, list[Question]] = {q.group: [] for q in questions}
        for q in questions:
            by_group[q.group].append(q)
        per_split = {
            name: [q for g in dict.fromkeys(examples[i].group for i in idx) for q in by_group.get(g, [])]
            for name, idx in split_indices.items()
        }
        return examples, split_indices, per_split
    parts = {"train": (examples, questions)}
    for name, path in (("val", splits.val_path), ("test", splits.test_path)):
        if path:
            parts[name] = read_source(replace(source, path=path, limit=None), cache_dir)
    all_examples: list[Example] = []
    split_indices, per_split = {}, {}
    for name in SPLITS:
        part_examples, part_questions = parts.get(name, ([], []))
        split_indices[name] = list(range(len(all_examples), len(all_examples) + len(part_examples)))
        all_examples.extend(part_examples)
        per_split[name] = part_questions
    groups = {name: {all_examples[i].group for i in idx} for name, idx in split_indices.items()}
    shared = (groups["train"] & groups["val"]) | (groups["train"] & groups["test"]) | (groups["val"] & groups["test"])
    if shared:
        raise ValueError(
            f"Questions/groups {sorted(shared)[:5]} appear in more than one split file. Remove the overlap."
        )
    return all_examples, split_indices, per_split
