"""Evaluation report: per data set and method, fold accuracies, chosen coefficients, damage, generated-answer
results, tests and verdicts.

:func:`es_lightning.evaluation.report_markdown.write_report` writes ``report.json`` (loadable again with
:func:`load_report`) and ``report.md`` (tables for people), both atomically.

Long because: it is the report's schema, each record with its JSON round trip, versioned together by
``REPORT_FORMAT``; the markdown lives in ``report_markdown.py``, the assembly from folds in ``assemble.py``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from es_lightning.evaluation.config import Scoring
from es_lightning.evaluation.stats import (
    RandomControl,
    SignTest,
    Spread,
    Verdict,
    random_control,
    sign_test,
    summarise,
    verdict,
)

SCORINGS: tuple[str, ...] = ("sum", "mean")
REPORT_FORMAT = 3


@dataclass(frozen=True)
class FoldResult:
    """Test accuracy of one method on one fold, under both scorings, and the coefficient chosen on its val part."""

    fold: int
    coefficient: float | None  # None for methods without a coefficient (no steering)
    accuracy_sum: float  # choices ranked by summed log-prob
    accuracy_mean: float  # choices ranked by mean log-prob per token (length-normalised)
    n_test: int
    random_draws: tuple[float, ...] | None = (
        None  # test accuracy of each random draw at this coefficient (report's scoring)
    )
    within_budget: bool = True  # False: no coefficient was within the damage budget, so the method was not steered

    def to_dict(self) -> dict:
        """JSON-ready form."""
        out = asdict(self)
        out["random_draws"] = None if self.random_draws is None else list(self.random_draws)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> FoldResult:
        """Inverse of :meth:`to_dict`."""
        draws = data.get("random_draws")
        return cls(**{**data, "random_draws": None if draws is None else tuple(draws)})


DAMAGE_MEASURES = ("kl", "ce_increase", "empty", "repetition", "perplexity")  # per swept coefficient, on val


@dataclass(frozen=True)
class SweepCurve:
    """Validation accuracy per coefficient: one row per fold (None where a fold's sweep stopped before that
    coefficient), and the mean over the folds that scored it. ``mean_damage`` holds, per measure of
    ``DAMAGE_MEASURES``, its mean over folds per coefficient (None where not measured)."""

    coefficients: tuple[float, ...]
    fold_val_accuracy: tuple[tuple[float | None, ...], ...]  # [fold][coefficient]
    mean_val_accuracy: tuple[float, ...]
    mean_damage: dict[str, tuple[float | None, ...]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "coefficients": list(self.coefficients),
            "fold_val_accuracy": [list(row) for row in self.fold_val_accuracy],
            "mean_val_accuracy": list(self.mean_val_accuracy),
            "mean_damage": {name: list(values) for name, values in self.mean_damage.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> SweepCurve:
        """Inverse of :meth:`to_dict`."""
        return cls(
            coefficients=tuple(data["coefficients"]),
            fold_val_accuracy=tuple(tuple(row) for row in data["fold_val_accuracy"]),
            mean_val_accuracy=tuple(data["mean_val_accuracy"]),
            mean_damage={name: tuple(values) for name, values in data.get("mean_damage", {}).items()},
        )


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def sweep_curve(
    per_fold: Sequence[dict[float, float]], damage: Sequence[dict[float, dict]] | None = None
) -> SweepCurve:
    """Build a :class:`SweepCurve` from one ``{coefficient: val accuracy}`` mapping per fold; a fold may miss
    coefficients (its sweep stopped early in that direction). ``damage``, if given, holds per fold
    ``{coefficient: {measure: value}}`` for the measures of ``DAMAGE_MEASURES``."""
    if not per_fold:
        raise ValueError("sweep_curve needs the validation accuracies of at least one fold.")
    grid = sorted({float(c) for row in per_fold for c in row})
    rows = tuple(tuple(float(row[c]) if c in row else None for c in grid) for row in per_fold)
    mean = tuple(sum(v for v in column if v is not None) / sum(v is not None for v in column) for column in zip(*rows))
    measures = {}
    if damage is not None:
        measures = {
            name: tuple(_mean([(fold.get(c) or {}).get(name) for fold in damage]) for c in grid)
            for name in DAMAGE_MEASURES
        }
    return SweepCurve(coefficients=tuple(grid), fold_val_accuracy=rows, mean_val_accuracy=mean, mean_damage=measures)


@dataclass(frozen=True)
class GenerationResult:
    """A variant's generated answers to the test questions (each method at one kind of chosen coefficient).

    ``accuracy``: per metric, the spread of fold accuracies; ``empty``, ``repetition`` and ``perplexity`` (the
    unsteered model's, of the answers) and ``kl``/``ce_increase`` (on the unsteered answers, nats per token) pool
    every test question. Tests (per metric): sign test against no steering, permutation test against the random
    draws at the same coefficient; ``verdict`` is the first metric's (None without both tests).
    """

    metrics: tuple[str, ...]
    accuracy: dict[str, Spread]
    empty: float
    repetition: float
    perplexity: float | None
    kl: float | None
    ce_increase: float | None
    vs_none: dict[str, SignTest] | None = None
    vs_random: dict[str, RandomControl] | None = None
    verdict: Verdict | None = None

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "metrics": list(self.metrics),
            "accuracy": {m: spread.to_dict() for m, spread in self.accuracy.items()},
            "empty": self.empty,
            "repetition": self.repetition,
            "perplexity": self.perplexity,
            "kl": self.kl,
            "ce_increase": self.ce_increase,
            "vs_none": None if self.vs_none is None else {m: t.to_dict() for m, t in self.vs_none.items()},
            "vs_random": None if self.vs_random is None else {m: t.to_dict() for m, t in self.vs_random.items()},
            "verdict": self.verdict,
        }

    @classmethod
    def from_dict(cls, data: dict) -> GenerationResult:
        """Inverse of :meth:`to_dict`."""
        return cls(
            metrics=tuple(data["metrics"]),
            accuracy={m: Spread.from_dict(v) for m, v in data["accuracy"].items()},
            empty=data["empty"],
            repetition=data["repetition"],
            perplexity=data["perplexity"],
            kl=data["kl"],
            ce_increase=data["ce_increase"],
            vs_none=None
            if data.get("vs_none") is None
            else {m: SignTest.from_dict(v) for m, v in data["vs_none"].items()},
            vs_random=None
            if data.get("vs_random") is None
            else {m: RandomControl.from_dict(v) for m, v in data["vs_random"].items()},
            verdict=data.get("verdict"),
        )


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
    generation: GenerationResult | None = None  # the generated answers at the same coefficients
    unconstrained: MethodResult | None = None  # the same method at the coefficient of best val accuracy alone

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
            "generation": self.generation.to_dict() if self.generation else None,
            "unconstrained": self.unconstrained.to_dict() if self.unconstrained else None,
        }

    @classmethod
    def from_dict(cls, data: dict) -> MethodResult:
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
            generation=GenerationResult.from_dict(data["generation"]) if data.get("generation") else None,
            unconstrained=MethodResult.from_dict(data["unconstrained"]) if data.get("unconstrained") else None,
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
    generation: GenerationResult | None = None,
    unconstrained: MethodResult | None = None,
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
        generation=generation,
        unconstrained=unconstrained,
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
    def from_dict(cls, data: dict) -> DatasetReport:
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
    def from_dict(cls, data: dict) -> Report:
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


def load_report(path: str | Path) -> Report:
    """Read a ``report.json`` written by :func:`write_report` (or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    return Report.from_dict(json.loads(path.read_text(encoding="utf-8")))


def chosen_coefficients(report: Report, dataset: str | None = None) -> dict[str, float]:
    """Each steered method's coefficient as the evaluation chose it within the damage budget (the constrained
    choice): the median over folds (lower middle value for an even count, so the result is always a coefficient
    that was actually chosen in some fold). 0 means no coefficient was within budget in most folds."""
    data = report.datasets[0] if dataset is None else next((d for d in report.datasets if d.dataset == dataset), None)
    if data is None:
        raise ValueError(f"The report has no data set {dataset!r}; it has {[d.dataset for d in report.datasets]}.")
    out = {}
    for m in data.methods:
        values = sorted(c for c in m.coefficients if c is not None)
        if values:
            out[m.method] = values[(len(values) - 1) // 2]
    return out
