"""The steering coefficient each method is used at after ``test``: one decision for ``predict``, the exports and the
pipeline. It is the coefficient the evaluation chose within the damage budget (median over folds), read from a
report made from the same checkpoint (or the same bundle file); a report of anything else is never used."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from es_lightning.evaluation.report import chosen_coefficients, load_report


@dataclass(frozen=True)
class ChosenCoefficients:
    """Each method's chosen coefficient (0: none within budget) from ``report``; empty, with ``reason`` saying why,
    when there is no usable report."""

    values: dict[str, float] = field(default_factory=dict)
    report: Path | None = None
    reason: str = ""


def report_json(report: str | Path) -> Path:
    """``report`` itself if it is a file, else ``report/report.json``."""
    path = Path(report)
    return path if path.suffix == ".json" or path.is_file() else path / "report.json"


def resolve_coefficients(
    report: str | Path, checkpoint_sha256: str | None = None, bundle_sha256: dict[str, str] | None = None
) -> ChosenCoefficients:
    """The coefficients ``test`` chose, if ``report`` was made from the checkpoint with ``checkpoint_sha256`` (predict,
    the pipeline) or from the bundle files with ``bundle_sha256`` ``{method: sha256}`` (an export of a bundle)."""
    path = report_json(report)
    if not path.is_file():
        return ChosenCoefficients(reason=f"no evaluation report at {path}")
    loaded = load_report(path)
    meta = loaded.meta
    if checkpoint_sha256 is not None and (meta.get("checkpoint") or {}).get("sha256") != checkpoint_sha256:
        return ChosenCoefficients(reason=f"the evaluation report {path} was made from another checkpoint")
    recorded = meta.get("bundles") or {}
    for method, sha in (bundle_sha256 or {}).items():
        if recorded.get(method) != sha:
            return ChosenCoefficients(reason=f"the evaluation report {path} was not made from this {method} bundle")
    return ChosenCoefficients(chosen_coefficients(loaded), path)
