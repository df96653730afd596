"""Step 3 of ExpertSteer and its baselines: one unit steering vector per steered target layer.

Every method has the same signature, so evaluation can compare them on equal terms:

- ``expertsteer``: RFM on the expert's layer-i states, mapped into target space by the encoder's linear
  part (not its bias), re-normalised;
- ``rfm_self``: RFM on the target's own layer-j states (self-steering baseline);
- ``mean_difference``: mean of label-1 minus label-0 target states (CAA-style baseline);
- ``random``: a random unit vector per layer (control).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from es_lightning.memory import announce, rfm_estimate
from es_lightning.steering.options import METHODS, Method, RFMOptions, check_methods
from es_lightning.steering.rfm import fit_rfm

log = logging.getLogger(__name__)


@dataclass
class VectorConfig:
    """Which steering-vector methods run and how: the one place for methods, RFM options and seed, read by the
    fit's bundles and by every evaluation fold. ``rfm_options`` go to :func:`es_lightning.steering.rfm.fit_rfm`."""

    methods: list[Method] = field(default_factory=lambda: list(METHODS))
    """Which methods make vectors (bundles and evaluation rows), in report order."""
    rfm_options: RFMOptions = field(default_factory=RFMOptions)
    """The RFM's settings, for ``expertsteer`` and ``rfm_self``."""
    seed: int = 0
    """Seed of the RFM's splits and of ``random``; a fold adds its index."""

    def __post_init__(self) -> None:
        self.rfm_options = RFMOptions.of(self.rfm_options)

    def validate(self) -> None:
        """Refuse unknown methods before any model is loaded (unknown RFM options are refused on construction)."""
        check_methods(self.methods, "vectors.methods")


@dataclass
class VectorInputs:
    """What every method may use: labelled train-split states of both models and the encoder map."""

    expert: torch.Tensor  # [n, len(expert_layers), d_E] raw pooled states (only the layers the pairs need)
    target: torch.Tensor  # [n, len(target_layers), d_T]
    labels: torch.Tensor  # [n] 0/1
    expert_layers: Sequence[int]
    target_layers: Sequence[int]
    encoder_linear: Callable[[int], torch.Tensor] | None = None  # expert layer -> [d_T, d_E]
    rfm_options: RFMOptions = field(default_factory=RFMOptions)
    seed: int = 0
    groups: Sequence | None = None  # one key per row (the question): the RFM's validation split takes whole groups
    device: str | torch.device = (
        "cpu"  # where the RFM's kernels live (the trainer's root device); rfm_options.device overrides
    )

    def __post_init__(self) -> None:
        self.rfm_options = RFMOptions.of(self.rfm_options)


def _rfm(states: torch.Tensor, inputs: VectorInputs):
    """One RFM fit of ``states`` [n, d] with the inputs' labels, groups, seed and options, on their device."""
    device = inputs.rfm_options.device or inputs.device
    return fit_rfm(
        states,
        inputs.labels,
        seed=inputs.seed,
        groups=inputs.groups,
        device=device,
        **inputs.rfm_options.fit_arguments(),
    )


def _announce_rfm(inputs: VectorInputs, width: int) -> None:
    """Log the memory one RFM fit needs (its n^2 kernel, its d x d matrices, the states held meanwhile) and refuse it
    when it will not fit."""
    options = inputs.rfm_options
    device = options.device or inputs.device
    held = sum(states.numel() * states.element_size() for states in (inputs.expert, inputs.target))
    announce(rfm_estimate(len(inputs.labels), width, options.max_rows, options.val_fraction, device, held), device)


@dataclass
class MethodResult:
    """Unit vectors per target layer plus per-layer diagnostics (e.g. RFM validation AUC)."""

    vectors: dict[int, torch.Tensor]
    diagnostics: dict[int, dict[str, float]] = field(default_factory=dict)


def _unit(v: torch.Tensor) -> torch.Tensor:
    norm = v.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("A steering direction came out zero or non-finite; check the hidden states for NaN/Inf.")
    return (v / norm).float()


def _expert(inputs: VectorInputs, i: int) -> torch.Tensor:
    return inputs.expert[:, list(inputs.expert_layers).index(i)]


def _target(inputs: VectorInputs, j: int) -> torch.Tensor:
    return inputs.target[:, list(inputs.target_layers).index(j)]


def expertsteer(pairs: Sequence[tuple[int, int]], inputs: VectorInputs) -> MethodResult:
    """RFM direction on expert layer i, mapped by f_i's linear part into target layer j's space."""
    if inputs.encoder_linear is None:
        raise ValueError(
            "expertsteer needs the trained encoder (encoder_linear); fit the alignment auto-encoder first."
        )
    out = MethodResult({})
    _announce_rfm(inputs, inputs.expert.shape[-1])
    for i, j in pairs:
        fit = _rfm(_expert(inputs, i), inputs)
        weight = inputs.encoder_linear(i)
        if weight.shape[1] != fit.direction.shape[0]:
            raise ValueError(
                f"The encoder of expert layer {i} expects width {weight.shape[1]}, "
                f"but its states have width {fit.direction.shape[0]}."
            )
        mapped = weight.float() @ fit.direction
        out.vectors[j] = _unit(mapped)
        out.diagnostics[j] = {"expert_layer": i, "rfm_val_score": fit.val_score, "rfm_top_fraction": fit.top_fraction}
    return out


def rfm_self(pairs: Sequence[tuple[int, int]], inputs: VectorInputs) -> MethodResult:
    """RFM direction on the target's own layer-j states."""
    out = MethodResult({})
    _announce_rfm(inputs, inputs.target.shape[-1])
    for _, j in pairs:
        fit = _rfm(_target(inputs, j), inputs)
        out.vectors[j] = _unit(fit.direction)
        out.diagnostics[j] = {"rfm_val_score": fit.val_score, "rfm_top_fraction": fit.top_fraction}
    return out


def mean_difference(pairs: Sequence[tuple[int, int]], inputs: VectorInputs) -> MethodResult:
    """Mean of label-1 minus mean of label-0 target states (contrastive activation addition)."""
    out = MethodResult({})
    positive = inputs.labels == 1
    for _, j in pairs:
        states = _target(inputs, j)
        out.vectors[j] = _unit(states[positive].mean(0) - states[~positive].mean(0))
    return out


def random_directions(layers: Sequence[int], width: int, seed: int) -> dict[int, torch.Tensor]:
    """A seeded random unit vector (uniform on the sphere) per target layer: one draw of the random control."""
    generator = torch.Generator().manual_seed(seed)
    return {j: _unit(torch.randn(width, generator=generator)) for j in layers}


def random_vectors(pairs: Sequence[tuple[int, int]], inputs: VectorInputs) -> MethodResult:
    """A seeded random unit vector per steered target layer (control)."""
    return MethodResult(random_directions([j for _, j in pairs], inputs.target.shape[-1], inputs.seed))


REGISTRY: Mapping[str, Callable[[Sequence[tuple[int, int]], VectorInputs], MethodResult]] = {
    "expertsteer": expertsteer,
    "rfm_self": rfm_self,
    "mean_difference": mean_difference,
    "random": random_vectors,
}


def compute_vectors(method: str, pairs: Sequence[tuple[int, int]], inputs: VectorInputs) -> MethodResult:
    """Run one method over the chosen pairs; labels must hold both classes."""
    if method not in REGISTRY:
        raise ValueError(f"Unknown steering-vector method {method!r}: use one of {list(REGISTRY)}.")
    if not pairs:
        raise ValueError("No layer pairs to compute vectors for; run the layer pairing first.")
    labels = inputs.labels
    if set(labels.unique().tolist()) != {0, 1}:
        raise ValueError(f"Steering vectors need labels 0 and 1, got {sorted(set(labels.unique().tolist()))}.")
    for name, tensor in (("expert", inputs.expert), ("target", inputs.target)):
        bad = ~torch.isfinite(tensor).all(dim=(0, 2))
        if bad.any():
            raise ValueError(
                f"The {name} hidden states hold NaN/Inf at cached layer positions "
                f"{bad.nonzero().flatten().tolist()}; rebuild the cache in float32."
            )
    return REGISTRY[method](pairs, inputs)


def layer_norms(target: torch.Tensor, target_layers: Sequence[int], layers: Sequence[int]) -> dict[int, float]:
    """Mean hidden-state norm of each steered target layer, so coefficients are relative to it."""
    return {j: float(target[:, list(target_layers).index(j)].norm(dim=-1).mean()) for j in layers}


@dataclass(frozen=True)
class VectorSet:
    """Step 3's result for one set of pairs: each method's unit vector per steered target layer, each layer's mean
    hidden-state norm (coefficients are relative to it), and per method its diagnostics and seconds."""

    vectors: dict[str, dict[int, torch.Tensor]]
    norms: dict[int, float]
    diagnostics: dict[str, dict[str, dict[str, float]]]
    seconds: dict[str, float]


def compute_vector_set(methods: Sequence[str], pairs: Sequence[tuple[int, int]], inputs: VectorInputs) -> VectorSet:
    """Every method's vectors for ``pairs`` from ``inputs``: the one function the fit's bundles and every evaluation
    fold call, so both compute vectors and norms the same way."""
    vectors, diagnostics, seconds = {}, {}, {}
    for method in methods:
        start = time.perf_counter()
        result = compute_vectors(method, pairs, inputs)
        vectors[method] = result.vectors
        diagnostics[method] = {str(k): v for k, v in result.diagnostics.items()}
        seconds[method] = time.perf_counter() - start
        log.debug("Steering vectors: %s for target layers %s (%.1f s)", method, sorted(result.vectors), seconds[method])
    norms = layer_norms(inputs.target, inputs.target_layers, [j for _, j in pairs])
    return VectorSet(vectors, norms, diagnostics, seconds)
