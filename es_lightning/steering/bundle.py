"""The steering bundle: the artefact that carries steering vectors from alignment to generation.

One bundle holds one method's vectors for one target model. It is a single ``.safetensors`` file: the
tensors ``vectors`` ``[K, d]`` (float32 unit rows, one per target layer), ``norms`` ``[K]`` (float64 mean
hidden-state norms) and optionally ``mi`` ``[L_E, L_T]``; everything else is JSON in the safetensors
metadata header. Several methods live side by side as ``{method}.safetensors`` files in one directory
(:func:`save_bundles`; each file reads back with :meth:`SteeringBundle.load`).

:meth:`SteeringBundle.export_gguf` writes a llama.cpp control vector (:mod:`es_lightning.steering.control_vector`,
which also reads one back: :func:`load_control_vector_gguf`). llama.cpp adds tensor
``direction.N`` to the output of block ``N`` counted from 0 (the same index as ``model.layers[N]`` in
transformers and ``blk.N`` in GGUF), at every position; it rejects ``direction.0``, so block 0 cannot be
exported. The 1-based part of llama.cpp's convention is only its in-memory buffer, which starts at layer 1.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from es_lightning import __version__
from es_lightning.io import atomic_write_with
from es_lightning.models.loading import LoadedModel
from es_lightning.steering.control_vector import ControlVector as ControlVector  # re-exported
from es_lightning.steering.control_vector import export_control_vector
from es_lightning.steering.control_vector import load_control_vector_gguf as load_control_vector_gguf  # re-exported

FORMAT = "es_lightning.steering_bundle"
FORMAT_VERSION = 1
UNIT_TOLERANCE = 1e-4
_METHOD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class ModelIdentity:
    """Which model a bundle belongs to: its name, content fingerprint and ``config.model_type``."""

    name: str
    fingerprint: str = ""
    architecture: str = ""

    @classmethod
    def of(cls, loaded: LoadedModel) -> ModelIdentity:
        """The identity of a model returned by :func:`es_lightning.models.load_model`."""
        return cls(loaded.name, loaded.fingerprint, getattr(loaded.model.config, "model_type", ""))

    def matches(self, other: ModelIdentity) -> bool:
        """Same model: equal fingerprints when both have one, else equal names."""
        if self.fingerprint and other.fingerprint:
            return self.fingerprint == other.fingerprint
        return self.name == other.name

    def describe(self) -> str:
        """Name and fingerprint, for error messages."""
        return f"{self.name!r} (fingerprint {self.fingerprint or 'unknown'})"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class VectorProvenance:
    """How the fit made a bundle's vectors (written into the file; nothing steers by it): the alignment objective,
    the (expert, target) pairs, the split the vectors were fitted on, the seconds it took, and per target layer the
    method's diagnostics (e.g. ``rfm_val_score``)."""

    objective: str
    pairs: list[tuple[int, int]]
    split: str
    seconds: float
    diagnostics: dict[str, dict[str, float]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict) -> VectorProvenance:
        return cls(**{**data, "pairs": [(int(i), int(j)) for i, j in data["pairs"]]})


@dataclass(eq=False)
class SteeringBundle:
    """Unit steering vectors per target layer with their norms, provenance and optional MI matrix.

    ``vectors[j]`` is a float32 unit vector for 0-based target block ``j``; ``norms[j]`` is that block's mean
    hidden-state norm, so a steering coefficient is relative to it. ``layer_pairs`` lists the
    ``(expert_layer, target_layer)`` matches (empty for methods without an expert). ``mi`` is the
    ``[len(mi_expert_layers), len(mi_target_layers)]`` mutual-information matrix, if any.
    """

    method: str
    vectors: dict[int, torch.Tensor]
    norms: dict[int, float]
    target: ModelIdentity
    expert: ModelIdentity | None = None
    layer_pairs: list[tuple[int, int]] = field(default_factory=list)
    mi: torch.Tensor | None = None
    mi_expert_layers: list[int] = field(default_factory=list)
    mi_target_layers: list[int] = field(default_factory=list)
    data_key: str = ""
    cache_key: str = ""
    package_version: str = __version__
    format_version: int = FORMAT_VERSION  # of the file it was loaded from; save always writes FORMAT_VERSION
    created_at: str = field(default_factory=_now)
    provenance: VectorProvenance | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # the user's own notes, any JSON

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or not _METHOD_NAME.fullmatch(self.method):
            raise ValueError(
                f"Bundle method name {self.method!r} must be non-empty and use only letters, digits, '_', '.' "
                f"and '-' (it becomes a file name), e.g. 'expertsteer'."
            )
        if not self.vectors:
            raise ValueError("A steering bundle needs at least one target layer vector.")
        bad = [layer for layer in self.vectors if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0]
        if bad:
            raise ValueError(f"Target layers must be 0-based block indices (ints >= 0), got {bad}.")
        layers = sorted(self.vectors)
        if set(self.norms) != set(layers):
            raise ValueError(f"The bundle has vectors for layers {layers} but norms for {sorted(self.norms)}.")
        self.vectors = {layer: _unit_vector(self.vectors[layer], layer) for layer in layers}
        widths = {vector.shape[0] for vector in self.vectors.values()}
        if len(widths) != 1:
            raise ValueError(f"All steering vectors must have the same length (hidden size), got {sorted(widths)}.")
        self.norms = {layer: float(self.norms[layer]) for layer in layers}
        bad_norms = {layer: norm for layer, norm in self.norms.items() if not math.isfinite(norm) or norm <= 0}
        if bad_norms:
            raise ValueError(f"Hidden-state norms must be finite and positive, got {bad_norms}.")
        self.layer_pairs = [(int(expert), int(target)) for expert, target in self.layer_pairs]
        if self.layer_pairs and sorted(target for _, target in self.layer_pairs) != layers:
            raise ValueError(
                f"layer_pairs {self.layer_pairs} must name each target layer {layers} exactly once "
                f"(or be empty for methods without an expert)."
            )
        self._check_mi()

    def _check_mi(self) -> None:
        if self.mi is None:
            if self.mi_expert_layers or self.mi_target_layers:
                raise ValueError("mi_expert_layers/mi_target_layers are set but the MI matrix mi is missing.")
            return
        self.mi = self.mi.detach().float().cpu().contiguous()
        self.mi_expert_layers = [int(layer) for layer in self.mi_expert_layers]
        self.mi_target_layers = [int(layer) for layer in self.mi_target_layers]
        expected = (len(self.mi_expert_layers), len(self.mi_target_layers))
        if tuple(self.mi.shape) != expected:
            raise ValueError(
                f"The MI matrix has shape {tuple(self.mi.shape)} but its layer lists give {expected} "
                f"(len(mi_expert_layers), len(mi_target_layers))."
            )

    @property
    def layers(self) -> list[int]:
        """The steered target layers, ascending."""
        return list(self.vectors)

    @classmethod
    def from_directions(
        cls,
        method: str,
        directions: Mapping[int, torch.Tensor],
        norms: Mapping[int, float],
        target: ModelIdentity,
        **fields: Any,
    ) -> SteeringBundle:
        """A bundle from raw directions of any length: each is normalised to a unit vector."""
        vectors = {}
        for layer, direction in directions.items():
            length = direction.detach().float().norm()
            if not torch.isfinite(length) or length == 0:
                raise ValueError(f"The direction of layer {layer} is zero or not finite, so it cannot be normalised.")
            vectors[layer] = direction.detach().float() / length
        return cls(method=method, vectors=vectors, norms=dict(norms), target=target, **fields)

    def steering_kwargs(self, coefficient: float) -> dict[str, Any]:
        """Keyword arguments for :func:`es_lightning.steering.hooks.steer`: ``steer(model, **kwargs)``."""
        return {"vectors": dict(self.vectors), "norms": dict(self.norms), "coefficient": coefficient}

    # --- file format -------------------------------------------------------------------------------------

    def _metadata(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "target_layers": self.layers,
            "target": asdict(self.target),
            "expert": asdict(self.expert) if self.expert else None,
            "layer_pairs": [list(pair) for pair in self.layer_pairs],
            "mi_expert_layers": list(self.mi_expert_layers),
            "mi_target_layers": list(self.mi_target_layers),
            "data_key": self.data_key,
            "cache_key": self.cache_key,
            "package_version": self.package_version,
            "created_at": self.created_at,
            "provenance": asdict(self.provenance) if self.provenance else None,
            "extra": self.extra,
        }

    def save(self, path: str | Path) -> Path:
        """Write the bundle to ``path`` (a ``.safetensors`` file) atomically; return the path."""
        from safetensors.torch import save_file

        path = Path(path)
        try:
            body = json.dumps(self._metadata(), sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise ValueError(f"The bundle's extra dict must be JSON-serialisable (finite numbers): {err}") from err
        tensors = {
            "vectors": torch.stack(list(self.vectors.values())),
            "norms": torch.tensor(list(self.norms.values()), dtype=torch.float64),
        }
        if self.mi is not None:
            tensors["mi"] = self.mi
        header = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "bundle": body}
        atomic_write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
        return path

    @classmethod
    def load(cls, path: str | Path, expected_target: ModelIdentity | LoadedModel | None = None) -> SteeringBundle:
        """Read and validate a bundle; with ``expected_target``, refuse a bundle made for another model."""
        header, tensors = _read_safetensors(Path(path))
        try:
            meta = json.loads(header["bundle"])
            layers = meta["target_layers"]
            vectors, norms = tensors["vectors"], tensors["norms"]
            if vectors.ndim != 2 or vectors.shape[0] != len(layers) or tuple(norms.shape) != (len(layers),):
                raise ValueError(
                    f"{len(layers)} target layers but vectors of shape {tuple(vectors.shape)} and norms of "
                    f"shape {tuple(norms.shape)}"
                )
            bundle = cls(
                method=meta["method"],
                vectors={layer: vectors[i] for i, layer in enumerate(layers)},
                norms={layer: float(norms[i]) for i, layer in enumerate(layers)},
                target=ModelIdentity(**meta["target"]),
                expert=ModelIdentity(**meta["expert"]) if meta["expert"] else None,
                layer_pairs=[tuple(pair) for pair in meta["layer_pairs"]],
                mi=tensors.get("mi"),
                mi_expert_layers=meta["mi_expert_layers"],
                mi_target_layers=meta["mi_target_layers"],
                data_key=meta["data_key"],
                cache_key=meta["cache_key"],
                package_version=meta["package_version"],
                format_version=int(header["format_version"]),
                created_at=meta["created_at"],
                provenance=VectorProvenance.from_dict(meta["provenance"]) if meta.get("provenance") else None,
                extra=meta["extra"],
            )
        except (ValueError, KeyError, TypeError) as err:
            detail = f"missing metadata field {err}" if isinstance(err, KeyError) else str(err)
            raise ValueError(f"{str(path)!r} is not a valid steering bundle: {detail}") from err
        if expected_target is not None:
            expected = expected_target
            if isinstance(expected, LoadedModel):
                expected = ModelIdentity.of(expected)
            if not bundle.target.matches(expected):
                raise ValueError(
                    f"The bundle {str(path)!r} was made for target model {bundle.target.describe()}, but the target "
                    f"model here is {expected.describe()}. Steering vectors do not transfer between models: "
                    f"recompute the bundle for this model or load the model it was made for."
                )
        return bundle

    # --- llama.cpp export --------------------------------------------------------------------------------

    def export_gguf(self, path: str | Path, coefficient: float, model_hint: str | None = None) -> Path:
        """Write a llama.cpp control vector: ``direction.j = coefficient * norms[j] * vectors[j]`` per layer.

        ``direction.j`` steers 0-based block ``j`` (llama.cpp ``--control-vector``); block 0 cannot be
        exported. ``model_hint`` defaults to the target's architecture (``config.model_type``).
        """
        return export_control_vector(self, path, coefficient, model_hint)


# --- helpers ---------------------------------------------------------------------------------------------


def _unit_vector(vector: torch.Tensor, layer: int) -> torch.Tensor:
    if not isinstance(vector, torch.Tensor) or vector.ndim != 1:
        raise ValueError(f"The vector of layer {layer} must be a 1-D tensor.")
    vector = vector.detach().float().cpu().contiguous()
    norm = float(vector.norm())
    if not math.isfinite(norm) or abs(norm - 1.0) > UNIT_TOLERANCE:
        raise ValueError(
            f"The vector of layer {layer} has norm {norm:.6g}, not 1: a bundle stores unit directions and the "
            f"scale in norms. Normalise it first (v / v.norm())."
        )
    return vector


def _read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata header and tensors of a bundle file, with clear errors for anything else."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise FileNotFoundError(f"No steering bundle at {str(path)!r}.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except SafetensorError as err:
        raise ValueError(
            f"{str(path)!r} is not a safetensors file ({err}); a steering bundle is a .safetensors file written "
            f"by SteeringBundle.save."
        ) from err
    if header.get("format") != FORMAT or "bundle" not in header:
        raise ValueError(
            f"{str(path)!r} is a safetensors file but not an es-lightning steering bundle (its metadata lacks "
            f"format={FORMAT!r}); model weights or other tensors cannot be loaded as a bundle."
        )
    version = header.get("format_version", "")
    if not version.isdigit():
        raise ValueError(f"{str(path)!r} has an unreadable bundle format_version {version!r}; the file is damaged.")
    if int(version) > FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} uses bundle format version {version}, newer than this es-lightning {__version__} "
            f"supports (up to {FORMAT_VERSION}). Upgrade: pip install -U es-lightning"
        )
    missing = [name for name in ("vectors", "norms") if name not in tensors]
    if missing:
        raise ValueError(f"{str(path)!r} lacks the tensors {missing}; the file is incomplete. Recreate the bundle.")
    return header, tensors


def save_bundles(directory: str | Path, bundles: Iterable[SteeringBundle]) -> dict[str, Path]:
    """Save each bundle as ``{directory}/{method}.safetensors`` (one atomic write each); return the paths.

    Files of methods not given are left in place, so methods can be added one at a time.
    """
    bundles = list(bundles)
    methods = [bundle.method for bundle in bundles]
    duplicates = sorted({method for method in methods if methods.count(method) > 1})
    if duplicates:
        raise ValueError(f"Several bundles for method(s) {duplicates}: a directory holds one bundle per method.")
    return {bundle.method: bundle.save(Path(directory) / f"{bundle.method}.safetensors") for bundle in bundles}
