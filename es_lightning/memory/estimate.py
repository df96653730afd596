"""Memory of each stage, estimated from sizes alone: host RAM and accelerator memory as a :class:`StageEstimate`.

Every function takes the compute ``device``: on ``cpu`` all bytes are host bytes; on an accelerator the
working set is device bytes and the host keeps what stays on it (loading passes the weights through host RAM).
The interpreter, torch and the libraries (about 0.5 GiB) are not counted, nor are the file-backed pages of memory-mapped
files (weights while they load, the cache's reads: reclaimable): host figures are the memory a stage allocates
(anonymous RSS on cpu, measured against these figures by ``benchmarks/bench_scale.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from es_lightning.memory.shapes import ModelShape, dtype_bytes

GIB = 2**30
KERNEL_COPIES = 3  # n x n float32 matrices alive at once in an RFM fit: distances, kernel and its gradient weights
ADAMW_COPIES = 5  # the weights, their gradients, AdamW's two moments and its step's temporaries (one copy's worth)
FLOAT32_SQUARES = 4  # d x d float32 matrices alive in an RFM fit: two models' M, the AGOP being summed, its scaled copy
FLOAT64_SQUARES = (
    5  # d x d float64 matrices alive at the RFM's end: the AGOP, its rescaled copy, eigh's output and work
)
CACHE_FIXES = (
    "fewer layers (data.expert.layers / data.target.layers)",
    "a half-precision cache (data.cache_dtype: bfloat16)",
    "fewer examples (data.data.limit)",
)


def gib(n_bytes: float) -> str:
    """``n_bytes`` as GiB with two decimals, e.g. ``1.50 GiB``."""
    return f"{n_bytes / GIB:.2f} GiB"


@dataclass(frozen=True)
class StageEstimate:
    """Expected peak memory of one stage. ``dominant``: the largest term, in words; ``fixes``: the config options
    that shrink it, named in :func:`es_lightning.memory.check.check_fits`'s error."""

    stage: str
    host_bytes: int
    device_bytes: int
    dominant: str
    fixes: tuple[str, ...] = ()
    disk_bytes: int = 0

    def format(self) -> str:
        """One line, e.g. ``rfm: host 0.41 GiB, device 0.00 GiB (dominant: ...)``."""
        disk = f", disk {gib(self.disk_bytes)}" if self.disk_bytes else ""
        return (
            f"{self.stage}: host {gib(self.host_bytes)}, device {gib(self.device_bytes)}{disk} "
            f"(dominant: {self.dominant})"
        )

    __str__ = format


def _on_accelerator(device: str | torch.device) -> bool:
    return torch.device(device).type != "cpu"


def _place(
    stage: str,
    host: dict[str, float],
    work: dict[str, float],
    device: str | torch.device,
    fixes: tuple[str, ...],
    disk: float = 0,
    note: str = "",
) -> StageEstimate:
    """Sum the named ``host`` terms on the host and the ``work`` terms on the device (on the host on cpu); the
    largest single term becomes ``dominant``."""
    terms = {**work, **host}
    name = max(terms, key=lambda term: terms[term])
    dominant = f"{name} {gib(terms[name])}" + (f"; {note}" if note else "")
    host_total, work_total = sum(host.values()), sum(work.values())
    if _on_accelerator(device):
        return StageEstimate(stage, int(host_total), int(work_total), dominant, fixes, int(disk))
    return StageEstimate(stage, int(host_total + work_total), 0, dominant, fixes, int(disk))


def _block_activations(model: ModelShape, tokens: int, rows: int, length: int, element: int) -> dict[str, float]:
    """One decoder block's working set under no_grad for ``rows`` texts of ``length`` tokens (``tokens`` in all):
    residual stream, attention projections, the MLP's hidden units, and the attention scores of the eager path
    (an upper bound: SDPA's fused kernels keep far less)."""
    projections = tokens * (4 * model.hidden + (model.heads + 2 * model.kv_heads) * model.head_dim) * element
    mlp = tokens * (3 if model.gated_mlp else 2) * model.intermediate * element
    scores = rows * model.heads * length * length * element
    return {"block activations": projections + mlp, "attention scores": scores}


def capture_estimate(
    model: ModelShape,
    dtype: str,
    captured_layers: int,
    deepest: int,
    batch_tokens: int,
    max_length: int,
    shard_rows: int,
    side: str = "expert",
    device: str | torch.device = "cpu",
) -> StageEstimate:
    """Extraction of one model (the other is not resident): its weights in ``dtype`` plus one batch of
    ``batch_tokens`` tokens (texts of up to ``max_length``) and the pooled float32 states of one shard on the host.
    No logits: the forward stops after block ``deepest``, so the LM head never runs."""
    element = dtype_bytes(dtype)
    rows = max(1, batch_tokens // max(1, max_length))
    work = {f"weights ({model.parameters / 1e9:.2f}B params in {dtype})": float(model.weight_bytes(dtype))}
    work.update(_block_activations(model, batch_tokens, rows, min(max_length, batch_tokens), element))
    host = {"pooled states of one shard": 2.0 * shard_rows * captured_layers * model.hidden * 4}  # rows, then stacked
    if _on_accelerator(device):
        host["weights passing through host RAM while loading"] = float(model.weight_bytes(dtype))
    fixes = (
        f"fewer or shallower layers (data.{side}.layers)",
        f"lower precision (data.{side}.dtype: bfloat16)",
        "a smaller token budget (data.extract_batch_tokens)",
        "a smaller model",
    )
    return _place(
        f"capture {side}", host, work, device, fixes, note=f"no logits: the forward stops after block {deepest}"
    )


def cache_bytes(
    n_rows: int,
    expert_layers: int,
    expert_hidden: int,
    target_layers: int,
    target_hidden: int,
    cache_dtype: str = "float32",
) -> int:
    """Bytes of a paired cache of ``n_rows`` rows in ``cache_dtype``: on disk, and resident once every row is read."""
    return n_rows * ((expert_layers * expert_hidden + target_layers * target_hidden) * dtype_bytes(cache_dtype) + 8)


def cache_estimate(
    n_rows: int,
    expert_layers: int,
    expert_hidden: int,
    target_layers: int,
    target_hidden: int,
    cache_dtype: str = "float32",
    shard_rows: int = 256,
) -> StageEstimate:
    """Writing the paired cache: one shard of float32 states and its converted copy on the host, :func:`cache_bytes`
    on disk. Reads are memory-mapped, so the whole cache is resident only if a stage reads every row and layer (the
    page cache can reclaim it); the stages' estimates count what they read."""
    total = cache_bytes(n_rows, expert_layers, expert_hidden, target_layers, target_hidden, cache_dtype)
    widest = max(expert_layers * expert_hidden, target_layers * target_hidden)
    shard = {"one shard being written": min(shard_rows, n_rows) * widest * (4.0 + dtype_bytes(cache_dtype))}
    note = f"{n_rows} rows in {cache_dtype}: {gib(total)} on disk, resident only as far as stages read it"
    return _place("cache", shard, {}, "cpu", CACHE_FIXES, disk=total, note=note)


def pair_search_estimate(
    n_fit: int,
    n_heldout: int,
    expert_layers: int,
    expert_hidden: int,
    target_layers: int,
    target_hidden: int,
    max_components: int = 256,
    max_rows: int | None = 4000,
    top_k: int = 3,
) -> StageEstimate:
    """The layer-pair search (numpy float64, host only). Kept until it returns, for every layer: its fit and held-out
    rows' principal-component scores, (n_fit + n_heldout) x p, and its principal directions, d x p (p =
    ``min(max_components, n_fit)``). Alive briefly: one layer at full width while it is reduced (its rows, their
    centred copy and its square, the n_fit x n_fit Gram with its eigenvectors; only the top p directions are formed),
    and the target scores and maps of one expert layer while it is scored. At the end, with every layer still kept,
    the ``top_k`` chosen pairs' maps expanded to full width: d_T x d_E float32 each, one float64 product at a time."""
    n_fit = min(n_fit, max_rows) if max_rows else n_fit
    rows, width = n_fit + n_heldout, max(expert_hidden, target_hidden)
    components = min(max_components, n_fit, width)
    small = min(n_fit, width)
    terms = {
        "principal directions of every layer (d x p, float64)": components
        * (expert_layers * expert_hidden + target_layers * target_hidden)
        * 8.0,
        "PCA-reduced rows of every layer": rows * components * (expert_layers + target_layers) * 8.0,
        "one layer at full width (float64)": (3 * rows * width + 3 * small**2) * 8.0,
        "one expert layer's maps and target scores": (rows + components) * components * target_layers * 8.0,
        f"full-width maps of the {top_k} chosen pairs": (top_k * 4.0 + 8) * expert_hidden * target_hidden,
    }
    fixes = (
        "fewer principal components (model.pairing.max_components)",
        "fewer rows (model.pairing.max_rows)",
        "fewer layers (data.expert.layers / data.target.layers)",
    )
    return _place("pair search", terms, {}, "cpu", fixes)


def autoencoder_estimate(
    pairs: int,
    expert_hidden: int,
    target_hidden: int,
    batch_size: int,
    n_train: int,
    device: str | torch.device = "cpu",
) -> StageEstimate:
    """Auto-encoders of the chosen pairs, in two phases. Setup, on the host in float64 whatever the device: the
    weights (2 x k x d_T x d_E float32) and the closed-form seed of one pair at a time (its standardised train rows,
    and per ridge solve the Gram, identity, regularised copy and factor, d x d each, beside the d_E x d_T right-hand
    side, solution and kept encoder). Training, on the trainer's device: the weights with gradients, AdamW's two
    moments and its step's temporaries (about one more copy), and a batch. On cpu the larger phase is the peak. The
    cached rows are counted by :func:`cache_estimate`."""
    weights = pairs * (2.0 * expert_hidden * target_hidden + expert_hidden + target_hidden) * 4
    widest = max(expert_hidden, target_hidden)
    setup = {
        "weights": weights,
        "closed-form seed (float64)": (
            n_train * (3 * expert_hidden + 2 * target_hidden) + 4 * widest**2 + 3 * expert_hidden * target_hidden
        )
        * 8.0,
    }
    training = {
        f"weights, gradients, AdamW state and step of {pairs} pair(s)": ADAMW_COPIES * weights,
        "batch": batch_size * pairs * (expert_hidden + target_hidden) * 4.0 * 4,
    }
    fixes = ("fewer pairs (model.pairing.top_k)", "a smaller batch (data.batch_size)")
    if _on_accelerator(device):
        return _place("auto-encoders", setup, training, device, fixes)
    peak, phase = (
        (training, "training") if sum(training.values()) >= sum(setup.values()) else (setup, "closed-form seed")
    )
    return _place("auto-encoders", peak, {}, "cpu", fixes, note=f"peak phase: {phase}")


def rfm_estimate(
    n_rows: int,
    width: int,
    max_rows: int | None = 10_000,
    val_fraction: float = 0.2,
    device: str | torch.device = "cpu",
    inputs_bytes: float = 0,
) -> StageEstimate:
    """One RFM fit on ``min(n_rows, max_rows)`` rows of width d. On the device, float32: the n_train^2 Laplace kernel
    (:data:`KERNEL_COPIES` such matrices at once), the train x val kernel, the features, and the d x d Mahalanobis
    matrices and AGOP (:data:`FLOAT32_SQUARES` alive). On the host, float64: the features and their standardised
    copy, and the AGOP mapped back to the original coordinates with its eigendecomposition (:data:`FLOAT64_SQUARES`
    d x d matrices: two scaled copies, the eigenvectors, eigh's workspace of two). ``inputs_bytes``: the caller's
    float32 states of the steered layers (train rows of both models), held on the host meanwhile."""
    n = min(n_rows, max_rows) if max_rows else n_rows
    n_train = math.ceil((1 - val_fraction) * n)
    kernel = float(n_train) ** 2 * 4
    work = {
        f"kernel n^2 x 4 B ({KERNEL_COPIES} x {gib(kernel)} at n_train={n_train})": KERNEL_COPIES * kernel,
        "validation kernel": float(n - n_train) * n_train * 4,
        "features": n * width * 4.0 * 2,
        "Mahalanobis matrices and AGOP (float32)": FLOAT32_SQUARES * width**2 * 4.0,
    }
    host = {
        "float64 features and their standardised copy": n * width * 8.0 * 2,
        "AGOP in float64 and its eigendecomposition": FLOAT64_SQUARES * width**2 * 8.0,
    }
    if inputs_bytes:
        host["states of the steered layers"] = float(inputs_bytes)
    fixes = ("fewer rows (model.vectors.rfm_options.max_rows)",)
    return _place("rfm", host, work, device, fixes)


def evaluation_estimate(
    model: ModelShape,
    dtype: str,
    batch_choices: int,
    prompt_tokens: int,
    completion_tokens: int,
    device: str | torch.device = "cpu",
    generation_rows: int = 0,
    generation_tokens: int = 0,
) -> StageEstimate:
    """Scoring multiple-choice questions with the target: its weights, the prompts' KV cache, one batch's block
    activations, and the completion logits batch x completion x vocab (upcast to float32, with a logsumexp copy).
    With generated answers evaluated (``generation_rows`` per pass, ``generation_tokens`` each), the damage
    measurement's log-softmax over ``rows x tokens x vocab`` (the unsteered reference for half the rows, the steered
    rows and two float32 temporaries) replaces the scoring logits when it is larger."""
    element = dtype_bytes(dtype)
    length = prompt_tokens + completion_tokens
    work = {f"weights ({model.parameters / 1e9:.2f}B params in {dtype})": float(model.weight_bytes(dtype))}
    work.update(_block_activations(model, batch_choices * length, batch_choices, length, element))
    scoring_logits = batch_choices * (completion_tokens + 1) * model.vocab * 4.0 * 2
    damage_logits = (generation_rows // 2 + 3 * generation_rows) * (generation_tokens + 1) * model.vocab * 4.0
    if damage_logits > scoring_logits:
        work["damage-measurement log-probs (float32)"] = damage_logits
    else:
        work["logits (float32)"] = scoring_logits
    work["KV cache"] = (
        batch_choices * prompt_tokens * model.layers * 2 * model.kv_heads * model.head_dim * float(element)
    )
    host = (
        {"weights passing through host RAM while loading": float(model.weight_bytes(dtype))}
        if _on_accelerator(device)
        else {}
    )
    fixes: tuple[str, ...] = (
        "lower precision (model.target_dtype: bfloat16)",
        "a smaller batch (model.evaluation.batch_size)",
        "a smaller model",
    )
    if damage_logits > scoring_logits:
        fixes += ("fewer generation rows per pass (model.evaluation.generation.batch_size)",)
    return _place("evaluation", host, work, device, fixes)
