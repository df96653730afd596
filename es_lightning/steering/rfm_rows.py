"""The RFM fit's rows: labels checked and encoded, the validation split (by whole groups or stratified by label)
and the seeded row cap of whole groups (see :mod:`es_lightning.steering.rfm`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch


@dataclass
class _Labels:
    targets: torch.Tensor  # [n, 1] (binary) or [n, c] (one-hot), float32
    classes: np.ndarray  # [n] class index per row
    positive: np.ndarray  # [n] float, 1 for the positive class
    metric: str

    def take(self, rows: np.ndarray) -> _Labels:
        return _Labels(self.targets[torch.from_numpy(rows)], self.classes[rows], self.positive[rows], self.metric)


def _check_labels(y: torch.Tensor | np.ndarray, n: int, positive_class: int) -> _Labels:
    y_arr = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if y_arr.ndim not in (1, 2) or y_arr.shape[0] != n:
        raise ValueError(
            f"y must have shape [n] (0/1 labels) or [n, c] (one-hot) with n={n} rows like X, got {tuple(y_arr.shape)}; "
            "pass one label per row of X."
        )
    if not np.isin(y_arr, (0, 1)).all():
        raise ValueError("y must hold 0/1 values (binary labels or a one-hot matrix); map the labels to 0/1 first.")
    if y_arr.ndim == 2 and y_arr.shape[1] == 1:
        y_arr = y_arr[:, 0]
    if y_arr.ndim == 1:
        classes = y_arr.astype(np.int64)
        return _Labels(torch.from_numpy(classes[:, None]).float(), classes, classes.astype(np.float64), "auc")
    if not (y_arr.sum(axis=1) == 1).all():
        raise ValueError("A one-hot y must have exactly one 1 per row; pass integer 0/1 labels or fix the encoding.")
    if not 0 <= positive_class < y_arr.shape[1]:
        raise ValueError(
            f"positive_class={positive_class} is not a column of the one-hot y with {y_arr.shape[1]} columns."
        )
    classes = y_arr.argmax(axis=1)
    positive = y_arr[:, positive_class].astype(np.float64)
    return _Labels(torch.from_numpy(y_arr.astype(np.float32)), classes, positive, "accuracy")


def _check_class_counts(classes: np.ndarray, n_classes: int) -> None:
    counts = np.bincount(classes, minlength=n_classes)
    if (counts > 0).sum() < 2:
        raise ValueError("y holds a single class; RFM needs examples of at least two classes to learn a direction.")
    if counts.min() < 2:
        worst = int(counts.argmin())
        raise ValueError(
            f"Class {worst} has {counts[worst]} example(s), but the stratified validation split needs at least 2 per "
            "class (one to train on, one to validate on); add examples of that class or drop the empty one-hot column."
        )


def _stratified_split(classes: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices (rest, chosen): about ``fraction`` of every class is chosen, at least one and never all of it."""
    rest, chosen = [], []
    for label in np.unique(classes):
        members = rng.permutation(np.flatnonzero(classes == label))
        take = min(max(round(fraction * len(members)), 1), len(members) - 1)
        chosen.append(members[:take])
        rest.append(members[take:])
    return np.sort(np.concatenate(rest)), np.sort(np.concatenate(chosen))


def _grouped_split(
    classes: np.ndarray, groups: Sequence, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (rest, chosen): about ``fraction`` of the groups chosen, whole groups only (rows of one question never
    fall on both sides), with both parts holding every class."""
    keys = list(dict.fromkeys(groups))
    if len(keys) < 2:
        raise ValueError(f"The RFM's grouped validation split needs at least 2 groups (questions), got {len(keys)}.")
    n_chosen = min(max(round(fraction * len(keys)), 1), len(keys) - 1)
    for _ in range(20):
        picked = {keys[k] for k in rng.permutation(len(keys))[:n_chosen]}
        chosen = np.array([r for r, g in enumerate(groups) if g in picked])
        rest = np.array([r for r, g in enumerate(groups) if g not in picked])
        if set(classes[chosen]) == set(classes) == set(classes[rest]):
            return rest, chosen
    raise ValueError(
        "No grouped validation split holds every class on both sides; give the RFM more groups (questions) with "
        "rows of both labels, or pass groups=None for a stratified split of rows."
    )


def cap_rows(groups: Sequence, max_rows: int, seed: int) -> np.ndarray:
    """Sorted row indices of a seeded subsample of whole groups holding at most ``max_rows`` rows (groups are taken
    in a seeded random order; one that would overflow the cap is skipped)."""
    members: dict = {}
    for row, group in enumerate(groups):
        members.setdefault(group, []).append(row)
    keys = list(members)
    chosen: list[int] = []
    for k in np.random.default_rng([seed, 1]).permutation(len(keys)):  # its own stream: the split's draws are unchanged
        rows = members[keys[k]]
        if len(chosen) + len(rows) <= max_rows:
            chosen.extend(rows)
        if len(chosen) == max_rows:
            break
    return np.sort(np.array(chosen, dtype=np.int64))


class _Split(NamedTuple):
    """Row indices: the training part, the validation part, and the training rows the grid search fits on."""

    train: np.ndarray
    val: np.ndarray
    grid: np.ndarray


def _split_rows(
    classes: np.ndarray, groups: Sequence | None, val_fraction: float, grid_max_train: int, seed: int
) -> _Split:
    """The seeded validation split (by whole groups when given, else stratified by label), and a stratified
    subsample of at most about ``grid_max_train`` training rows for the grid search."""
    rng = np.random.default_rng(seed)
    if groups is not None:
        train_idx, val_idx = _grouped_split(classes, list(groups), val_fraction, rng)
    else:
        train_idx, val_idx = _stratified_split(classes, val_fraction, rng)
    if len(train_idx) > grid_max_train:
        grid_idx = train_idx[_stratified_split(classes[train_idx], grid_max_train / len(train_idx), rng)[1]]
    else:
        grid_idx = train_idx
    return _Split(train_idx, val_idx, grid_idx)
