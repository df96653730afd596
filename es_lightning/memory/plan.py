"""Every stage's estimate for one run, from a few settings: what benchmarks, the README and pre-flight checks print."""

from __future__ import annotations

from dataclasses import dataclass

from es_lightning.memory.estimate import (
    StageEstimate,
    autoencoder_estimate,
    cache_estimate,
    capture_estimate,
    evaluation_estimate,
    pair_search_estimate,
    rfm_estimate,
)
from es_lightning.memory.shapes import ModelShape


@dataclass
class RunSettings:
    """The sizes of a run that memory depends on. Layer counts are the captured blocks; ``*_deepest`` the deepest
    captured block index; ``n_train``/``n_heldout``/``n_test``: labelled rows of the train, val and test splits (choice
    texts; every split is cached). A capture batch holds at most ``extract_batch_size`` texts and
    ``extract_batch_tokens`` padded tokens."""

    n_train: int
    n_heldout: int
    expert_layers: int
    expert_deepest: int
    target_layers: int
    target_deepest: int
    n_test: int = 0
    expert_dtype: str = "float32"
    target_dtype: str = "float32"
    cache_dtype: str = "float32"
    extract_batch_tokens: int | None = 4096
    extract_batch_size: int | None = None  # None: the token budget alone bounds a batch
    max_length: int = 256
    shard_rows: int = 256
    max_components: int = 256
    pairing_max_rows: int | None = 4000
    top_k: int = 3
    batch_size: int = 64
    rfm_max_rows: int | None = 10_000
    eval_batch: int = 16
    prompt_tokens: int = 64
    completion_tokens: int = 16
    device: str = "cpu"


def estimate_stages(expert: ModelShape, target: ModelShape, s: RunSettings) -> list[StageEstimate]:
    """Capture (each model alone), cache, pair search, auto-encoders, RFM (the wider side, with the steered layers'
    train states held) and evaluation scoring."""
    n_rows = s.n_train + s.n_heldout + s.n_test
    bounds = [b for b in (s.extract_batch_tokens, s.extract_batch_size and s.extract_batch_size * s.max_length) if b]
    batch_tokens = min(bounds, default=s.max_length)
    steered_states = s.n_train * s.top_k * (expert.hidden + target.hidden) * 4
    return [
        capture_estimate(
            expert,
            s.expert_dtype,
            s.expert_layers,
            s.expert_deepest,
            batch_tokens,
            s.max_length,
            s.shard_rows,
            "expert",
            s.device,
        ),
        capture_estimate(
            target,
            s.target_dtype,
            s.target_layers,
            s.target_deepest,
            batch_tokens,
            s.max_length,
            s.shard_rows,
            "target",
            s.device,
        ),
        cache_estimate(
            n_rows, s.expert_layers, expert.hidden, s.target_layers, target.hidden, s.cache_dtype, s.shard_rows
        ),
        pair_search_estimate(
            s.n_train,
            s.n_heldout,
            s.expert_layers,
            expert.hidden,
            s.target_layers,
            target.hidden,
            s.max_components,
            s.pairing_max_rows,
            s.top_k,
        ),
        autoencoder_estimate(s.top_k, expert.hidden, target.hidden, s.batch_size, s.n_train, s.device),
        rfm_estimate(
            s.n_train, max(expert.hidden, target.hidden), s.rfm_max_rows, device=s.device, inputs_bytes=steered_states
        ),
        evaluation_estimate(target, s.target_dtype, s.eval_batch, s.prompt_tokens, s.completion_tokens, s.device),
    ]
