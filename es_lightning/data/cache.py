"""The paired hidden-state cache: both models' pooled block outputs for the same examples, in shards.

Layout under ``<cache_dir>/paired/<key>/``: ``meta.json`` (what the key covers, sizes) and
``shard-NNNNN.safetensors`` (``expert [n, L_E, d_E]``, ``target [n, L_T, d_T]``, ``label [n]``,
``row [n]``, float32), plus ``build-log.jsonl`` with one line per shard extraction. Every file is
written to a temporary name and renamed, so readers never see half a file and two runs that build the
same shard at once both leave a whole one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from es_lightning.data.examples import Example
from es_lightning.io import atomic_path, atomic_write_json, sha256_json
from es_lightning.models.loading import dtype_name
from es_lightning.models.spec import ModelInfo, ModelSpec

log = logging.getLogger(__name__)

CACHE_FORMAT = 1


@dataclass(frozen=True)
class PairedLayout:
    """Shapes and identities of a paired cache: everything later steps need to interpret it."""

    expert: ModelInfo
    target: ModelInfo
    pooling: str

    @property
    def expert_layers(self) -> list[int]:
        return list(self.expert.layers)

    @property
    def target_layers(self) -> list[int]:
        return list(self.target.layers)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PairedLayout":
        expert = dict(data["expert"], layers=tuple(data["expert"]["layers"]))
        target = dict(data["target"], layers=tuple(data["target"]["layers"]))
        return cls(ModelInfo(**expert), ModelInfo(**target), data["pooling"])


def examples_fingerprint(examples: Sequence[Example]) -> str:
    """Hash of every example's id, group, texts and label."""
    return sha256_json([[e.id, e.group, e.prompt, e.completion, e.label] for e in examples])


def cache_key(layout: PairedLayout, expert: ModelSpec, target: ModelSpec, data_fingerprint: str) -> str:
    """A key that changes whenever anything that affects the cached numbers changes."""
    def model_part(info: ModelInfo, spec: ModelSpec) -> dict:
        return {
            "fingerprint": info.fingerprint, "layers": list(info.layers), "chat_template": spec.chat_template,
            "dtype": dtype_name(spec.dtype), "max_length": spec.max_length, "block_path": spec.block_path,
        }

    return sha256_json({
        "format": CACHE_FORMAT, "pooling": layout.pooling, "data": data_fingerprint,
        "expert": model_part(layout.expert, expert), "target": model_part(layout.target, target),
    })[:20]


class PairedCache:
    """Shards of paired hidden states for ``n`` examples under one key."""

    def __init__(self, root: str | Path, key: str, n_examples: int, shard_size: int, layout: PairedLayout):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}.")
        self.directory = Path(root) / "paired" / key
        self.key = key
        self.n_examples = n_examples
        self.shard_size = shard_size
        self.layout = layout

    @property
    def n_shards(self) -> int:
        return (self.n_examples + self.shard_size - 1) // self.shard_size

    def shard_rows(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.n_examples))

    def shard_path(self, shard: int) -> Path:
        return self.directory / f"shard-{shard:05d}.safetensors"

    def write_meta(self, extra: dict) -> None:
        """Write ``meta.json`` (atomic; identical content from every writer)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.directory / "meta.json", {
            "format": CACHE_FORMAT, "key": self.key, "n_examples": self.n_examples,
            "shard_size": self.shard_size, "layout": self.layout.to_dict(), **extra,
        })

    def shard_is_valid(self, shard: int) -> bool:
        """True if the shard file exists, opens, and its metadata and shapes match this cache."""
        path = self.shard_path(shard)
        if not path.exists():
            return False
        rows = self.shard_rows(shard)
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                shapes = {name: handle.get_slice(name).get_shape() for name in handle.keys()}
        except Exception as err:  # noqa: BLE001 - any unreadable shard is rebuilt
            log.warning("Cache shard %s is unreadable (%s); it will be rebuilt.", path.name, err)
            return False
        expected = {
            "expert": [len(rows), len(self.layout.expert.layers), self.layout.expert.hidden_size],
            "target": [len(rows), len(self.layout.target.layers), self.layout.target.hidden_size],
            "label": [len(rows)], "row": [len(rows)],
        }
        if meta.get("key") != self.key or meta.get("rows") != f"{rows.start}:{rows.stop}" or shapes != expected:
            log.warning("Cache shard %s does not match this cache's metadata; it will be rebuilt.", path.name)
            return False
        return True

    def missing_shards(self) -> list[int]:
        return [s for s in range(self.n_shards) if not self.shard_is_valid(s)]

    def write_shard(self, shard: int, expert: torch.Tensor, target: torch.Tensor, labels: torch.Tensor, rank: int = 0) -> None:
        """Write one shard atomically and append a line to the build log."""
        rows = self.shard_rows(shard)
        tensors = {
            "expert": expert.float().contiguous(), "target": target.float().contiguous(),
            "label": labels.long().contiguous(), "row": torch.arange(rows.start, rows.stop),
        }
        with atomic_path(self.shard_path(shard)) as tmp:
            save_file(tensors, str(tmp), metadata={"key": self.key, "rows": f"{rows.start}:{rows.stop}"})
        with open(self.directory / "build-log.jsonl", "a") as handle:
            handle.write(json.dumps({"shard": shard, "rank": rank, "pid": os.getpid(), "time": time.time()}) + "\n")

    def load(self) -> dict[str, torch.Tensor]:
        """All shards concatenated: ``expert``, ``target``, ``label`` in example order."""
        parts = [load_file(str(self.shard_path(s))) for s in range(self.n_shards)]
        return {name: torch.cat([p[name] for p in parts]) for name in ("expert", "target", "label")}


@contextlib.contextmanager
def shard_lock(cache: PairedCache, shard: int) -> Iterator[None]:
    """An exclusive advisory lock on one shard, so two runs sharing a cache never build it twice at once."""
    cache.directory.mkdir(parents=True, exist_ok=True)
    with open(cache.directory / f".shard-{shard:05d}.lock", "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def build_shards(
    cache: PairedCache,
    shards: Sequence[int],
    examples: Sequence[Example],
    extract: Callable[[str, list[Example], Callable[[int], None]], torch.Tensor],
    progress: Callable[[int], None],
    rank: int = 0,
) -> None:
    """Extract and write the given shards; ``extract(side, examples, on_batch)`` returns pooled states.

    Each shard is built under its lock and re-checked first: a shard another run finished meanwhile is reused.
    """
    for shard in shards:
        with shard_lock(cache, shard):
            if cache.shard_is_valid(shard):
                progress(2 * len(cache.shard_rows(shard)))
                continue
            _build_one(cache, shard, examples, extract, progress, rank)


def _build_one(cache: PairedCache, shard: int, examples, extract, progress, rank: int) -> None:
    chunk = [examples[i] for i in cache.shard_rows(shard)]
    expert = extract("expert", chunk, progress)
    target = extract("target", chunk, progress)
    cache.write_shard(shard, expert, target, torch.tensor([e.label for e in chunk]), rank=rank)
