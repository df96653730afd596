"""The paired hidden-state cache: both models' pooled block outputs for the same examples, in shards.

Layout under ``<cache_dir>/paired/<key>/``: ``meta.json`` (what the key covers, sizes, storage dtype) and per shard
one file per model, ``shard-NNNNN.expert.safetensors`` (``states [n, L_E, d_E]``) and
``shard-NNNNN.target.safetensors`` (``states [n, L_T, d_T]``), each with ``label [n]`` and ``row [n]``; states are
stored in ``dtype`` (float32, bfloat16 or float16) and read back as float32 (:mod:`es_lightning.data.store`).
One file per model lets extraction run one model at a time over every shard. ``build-log.jsonl`` has one line
per shard side extracted. Every file is written to a temporary name and renamed, so readers never see half a
file and two runs that build the same shard at once both leave a whole one.
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
from safetensors.torch import save_file

from es_lightning.data.examples import Example
from es_lightning.io import atomic_path, atomic_write_json, sha256_json
from es_lightning.models.loading import dtype_name
from es_lightning.models.spec import ModelInfo, ModelSpec
from es_lightning.stopping import check_stop

log = logging.getLogger(__name__)

CACHE_FORMAT = 2
SIDES = ("expert", "target")
CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CacheDtypeError(ValueError):
    """A cache written in one storage precision, read with another."""


def check_cache_dtype(name: str) -> torch.dtype:
    """The torch dtype of a ``cache_dtype`` setting, with a clear error for anything else."""
    if name not in CACHE_DTYPES:
        raise ValueError(f"cache_dtype={name!r} is not supported: use one of {list(CACHE_DTYPES)}.")
    return CACHE_DTYPES[name]


def dtype_mismatch(found: str, expected: str, where: str, alternative: str = "") -> CacheDtypeError:
    """The error for a cache stored in ``found`` read by a run configured for ``expected``."""
    alternative = alternative or f"delete it to rebuild it in {expected}"
    return CacheDtypeError(
        f"{where} stores hidden states in {found}, but this run reads the cache as {expected} (data.cache_dtype). "
        f"Fix: set data.cache_dtype: {found}, or {alternative}."
    )


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

    def describe(self) -> str:
        """Both models with their weights' fingerprints and layers, for messages."""
        return " and ".join(
            f"{side} {info.name} (weights {info.fingerprint}) layers {list(info.layers)}"
            for side, info in (("expert", self.expert), ("target", self.target))
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PairedLayout:
        expert = dict(data["expert"], layers=tuple(data["expert"]["layers"]))
        target = dict(data["target"], layers=tuple(data["target"]["layers"]))
        return cls(ModelInfo(**expert), ModelInfo(**target), data["pooling"])


def examples_fingerprint(examples: Sequence[Example]) -> str:
    """Hash of every example's id, group, texts and label."""
    return sha256_json([[e.id, e.group, e.prompt, e.completion, e.label] for e in examples])


def cache_key(
    layout: PairedLayout, expert: ModelSpec, target: ModelSpec, data_fingerprint: str, dtype: str = "float32"
) -> str:
    """A key that changes whenever anything that affects the cached numbers changes."""

    def model_part(info: ModelInfo, spec: ModelSpec) -> dict:
        return {
            "fingerprint": info.fingerprint,
            "layers": list(info.layers),
            "chat_template": spec.chat_template,
            "dtype": dtype_name(spec.dtype),
            "max_length": spec.max_length,
            "block_path": spec.block_path,
        }

    return sha256_json(
        {
            "format": CACHE_FORMAT,
            "pooling": layout.pooling,
            "data": data_fingerprint,
            "cache_dtype": dtype,
            "expert": model_part(layout.expert, expert),
            "target": model_part(layout.target, target),
        }
    )[:20]


class PairedCache:
    """Shards of paired hidden states for ``n`` examples under one key, stored in ``dtype``."""

    def __init__(
        self, root: str | Path, key: str, n_examples: int, shard_size: int, layout: PairedLayout, dtype: str = "float32"
    ):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}.")
        self.storage = check_cache_dtype(dtype)
        self.directory = Path(root) / "paired" / key
        self.key = key
        self.n_examples = n_examples
        self.shard_size = shard_size
        self.layout = layout
        self.dtype = dtype

    @property
    def n_shards(self) -> int:
        return (self.n_examples + self.shard_size - 1) // self.shard_size

    def shard_rows(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.n_examples))

    def shard_path(self, shard: int, side: str) -> Path:
        return self.directory / f"shard-{shard:05d}.{side}.safetensors"

    def info(self, side: str):
        """The :class:`ModelInfo` of one side."""
        return self.layout.expert if side == "expert" else self.layout.target

    def write_meta(self, extra: dict) -> None:
        """Write ``meta.json`` (atomic; identical content from every writer)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            self.directory / "meta.json",
            {
                "format": CACHE_FORMAT,
                "key": self.key,
                "n_examples": self.n_examples,
                "shard_size": self.shard_size,
                "cache_dtype": self.dtype,
                "layout": self.layout.to_dict(),
                **extra,
            },
        )

    def check_meta(self) -> None:
        """Refuse a cache folder whose ``meta.json`` names another storage dtype than this run's."""
        path = self.directory / "meta.json"
        if path.exists():
            found = json.loads(path.read_text()).get("cache_dtype", "float32")
            if found != self.dtype:
                raise dtype_mismatch(found, self.dtype, f"The cache {self.directory}")

    def shard_is_valid(self, shard: int, side: str) -> bool:
        """True if one side's shard file exists, opens, and its metadata and shapes match this cache.

        A shard stored in another dtype than this cache's is a :class:`CacheDtypeError`, not a silent rebuild.
        """
        path = self.shard_path(shard, side)
        if not path.exists():
            return False
        rows = self.shard_rows(shard)
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                shapes = {name: handle.get_slice(name).get_shape() for name in handle.keys()}
                stored = handle.get_slice("states").get_dtype() if "states" in shapes else None
        except Exception as err:  # noqa: BLE001 - any unreadable shard is rebuilt
            log.warning("Cache shard %s is unreadable (%s); it will be rebuilt.", path.name, err)
            return False
        if meta.get("key") == self.key and meta.get("dtype", "float32") != self.dtype:
            raise dtype_mismatch(meta.get("dtype", "float32"), self.dtype, f"Cache shard {path}")
        info = self.info(side)
        expected = {"states": [len(rows), len(info.layers), info.hidden_size], "label": [len(rows)], "row": [len(rows)]}
        if (
            meta.get("key") != self.key
            or meta.get("rows") != f"{rows.start}:{rows.stop}"
            or shapes != expected
            or stored != _SAFETENSORS_DTYPES[self.dtype]
        ):
            log.warning("Cache shard %s does not match this cache's metadata; it will be rebuilt.", path.name)
            return False
        return True

    def describe_finished(self) -> str:
        """How many shard files are whole, e.g. ``3 of 8 shard files of the cache <dir>`` (what a stop keeps)."""
        done = sum(self.shard_is_valid(shard, side) for shard in range(self.n_shards) for side in SIDES)
        return f"{done} of {len(SIDES) * self.n_shards} shard files of the cache {self.directory}"

    def missing_shards(self, side: str | None = None) -> list[int]:
        """Shards lacking a valid file for ``side`` (either side when None)."""
        sides = SIDES if side is None else (side,)
        return [s for s in range(self.n_shards) if not all(self.shard_is_valid(s, x) for x in sides)]

    def write_shard(self, shard: int, side: str, states: torch.Tensor, labels: torch.Tensor, rank: int = 0) -> None:
        """Write one side of one shard atomically (states in the cache's dtype) and append a line to the build log."""
        rows = self.shard_rows(shard)
        if not torch.isfinite(states).all():
            raise FloatingPointError(
                f"Non-finite {side} hidden states in shard {shard}; load the model in float32 or bfloat16."
            )
        stored = states.to(self.storage)
        if not torch.isfinite(stored).all():
            raise FloatingPointError(
                f"The {side} hidden states of shard {shard} overflow {self.dtype} (largest magnitude "
                f"{float(states.abs().max()):.3g}). Fix: set data.cache_dtype: bfloat16 or float32."
            )
        tensors = {
            "states": stored.contiguous(),
            "label": labels.long().contiguous(),
            "row": torch.arange(rows.start, rows.stop),
        }
        metadata = {"key": self.key, "rows": f"{rows.start}:{rows.stop}", "side": side, "dtype": self.dtype}
        with atomic_path(self.shard_path(shard, side)) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        with open(self.directory / "build-log.jsonl", "a") as handle:
            handle.write(
                json.dumps({"shard": shard, "side": side, "rank": rank, "pid": os.getpid(), "time": time.time()}) + "\n"
            )


_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


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


def build_side(
    cache: PairedCache,
    side: str,
    shards: Sequence[int],
    examples: Sequence[Example],
    extract: Callable[[list[Example], Callable[[int], None]], torch.Tensor],
    progress: Callable[[int], None],
    rank: int = 0,
) -> None:
    """Extract and write one side of the given shards; ``extract(examples, on_batch)`` returns pooled states.

    Each shard is built under its lock and re-checked first: a shard another run finished meanwhile is reused.
    A stop signal (or another rank's failure) ends the loop between shards (:func:`es_lightning.stopping.check_stop`).
    """
    for shard in shards:
        check_stop()
        with shard_lock(cache, shard):
            if cache.shard_is_valid(shard, side):
                progress(len(cache.shard_rows(shard)))
                continue
            chunk = [examples[i] for i in cache.shard_rows(shard)]
            cache.write_shard(shard, side, extract(chunk, progress), torch.tensor([e.label for e in chunk]), rank=rank)
