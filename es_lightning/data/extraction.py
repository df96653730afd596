"""Build or reuse a paired cache, one model at a time: load the expert, extract every missing shard's expert side,
free it, then the same for the target. The two models are never resident together.

Under DDP, rank 0 checks the cache (memory, disk, its metadata) while the other ranks wait, then every rank builds
its shards; a refusal or an error on any rank stops every rank at once (:mod:`es_lightning.stopping`). A stop
signal ends extraction between batches; finished shard files are kept and a rerun builds only the others."""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from tqdm.auto import tqdm

from es_lightning.data.cache import SIDES, PairedCache, PairedLayout, build_side, cache_key, examples_fingerprint
from es_lightning.data.examples import Example
from es_lightning.data.store import CacheStore
from es_lightning.io import ensure_writable_dir
from es_lightning.memory import announce, cache_estimate, capture_estimate, read_shape
from es_lightning.models import loading
from es_lightning.models.capture import Pooling, capture_texts
from es_lightning.models.spec import ModelSpec
from es_lightning.stopping import on_every_rank, on_rank_zero, stage

log = logging.getLogger(__name__)


@dataclass
class Extraction:
    """What extraction needs: both models' specs, the layout, where and how the cache is stored, batch limits.

    ``batch_size`` caps the rows of an extraction batch, ``batch_tokens`` (None: rows only) its padded tokens.
    ``rank``/``world``: under DDP each rank builds the shards ``s`` with ``s % world == rank``.
    """

    expert: ModelSpec
    target: ModelSpec
    layout: PairedLayout
    cache_dir: Path
    shard_size: int
    dtype: str = "float32"
    batch_size: int = 16
    batch_tokens: int | None = 4096
    progress: bool = True
    device: str | torch.device = "cpu"
    rank: int = 0
    world: int = 1

    def cache_for(self, examples: Sequence[Example]) -> PairedCache:
        """The cache (not yet checked) of these examples under this configuration."""
        key = cache_key(self.layout, self.expert, self.target, examples_fingerprint(examples), self.dtype)
        return PairedCache(self.cache_dir, key, len(examples), self.shard_size, self.layout, self.dtype)

    def ensure(self, examples: list[Example], what: str) -> CacheStore:
        """Build the missing shards of this rank (expert side, then target side) and return a store of the cache."""
        cache = self.cache_for(examples)
        with stage(f"building the {what} cache", kept=cache.describe_finished):
            missing = on_rank_zero(lambda: self._prepare(cache, examples, what), f"rank 0's check of the {what} cache")
            on_every_rank(lambda: self._build_mine(cache, missing, examples, what), f"every rank's {what} cache shards")
        any_missing = sorted(set(missing["expert"]) | set(missing["target"]))
        if self.rank == 0:
            state = (
                "built"
                if len(any_missing) == cache.n_shards
                else f"resumed ({len(any_missing)} of {cache.n_shards} shards built)"
                if any_missing
                else "reused"
            )
            log.info(
                "Paired %s cache %s: %s (%d examples, %s)", what, state, cache.directory, len(examples), self.dtype
            )
        still = cache.missing_shards()
        if still:
            raise RuntimeError(
                f"Cache shards {still} are still missing after extraction in {cache.directory}; "
                "check the logs of every rank."
            )
        return CacheStore(cache)

    def _prepare(self, cache: PairedCache, examples: list[Example], what: str) -> dict[str, list[int]]:
        """Rank 0: the missing shards of each side; if any, refuse a cache that will not fit in memory or on disk,
        then write its metadata."""
        cache.check_meta()
        missing = {side: cache.missing_shards(side) for side in SIDES}
        if missing["expert"] or missing["target"]:
            expert, target = self.layout.expert, self.layout.target
            estimate = announce(
                cache_estimate(
                    len(examples),
                    len(expert.layers),
                    expert.hidden_size,
                    len(target.layers),
                    target.hidden_size,
                    self.dtype,
                    self.shard_size,
                )
            )
            # the disk: writable, and room for the whole cache with 10% headroom
            ensure_writable_dir(cache.directory.parent, min_free_bytes=int(estimate.disk_bytes * 1.1), what="cache")
            cache.write_meta({"what": what})
        return missing

    def _build_mine(
        self, cache: PairedCache, missing: dict[str, list[int]], examples: list[Example], what: str
    ) -> None:
        """Build this rank's share of the missing shards, one model at a time."""
        for side in SIDES:
            mine = [s for s in missing[side] if s % self.world == self.rank]
            if mine:
                self._build(cache, side, mine, examples, what)

    def _build(self, cache: PairedCache, side: str, shards: list[int], examples: list[Example], what: str) -> None:
        spec = self.expert if side == "expert" else self.target
        info = self.layout.expert if side == "expert" else self.layout.target
        announce(
            capture_estimate(
                read_shape(info.directory, info.name),
                spec.dtype,
                len(info.layers),
                max(info.layers),
                self.batch_tokens or self.batch_size * spec.max_length,
                spec.max_length,
                self.shard_size,
                side,
                self.device,
            ),
            self.device,
        )
        loaded: loading.LoadedModel | None = self._load(spec, side)
        try:
            todo = sum(len(cache.shard_rows(s)) for s in shards)
            with tqdm(
                total=todo,
                desc=f"Extracting {what} {side} hidden states (rank {self.rank})",
                disable=not self.progress,
                unit="text",
            ) as bar:
                build_side(
                    cache,
                    side,
                    shards,
                    examples,
                    lambda chunk, on_batch: self._extract(loaded, side, chunk, on_batch),
                    bar.update,
                    rank=self.rank,
                )
        finally:
            loaded = None  # the last reference (the lambda shares it): the model can be freed
            free_memory(self.device)

    def _load(self, spec: ModelSpec, side: str) -> loading.LoadedModel:
        """One model, converted into the model cache first if it is a GGUF (a stop discards a partial conversion)."""
        with stage(f"loading the {side} model"):
            return loading.load_model(spec.name, self.cache_dir, spec.dtype, device=self.device)

    def _extract(self, loaded, side: str, examples: list[Example], on_batch) -> torch.Tensor:
        from es_lightning.models.prompting import render_example

        spec = self.expert if side == "expert" else self.target
        info = self.layout.expert if side == "expert" else self.layout.target
        texts = [render_example(loaded.tokenizer, e.prompt, e.completion, spec.chat_template) for e in examples]
        pooling = cast(Pooling, self.layout.pooling)  # a str field; capture rejects anything but "last"/"mean"
        states, truncated = capture_texts(
            loaded.model,
            loaded.tokenizer,
            texts,
            list(info.layers),
            pooling,
            spec.max_length,
            self.batch_size,
            add_special_tokens=not spec.chat_template,
            block_path=spec.block_path,
            on_batch=on_batch,
            batch_tokens=self.batch_tokens,
        )
        if truncated:
            log.warning(
                "%d of %d texts exceed %s max_length=%d tokens for %s and were truncated from the left "
                "(raise max_length to keep them whole).",
                truncated,
                len(texts),
                side,
                spec.max_length,
                spec.name,
            )
        return states


def free_memory(device: str | torch.device) -> None:
    """Return freed model memory: a garbage collection, and the CUDA cache when on a GPU."""
    gc.collect()
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
