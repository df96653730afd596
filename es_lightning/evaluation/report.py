"""Evaluation report: per data set and method, fold accuracies, chosen coefficients, tests and verdicts.

``write_report`` writes ``report.json`` (loadable again with :func:`load_report`) and ``report.md`` (tables
for people), both atomically.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from es_lightning.evaluation.stats import RandomControl, SignTest, Spread, Verdict, random_control, sign_test, summarise, verdict
from es_lightning.io import atomic_write_json, atomic_write_text

Scoring = Literal["sum", "mean"]
SCORINGS: tuple[str, ...] = ("sum", "mean")
REPORT_FORMAT = 2


@dataclass(frozen=True)
class FoldResult:
    """Test accuracy of one method on one fold, under both scorings, and the coefficient chosen on its val part."""

    fold: int
    coefficient: float | None  # None for methods without a coefficient (no steering)
    accuracy_sum: float  # choices ranked by summed log-prob
    accuracy_mean: float  # choices ranked by mean log-prob per token (length-normalised)
    n_test: int
    random_draws: tuple[float, ...] | None = None  # test accuracy of each random draw at this coefficient (report's scoring)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        out = asdict(self)
        out["random_draws"] = None if self.random_draws is None else list(self.random_draws)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "FoldResult":
        """Inverse of :meth:`to_dict`."""
        draws = data.get("random_draws")
        return cls(**{**data, "random_draws": None if draws is None else tuple(draws)})


@dataclass(frozen=True)
class SweepCurve:
    """Validation accuracy per coefficient: one row per fold (None where a fold's sweep stopped before that
    coefficient), and the mean over the folds that scored it."""

    coefficients: tuple[float, ...]
    fold_val_accuracy: tuple[tuple[float | None, ...], ...]  # [fold][coefficient]
    mean_val_accuracy: tuple[float, ...]

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "coefficients": list(self.coefficients),
            "fold_val_accuracy": [list(row) for row in self.fold_val_accuracy],
            "mean_val_accuracy": list(self.mean_val_accuracy),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "SweepCurve":
        """Inverse of :meth:`to_dict`."""
        return cls(
            coefficients=tuple(data["coefficients"]),
            fold_val_accuracy=tuple(tuple(row) for row in data["fold_val_accuracy"]),
            mean_val_accuracy=tuple(data["mean_val_accuracy"]),
        )


def sweep_curve(per_fold: Sequence[dict[float, float]]) -> SweepCurve:
    """Build a :class:`SweepCurve` from one ``{coefficient: val accuracy}`` mapping per fold; a fold may miss
    coefficients (its sweep stopped early in that direction)."""
    if not per_fold:
        raise ValueError("sweep_curve needs the validation accuracies of at least one fold.")
    grid = sorted({float(c) for row in per_fold for c in row})
    rows = tuple(tuple(float(row[c]) if c in row else None for c in grid) for row in per_fold)
    mean = tuple(
        sum(v for v in column if v is not None) / sum(v is not None for v in column) for column in zip(*rows)
    )
    return SweepCurve(coefficients=tuple(grid), fold_val_accuracy=rows, mean_val_accuracy=mean)


@dataclass(frozen=True)
class MethodResult:
    """One method on one data set: fold results, their spread, paired tests and verdict (if applicable)."""

    method: str
    folds: tuple[FoldResult, ...]
    accuracy_sum: Spread
    accuracy_mean: Spread
    vs_none: SignTest | None = None  # on the pooled test predictions of all folds
    vs_random: RandomControl | None = None  # against the random draws at the same coefficient per fold
    verdict: Verdict | None = None
    sweep: SweepCurve | None = None

    @property
    def coefficients(self) -> tuple[float | None, ...]:
        """The coefficient chosen in each fold."""
        return tuple(fold.coefficient for fold in self.folds)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "method": self.method,
            "folds": [fold.to_dict() for fold in self.folds],
            "accuracy_sum": self.accuracy_sum.to_dict(),
            "accuracy_mean": self.accuracy_mean.to_dict(),
            "vs_none": self.vs_none.to_dict() if self.vs_none else None,
            "vs_random": self.vs_random.to_dict() if self.vs_random else None,
            "verdict": self.verdict,
            "sweep": self.sweep.to_dict() if self.sweep else None,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "MethodResult":
        """Inverse of :meth:`to_dict`."""
        return cls(
            method=data["method"],
            folds=tuple(FoldResult.from_dict(fold) for fold in data["folds"]),
            accuracy_sum=Spread.from_dict(data["accuracy_sum"]),
            accuracy_mean=Spread.from_dict(data["accuracy_mean"]),
            vs_none=SignTest.from_dict(data["vs_none"]) if data.get("vs_none") else None,
            vs_random=RandomControl.from_dict(data["vs_random"]) if data.get("vs_random") else None,
            verdict=data.get("verdict"),
            sweep=SweepCurve.from_dict(data["sweep"]) if data.get("sweep") else None,
        )


def method_result(
    method: str,
    folds: Sequence[FoldResult],
    correct=None,
    correct_none=None,
    random_draws=None,
    sweep: SweepCurve | None = None,
    alpha: float = 0.05,
    permutations: int = 10000,
) -> MethodResult:
    """Summarise a method's folds and run its tests.

    ``correct`` and ``correct_none`` are per-question correctness over all test folds and ``random_draws``
    [draws, questions] the random draws' correctness at the method's coefficient in each fold (same questions,
    same order; under the report's scoring). Tests run against whichever baselines are given; the verdict needs both.
    """
    if not folds:
        raise ValueError(f"Method {method!r} has no fold results.")
    vs_none = vs_random = None
    if (correct_none is not None or random_draws is not None) and correct is None:
        raise ValueError(f"Method {method!r}: pass its own per-question correctness to test it against a baseline.")
    if correct_none is not None:
        vs_none = sign_test(correct, correct_none)
    if random_draws is not None:
        vs_random = random_control(correct, random_draws, permutations=permutations)
    return MethodResult(
        method=method,
        folds=tuple(folds),
        accuracy_sum=summarise([fold.accuracy_sum for fold in folds]),
        accuracy_mean=summarise([fold.accuracy_mean for fold in folds]),
        vs_none=vs_none,
        vs_random=vs_random,
        verdict=verdict(vs_none, vs_random, alpha) if vs_none and vs_random else None,
        sweep=sweep,
    )


@dataclass(frozen=True)
class DatasetReport:
    """All methods evaluated on one data set."""

    dataset: str
    n_questions: int
    methods: tuple[MethodResult, ...]

    def to_dict(self) -> dict:
        """JSON-ready form."""
        methods = [m.to_dict() for m in self.methods]
        return {"dataset": self.dataset, "n_questions": self.n_questions, "methods": methods}

    @classmethod
    def from_dict(cls, data: dict) -> "DatasetReport":
        """Inverse of :meth:`to_dict`."""
        methods = tuple(MethodResult.from_dict(m) for m in data["methods"])
        return cls(dataset=data["dataset"], n_questions=data["n_questions"], methods=methods)


@dataclass(frozen=True)
class Report:
    """A full evaluation: one :class:`DatasetReport` per data set.

    ``scoring`` names the scoring ("sum" or "mean" log-prob) used to choose coefficients, run the sign
    tests and give verdicts; accuracies are reported under both.
    """

    model: str
    scoring: Scoring
    alpha: float
    k: int
    fold_mode: str
    datasets: tuple[DatasetReport, ...]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"Unknown scoring {self.scoring!r}: use one of {list(SCORINGS)}.")

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "format": REPORT_FORMAT,
            "model": self.model,
            "scoring": self.scoring,
            "alpha": self.alpha,
            "k": self.k,
            "fold_mode": self.fold_mode,
            "datasets": [d.to_dict() for d in self.datasets],
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Report":
        """Inverse of :meth:`to_dict`."""
        if data.get("format") != REPORT_FORMAT:
            raise ValueError(
                f"Report format {data.get('format')!r} is not the supported format {REPORT_FORMAT}; "
                f"regenerate the report with this version of es-lightning."
            )
        return cls(
            model=data["model"],
            scoring=data["scoring"],
            alpha=data["alpha"],
            k=data["k"],
            fold_mode=data["fold_mode"],
            datasets=tuple(DatasetReport.from_dict(d) for d in data["datasets"]),
            meta=data.get("meta", {}),
        )


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _accuracy(spread: Spread) -> str:
    return f"{100 * spread.mean:.1f} ± {100 * spread.std:.1f}"


def _p(test: SignTest | None) -> str:
    if test is None:
        return "–"
    p = "<0.001" if test.p_value < 0.001 else f"{test.p_value:.3g}"
    return f"{p} ({test.wins}/{test.losses})"


def _random(control: RandomControl | None) -> str:
    if control is None:
        return "–"
    p = "<0.001" if control.p_value < 0.001 else f"{control.p_value:.3g}"
    return f"{100 * control.mean_accuracy:.1f} / {100 * control.percentile:.0f}% / {p}"


def _coefficients(values: Sequence[float | None]) -> str:
    if all(value is None for value in values):
        return "–"
    return ", ".join("–" if value is None else f"{value:g}" for value in values)


def render_markdown(report: Report) -> str:
    """The report as markdown: a results table (method × data set) and the coefficient sweeps."""
    label = {"sum": "summed log-prob", "mean": "mean log-prob per token"}[report.scoring]
    lines = [
        f"# Evaluation of {report.model}",
        "",
        (f"{report.k}-fold {report.fold_mode} cross-validation. " if report.fold_mode != "split" else "The data module's train/val/test split. ")
        + "Accuracy in %, mean ± sample std over folds. "
        f"Coefficients are chosen per fold on its validation part. Against no steering: exact two-sided sign test "
        f"(wins/losses) pooling all test folds. Against random: the random draws scored at the method's own "
        f"coefficient in each fold: their mean accuracy, the share of draws the method beats, and a two-sided paired "
        f"sign-flip permutation test of the method against the draws' mean. Tests, coefficient choice and verdict use "
        f"the {label} scoring. A gain needs p < {report.alpha:g} against both no steering and the random draws.",
        "",
        "| Dataset | Method | Accuracy (sum) | Accuracy (mean/token) | Coefficient per fold | p vs none (W/L) "
        "| Random draws: mean / beaten / p | Verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for data in report.datasets:
        for m in data.methods:
            cells = [
                data.dataset, m.method, _accuracy(m.accuracy_sum), _accuracy(m.accuracy_mean),
                _coefficients(m.coefficients), _p(m.vs_none), _random(m.vs_random), m.verdict or "–",
            ]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    for data in report.datasets:
        swept = [m for m in data.methods if m.sweep is not None]
        if not swept:
            continue
        grid = sorted({c for m in swept for c in m.sweep.coefficients})  # type: ignore[union-attr]
        lines += [
            "",
            f"## Coefficient sweep: {data.dataset} (validation accuracy in %, mean over folds)",
            "",
            "| Coefficient | " + " | ".join(_cell(m.method) for m in swept) + " |",
            "|---" * (len(swept) + 1) + "|",
        ]
        for c in grid:
            row = []
            for m in swept:
                curve = dict(zip(m.sweep.coefficients, m.sweep.mean_val_accuracy))  # type: ignore[union-attr]
                row.append(f"{100 * curve[c]:.1f}" if c in curve else "–")
            lines.append(f"| {c:g} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_report(report: Report, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``out_dir`` atomically; return their paths."""
    out_dir = Path(out_dir)
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    atomic_write_json(json_path, report.to_dict())
    atomic_write_text(md_path, render_markdown(report))
    return json_path, md_path


def load_report(path: str | Path) -> Report:
    """Read a ``report.json`` written by :func:`write_report` (or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    return Report.from_dict(json.loads(path.read_text(encoding="utf-8")))


def chosen_coefficients(report: Report, dataset: str | None = None) -> dict[str, float]:
    """Each steered method's coefficient as the evaluation chose it: the median over folds (lower middle value
    for an even count, so the result is always a coefficient that was actually chosen in some fold)."""
    data = report.datasets[0] if dataset is None else next((d for d in report.datasets if d.dataset == dataset), None)
    if data is None:
        raise ValueError(f"The report has no data set {dataset!r}; it has {[d.dataset for d in report.datasets]}.")
    out = {}
    for m in data.methods:
        values = sorted(c for c in m.coefficients if c is not None)
        if values:
            out[m.method] = values[(len(values) - 1) // 2]
    return out
