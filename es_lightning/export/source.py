"""What every export starts from: one method's bundle, the coefficient, the target model, the output path.

The vector an export writes for block ``j`` is :func:`steering_deltas`: ``vectors[j] * (coefficient * norms[j])``
in float32, the very expression :func:`es_lightning.steering.hooks.steer` adds to block ``j``'s output, so
a coefficient means the same thing here as in ``es-lightning test`` and ``predict`` (relative to the layer's
mean hidden-state norm).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from es_lightning.io import sha256_file
from es_lightning.models.loading import fingerprint_model_dir, resolve_model_dir
from es_lightning.run.coefficients import resolve_coefficients
from es_lightning.steering.bundle import ModelIdentity, SteeringBundle
from es_lightning.steering.options import check_coefficient


@dataclass
class ExportSource:
    """A loaded bundle and the coefficient to export it at, with where that coefficient came from."""

    bundle: SteeringBundle
    bundle_path: Path
    coefficient: float
    coefficient_origin: str  # "given" or "report <path>"

    @property
    def method(self) -> str:
        return self.bundle.method

    def deltas(self) -> dict[int, torch.Tensor]:
        """The float32 vector added to each steered block's output (see :func:`steering_deltas`)."""
        return steering_deltas(self.bundle, self.coefficient)


def steering_deltas(bundle: SteeringBundle, coefficient: float) -> dict[int, torch.Tensor]:
    """``{block j: vectors[j] * (coefficient * norms[j])}`` in float32: what hook steering adds to block j."""
    coefficient = check_coefficient(coefficient, "The export coefficient")
    return {
        layer: bundle.vectors[layer].detach().float().cpu() * (coefficient * bundle.norms[layer])
        for layer in bundle.layers
    }


def _run_of_bundle(path: Path) -> Path | None:
    """``<run>`` for a bundle at ``<run>/bundles/<method>.safetensors``, else None."""
    return path.parent.parent if path.parent.name == "bundles" else None


def find_bundle(source: str | Path, method: str | None) -> Path:
    """The bundle file named by ``source``: a bundle file itself, a run folder or a ``bundles/`` folder."""
    source = Path(source)
    if source.is_file():
        return source
    if not source.is_dir():
        raise FileNotFoundError(
            f"{str(source)!r} is neither a run folder nor a bundle file (working directory {Path.cwd()})."
        )
    folder = source / "bundles" if (source / "bundles").is_dir() else source
    available = sorted(p.stem for p in folder.glob("*.safetensors"))
    if not available:
        raise FileNotFoundError(
            f"No steering bundles in {str(folder)!r}: a run folder holds them in bundles/<method>.safetensors "
            f"once `es-lightning fit` has finished."
        )
    if method is None:
        raise ValueError(f"Name the method to export with --method: {str(folder)!r} has {available}.")
    path = folder / f"{method}.safetensors"
    if not path.is_file():
        raise ValueError(f"The run has no {method!r} bundle: {str(folder)!r} has {available}.")
    return path


def default_coefficient(bundle_path: Path, method: str, report: Path | None) -> tuple[float, str]:
    """The coefficient the evaluation chose for ``method`` within its damage budget (median over folds), read from
    ``report``, which must have been made from this very bundle file (see :func:`resolve_coefficients`)."""
    if report is None:
        raise ValueError(
            "No coefficient given and no evaluation report to take it from: pass --coefficient (relative to the "
            "layer's mean hidden-state norm, e.g. 0.2) or --report, or run `es-lightning test` first."
        )
    try:
        chosen = resolve_coefficients(report, bundle_sha256={method: sha256_file(bundle_path)})
    except (KeyError, TypeError, ValueError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(
            f"Cannot read the evaluation report {str(report)!r} ({type(err).__name__}: {err}); pass --coefficient."
        ) from err
    if chosen.report is None:
        raise ValueError(
            f"No coefficient given, and {chosen.reason}: pass --coefficient (e.g. 0.2), or run "
            f"`es-lightning test` on this run first."
        )
    if method not in chosen.values:
        raise ValueError(
            f"The evaluation report {str(chosen.report)!r} chose no coefficient for {method!r} (it has "
            f"{sorted(chosen.values)}); pass --coefficient."
        )
    if chosen.values[method] == 0:
        raise ValueError(
            f"The evaluation report {str(chosen.report)!r} found no coefficient of {method!r} within the damage budget "
            f"(evaluation.budget), so there is nothing safe to export: pass --coefficient to export one anyway."
        )
    return chosen.values[method], f"report {chosen.report}"


def load_source(
    source: str | Path, method: str | None = None, coefficient: float | None = None, report: str | Path | None = None
) -> ExportSource:
    """Load the bundle of ``method`` from a run folder (or a bundle file) and settle the coefficient.

    ``coefficient`` defaults to the one the run's evaluation chose (``<run>/report/report.json``, or
    ``report``). Every check happens here, before anything is written.
    """
    if coefficient is not None:
        coefficient = check_coefficient(coefficient, "The export coefficient")
    path = find_bundle(source, method)
    bundle = SteeringBundle.load(path)
    if method is not None and bundle.method != method:
        raise ValueError(f"{str(path)!r} holds the {bundle.method!r} bundle, not {method!r}.")
    if coefficient is None:
        run = _run_of_bundle(path)
        report_path = Path(report) if report is not None else (run / "report" if run is not None else None)
        coefficient, origin = default_coefficient(path, bundle.method, report_path)
    else:
        origin = "given"
    return ExportSource(bundle=bundle, bundle_path=path, coefficient=float(coefficient), coefficient_origin=origin)


@dataclass
class TargetModel:
    """The target model's local folder and identity, checked against the bundle's target."""

    name: str
    directory: Path
    identity: ModelIdentity


def resolve_target(
    bundle: SteeringBundle, model: str | None = None, cache_dir: str | Path | None = None
) -> TargetModel:
    """Resolve the model to export for (default: the bundle's own target) and refuse any other model."""
    from transformers import AutoConfig

    name = model or bundle.target.name
    directory = resolve_model_dir(name, cache_dir)
    model_type = getattr(AutoConfig.from_pretrained(directory), "model_type", "")
    identity = ModelIdentity(name, fingerprint_model_dir(directory), model_type)
    if not bundle.target.matches(identity):
        raise ValueError(
            f"The {bundle.method!r} bundle was made for target model {bundle.target.describe()}, but the model to "
            f"export for is {identity.describe()} ({directory}). Steering vectors do not transfer between models: "
            f"export for the bundle's own model (drop --model) or recompute the bundle for this one."
        )
    return TargetModel(name=name, directory=Path(directory), identity=identity)


EXPORT_RECORD = "es_lightning_export.json"


def check_output(path: str | Path, overwrite: bool, directory: bool = False) -> Path:
    """Refuse an existing output unless ``overwrite``; the writers then replace it atomically.

    With ``overwrite`` a file replaces only a file, and a folder only a folder that an earlier export wrote
    (it holds ``es_lightning_export.json``) or an empty one: a mistyped path never deletes other data.
    """
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return path
    if not overwrite:
        raise FileExistsError(f"{str(path)!r} already exists; pass --overwrite to replace it.")
    if directory:
        if not path.is_dir() or path.is_symlink():
            raise FileExistsError(
                f"{str(path)!r} exists and is not a folder; the hf export writes a folder. Remove it first."
            )
        if any(path.iterdir()) and not (path / EXPORT_RECORD).is_file():
            raise FileExistsError(
                f"{str(path)!r} is a folder that no earlier export wrote (no {EXPORT_RECORD}); --overwrite only "
                f"replaces an exported checkpoint. Choose another path or remove it yourself."
            )
    elif path.is_dir():
        raise FileExistsError(f"{str(path)!r} is a folder; this export writes one file. Choose a file path.")
    return path
