"""Choosing a method's coefficient on a fold's val questions: the sweep's walk, the damage budget, the choice.

The sweep scores every coefficient of the grid at once (rows of one batch carry different coefficients), then
keeps the coefficients a walk outwards from zero reaches: on each side it stops once val accuracy has fallen
``stop_after_falls`` times in a row. Among the kept coefficients, the *unconstrained* choice has the best val
accuracy; the *constrained* choice (the default for ``predict`` and the exports) has the best val accuracy among
those whose damage stays inside the :class:`DamageBudget`. Ties go to the smaller magnitude, then the positive side.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from es_lightning.evaluation.config import DamageBudget
from es_lightning.evaluation.damage import AnswerHealth, Damage


@dataclass(frozen=True)
class SweepPoint:
    """One coefficient on a fold's val questions: multiple-choice accuracy, and (when generation is evaluated) the
    damage on the unsteered continuations and the health of the generated answers."""

    accuracy: float
    damage: Damage | None = None
    health: AnswerHealth | None = None

    def to_dict(self) -> dict:
        """JSON-ready form with the derived means."""
        return {
            "accuracy": self.accuracy,
            "kl": None if self.damage is None else self.damage.kl,
            "ce_increase": None if self.damage is None else self.damage.ce_increase,
            "empty": None if self.health is None else self.health.empty_share,
            "repetition": None if self.health is None else self.health.repetition,
            "perplexity": None if self.health is None else self.health.perplexity,
        }


@dataclass(frozen=True)
class CoefficientChoice:
    """A method's coefficients in one fold: ``constrained`` is None when no coefficient is within budget."""

    constrained: float | None
    unconstrained: float

    @property
    def applied(self) -> float:
        """The coefficient the method is tested at: the constrained one, or 0 (no steering) when none fits."""
        return 0.0 if self.constrained is None else self.constrained


def walked(accuracy: Mapping[float, float], sides: Sequence[Sequence[float]], stop_after_falls: int) -> list[float]:
    """The coefficients a walk outwards from zero reaches (``accuracy[0.0]`` is no steering), side by side."""
    reached = []
    for side in sides:
        previous, falls = accuracy[0.0], 0
        for coefficient in side:
            reached.append(coefficient)
            falls = falls + 1 if accuracy[coefficient] < previous else 0
            previous = accuracy[coefficient]
            if falls >= stop_after_falls:
                break
    return reached


def within_budget(point: SweepPoint, unsteered: SweepPoint, budget: DamageBudget) -> bool:
    """Whether ``point``'s damage is inside every limit of ``budget`` (limits on health are relative to the
    unsteered answers); a point without damage measurements passes only a budget with no limits."""
    checks = []
    if budget.max_kl is not None:
        checks.append(point.damage is not None and point.damage.kl is not None and point.damage.kl <= budget.max_kl)
    health, base = point.health, unsteered.health
    if budget.max_empty_increase is not None:
        checks.append(
            health is not None
            and base is not None
            and health.empty_share <= base.empty_share + budget.max_empty_increase + 1e-12
        )
    if budget.max_repetition_increase is not None:
        checks.append(
            health is not None
            and base is not None
            and health.repetition <= base.repetition + budget.max_repetition_increase + 1e-12
        )
    return all(checks)


def choose(
    points: Mapping[float, SweepPoint], candidates: Sequence[float], budget: DamageBudget, constrain: bool = True
) -> CoefficientChoice:
    """The unconstrained and constrained choices among ``candidates`` (``points[0.0]`` is no steering). Without
    ``constrain`` (generation not evaluated) the constrained choice equals the unconstrained one."""
    if not candidates:
        raise ValueError("No coefficient was swept: evaluation.coefficients must hold a nonzero value.")

    def rank(c: float) -> tuple[float, float, bool]:
        return points[c].accuracy, -abs(c), c > 0

    best = max(candidates, key=rank)
    if not constrain:
        return CoefficientChoice(best, best)
    inside = [c for c in candidates if within_budget(points[c], points[0.0], budget)]
    return CoefficientChoice(max(inside, key=rank) if inside else None, best)
