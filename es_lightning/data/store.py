"""Memory-mapped reads of a built paired cache: only the rows and layers a stage asks for, as float32.

:class:`CacheStore` opens the shard files with ``safetensors.safe_open`` (memory-mapped) and reads slices
``[rows, layer]`` of them, so no stage needs the whole cache in RAM. :class:`LayerRows` hands one side's states
of some rows to the layer-pair search one layer at a time; :class:`PairedStates` serves training batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from es_lightning.data.cache import SIDES, PairedCache


def _runs(positions: Sequence[int]) -> list[tuple[int, int, int]]:
    """(output offset, first position, length) of each run of consecutive ascending positions."""
    runs: list[tuple[int, int, int]] = []
    for k, p in enumerate(positions):
        if runs and runs[-1][1] + runs[-1][2] == p:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((k, p, 1))
    return runs


class CacheStore:
    """Reads ``[rows, layers]`` of one side of a complete paired cache, memory-mapped, returned as float32."""

    def __init__(self, cache: PairedCache):
        missing = cache.missing_shards()
        if missing:
            raise RuntimeError(
                f"Cache shards {missing} are missing or incomplete in {cache.directory}; rebuild the cache."
            )
        self.cache = cache
        self.layout = cache.layout
        labels = []
        for shard in range(cache.n_shards):
            with safe_open(str(cache.shard_path(shard, "expert")), framework="pt") as handle:
                labels.append(handle.get_tensor("label"))
        self.labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)

    def __len__(self) -> int:
        return self.cache.n_examples

    def layers(self, side: str) -> list[int]:
        """The cached block indices of one side, in stored order."""
        return list(self.cache.info(side).layers)

    def width(self, side: str) -> int:
        return self.cache.info(side).hidden_size

    def positions(self, side: str, layers: Sequence[int]) -> list[int]:
        """Stored positions of block indices, with a clear error for a layer that is not cached."""
        cached = self.layers(side)
        absent = [layer for layer in layers if layer not in cached]
        if absent:
            raise ValueError(
                f"{side} layers {absent} are not in the cache (cached: {cached}); add them to data.{side}.layers."
            )
        return [cached.index(layer) for layer in layers]

    def read(self, side: str, rows: Sequence[int] | None, layers: Sequence[int]) -> torch.Tensor:
        """States ``[len(rows), len(layers), d]`` (float32) of the given rows (None: all) and block indices, in
        order."""
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}.")
        index = torch.arange(len(self)) if rows is None else torch.as_tensor(list(rows), dtype=torch.long)
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= len(self)):
            raise IndexError(f"Rows out of range for a cache of {len(self)} examples.")
        runs = _runs(self.positions(side, layers))
        out = torch.empty(len(index), len(layers), self.width(side))
        size = self.cache.shard_size
        shard_of = index // size
        for shard in shard_of.unique().tolist():
            where = (shard_of == shard).nonzero().flatten()
            local = index[where] - shard * size
            lo, hi = int(local.min()), int(local.max()) + 1
            with safe_open(str(self.cache.shard_path(shard, side)), framework="pt") as handle:
                states = handle.get_slice("states")
                for offset, first, count in runs:
                    block = states[lo:hi, first : first + count]  # reads only this slice of the mapped file
                    out[where, offset : offset + count] = block[local - lo].float()
        return out


@dataclass
class LayerRows:
    """One side's states of some rows of a cache, read one cached layer at a time (for the layer-pair search)."""

    store: CacheStore
    side: str
    rows: list[int]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        return self.store.width(self.side)

    def layer(self, position: int) -> torch.Tensor:
        """States ``[n, d]`` (float32) of the ``position``-th cached layer."""
        return self.store.read(self.side, self.rows, [self.store.layers(self.side)[position]])[:, 0]

    def take(self, index: Sequence[int]) -> LayerRows:
        return LayerRows(self.store, self.side, [self.rows[i] for i in index])


class PairedStates(Dataset):
    """Rows of a cache as dicts ``{"expert", "target", "label", "index"}`` with the given layers of each side.

    ``__getitems__`` reads a whole batch in one pass over the shards."""

    def __init__(
        self, store: CacheStore, rows: Sequence[int], expert_layers: Sequence[int], target_layers: Sequence[int]
    ):
        self.store, self.rows = store, list(rows)
        self.expert_layers, self.target_layers = list(expert_layers), list(target_layers)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, items: Sequence[int]) -> list[dict[str, torch.Tensor | int]]:
        rows = [self.rows[i] for i in items]
        expert = self.store.read("expert", rows, self.expert_layers)
        target = self.store.read("target", rows, self.target_layers)
        return [
            {"expert": expert[k], "target": target[k], "label": self.store.labels[r], "index": r}
            for k, r in enumerate(rows)
        ]

    def __getitem__(self, item: int) -> dict[str, torch.Tensor | int]:
        return self.__getitems__([item])[0]
