"""K-fold cross-validation over questions: every question is tested exactly once across the folds.

Each fold's non-test questions are split again: a validation part (used to choose the steering
coefficient) and a training part (used to fit the steering vectors). Three modes decide what may not be
separated:

* ``random``: questions are shuffled with the seed; any question may land anywhere.
* ``group``: questions sharing a group value always land in the same part (train, val or test).
* ``contiguous``: the test folds are blocks of adjacent rows, and so is each validation part, for data
  sets whose neighbouring rows belong together (e.g. pairs on one topic with opposite answers). Only the
  block edges can separate neighbours; when rows come in known pairs or groups, ``group`` is exact.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

FoldMode = Literal["random", "group", "contiguous"]
MODES: tuple[str, ...] = ("random", "group", "contiguous")


@dataclass(frozen=True)
class Fold:
    """Question indices of one fold (each sorted ascending)."""

    index: int
    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...]

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"index": self.index, "train": list(self.train), "val": list(self.val), "test": list(self.test)}

    @classmethod
    def from_dict(cls, data: dict) -> Fold:
        """Inverse of :meth:`to_dict`."""
        return cls(index=data["index"], train=tuple(data["train"]), val=tuple(data["val"]), test=tuple(data["test"]))


def _count(questions: int | Sequence[str]) -> int:
    if isinstance(questions, (int, np.integer)):
        if questions < 1:
            raise ValueError(f"The number of questions must be positive, got {questions}.")
        return int(questions)
    duplicates = sorted(str(q) for q, count in Counter(questions).items() if count > 1)
    if duplicates:
        raise ValueError(f"Question ids must be unique, but {duplicates[:5]} repeat; fix the data set's ids.")
    if not questions:
        raise ValueError("No questions to split into folds.")
    return len(questions)


def _units(n: int, mode: str, groups: Sequence[Hashable] | None) -> list[list[int]]:
    """The indivisible units of the split, as lists of question indices, in row order."""
    if mode == "group":
        if groups is None:
            raise ValueError("mode='group' needs groups: one group value per question (e.g. a topic or source id).")
        if len(groups) != n:
            raise ValueError(f"Got {len(groups)} group values for {n} questions; give exactly one per question.")
        members: dict[Hashable, list[int]] = {}
        for index, group in enumerate(groups):
            members.setdefault(group, []).append(index)
        return list(members.values())
    if groups is not None:
        raise ValueError(f"groups are only used with mode='group', not mode={mode!r}; drop them or switch the mode.")
    return [[index] for index in range(n)]


def _assign_test(units: list[list[int]], k: int, mode: str, rng: np.random.Generator) -> list[list[int]]:
    """Unit indices per fold's test part."""
    if mode == "contiguous":
        return [list(block) for block in np.array_split(np.arange(len(units)), k)]
    order = [int(i) for i in rng.permutation(len(units))]
    if mode == "random":
        return [order[fold::k] for fold in range(k)]
    # group: largest groups first (ties in shuffled order), each to the fold with the fewest questions so far.
    order.sort(key=lambda u: -len(units[u]))
    folds: list[list[int]] = [[] for _ in range(k)]
    sizes = [0] * k
    for unit in order:
        target = min(range(k), key=lambda fold: (sizes[fold], fold))
        folds[target].append(unit)
        sizes[target] += len(units[unit])
    return folds


def _split_val(
    rest: list[int], val_fraction: float, mode: str, rng: np.random.Generator, fold: int
) -> tuple[list[int], list[int]]:
    """Split the non-test unit indices (in cyclic order after the test block) into (train, val)."""
    n_val = min(max(round(val_fraction * len(rest)), 1), len(rest) - 1)
    if n_val < 1:
        raise ValueError(
            f"Fold {fold} has only {len(rest)} non-test question(s)/group(s): too few for both a training and a "
            f"validation part. Use fewer folds or more data."
        )
    if mode != "contiguous":
        rest = [rest[int(i)] for i in rng.permutation(len(rest))]
    return rest[n_val:], rest[:n_val]


def _expand(units: list[list[int]], chosen: list[int]) -> tuple[int, ...]:
    return tuple(sorted(q for unit in chosen for q in units[unit]))


def make_folds(
    questions: int | Sequence[str],
    k: int = 5,
    mode: FoldMode = "random",
    seed: int = 0,
    groups: Sequence[Hashable] | None = None,
    val_fraction: float = 0.25,
) -> list[Fold]:
    """Split questions (a count, or a list of unique ids) into ``k`` folds with train/val/test indices.

    The test parts partition all questions; in each fold, ``val_fraction`` of the remaining questions (or
    groups, in ``group`` mode) form the validation part and the rest the training part. Deterministic for
    a given ``seed``; ``contiguous`` mode ignores the seed.
    """
    if mode not in MODES:
        raise ValueError(f"Unknown fold mode {mode!r}: use one of {list(MODES)}.")
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"k must be an integer of at least 2 for cross-validation, got {k!r}.")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be strictly between 0 and 1, got {val_fraction}.")
    n = _count(questions)
    units = _units(n, mode, groups)
    what = "groups" if mode == "group" else "questions"
    if k > len(units):
        raise ValueError(f"k={k} folds need at least {k} {what}, but there are only {len(units)}; lower k.")
    rng = np.random.default_rng(seed)
    test_units = _assign_test(units, k, mode, rng)
    folds = []
    for index, test in enumerate(test_units):
        if mode == "contiguous":
            # Cyclic order starting right after the test block, so validation and training stay blocks too.
            after = test[-1] + 1
            rest = list(range(after, len(units))) + list(range(0, test[0]))
        else:
            in_test = set(test)
            rest = [u for u in range(len(units)) if u not in in_test]
        train, val = _split_val(rest, val_fraction, mode, rng, index)
        folds.append(Fold(index=index, train=_expand(units, train), val=_expand(units, val), test=_expand(units, test)))
    return folds
