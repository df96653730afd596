"""Rows of both models' pooled states for the layer-pair search, read one layer at a time, and group-wise
held-out splits of them."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


class LayerStates(Protocol):
    """One model's pooled states of ``len(self)`` rows, read one cached layer at a time (``layer(position)`` is
    ``[n, width]`` float32), so the search never holds every layer at full width. The data module's readers
    (:class:`es_lightning.data.store.LayerRows`) read each layer from the memory-mapped cache on demand."""

    @property
    def width(self) -> int: ...

    def __len__(self) -> int: ...

    def layer(self, position: int) -> torch.Tensor: ...

    def take(self, index: Sequence[int]) -> LayerStates: ...


@dataclass
class TensorLayers:
    """:class:`LayerStates` over an in-memory tensor ``[n, L, d]``."""

    states: torch.Tensor

    @property
    def width(self) -> int:
        return self.states.shape[-1]

    def __len__(self) -> int:
        return self.states.shape[0]

    def layer(self, position: int) -> torch.Tensor:
        return self.states[:, position]

    def take(self, index: Sequence[int]) -> TensorLayers:
        return TensorLayers(self.states[torch.as_tensor(list(index), dtype=torch.long)])


@dataclass
class PairedRows:
    """Rows of both models' pooled states: ``expert`` and ``target`` as :class:`LayerStates` (a tensor
    ``[n, L, d]`` is wrapped in :class:`TensorLayers`), 0/1 ``labels`` (or None for unlabelled rows) and a
    ``groups`` key per row (the question) that splits never cut through."""

    expert: LayerStates
    target: LayerStates
    labels: torch.Tensor | None
    groups: Sequence[Hashable]

    def __post_init__(self) -> None:
        if isinstance(self.expert, torch.Tensor):
            self.expert = TensorLayers(self.expert)
        if isinstance(self.target, torch.Tensor):
            self.target = TensorLayers(self.target)
        n = len(self.expert)
        if len(self.target) != n or len(self.groups) != n or (self.labels is not None and len(self.labels) != n):
            raise ValueError("PairedRows: expert, target, labels and groups must hold the same number of rows.")

    def __len__(self) -> int:
        return len(self.expert)

    def take(self, index: Sequence[int]) -> PairedRows:
        index = list(index)
        labels = None if self.labels is None else self.labels[torch.as_tensor(index, dtype=torch.long)]
        return PairedRows(self.expert.take(index), self.target.take(index), labels, [self.groups[i] for i in index])


def split_by_group(groups: Sequence[Hashable], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Row indices (kept, held out): about ``fraction`` of the groups held out, whole groups only."""
    unique = list(dict.fromkeys(groups))
    if len(unique) < 2:
        raise ValueError(f"Holding out rows by question needs at least 2 questions, got {len(unique)}.")
    order = np.random.default_rng(seed).permutation(len(unique))
    n_out = min(max(int(round(fraction * len(unique))), 1), len(unique) - 1)
    out = {unique[k] for k in order[:n_out]}
    kept = [r for r, g in enumerate(groups) if g not in out]
    held = [r for r, g in enumerate(groups) if g in out]
    return kept, held
