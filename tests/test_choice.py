"""Coefficient choice on val: the sweep's walk, the damage budget, constrained and unconstrained choices."""

from __future__ import annotations

import random

import pytest

from es_lightning.evaluation.choice import SweepPoint, choose, walked, within_budget
from es_lightning.evaluation.config import DamageBudget, EvaluationConfig
from es_lightning.evaluation.damage import AnswerHealth, Damage


def point(accuracy: float, kl: float, empty: int = 0, repetition: float = 0.0, answers: int = 10) -> SweepPoint:
    return SweepPoint(accuracy, Damage(kl * 100, 0.0, 100), AnswerHealth(answers, empty, repetition * answers, 0.0, 0))


def test_walk_stops_after_the_configured_falls_on_each_side():
    config = EvaluationConfig(coefficients=[-0.8, -0.4, -0.2, -0.1, 0.1, 0.2, 0.4, 0.8], stop_after_falls=2)
    accuracy = {0.0: 0.5, 0.1: 0.4, 0.2: 0.3, 0.4: 0.9, 0.8: 0.9, -0.1: 0.6, -0.2: 0.5, -0.4: 0.7, -0.8: 0.2}
    assert walked(accuracy, config.sweep_order(), 2) == [0.1, 0.2, -0.1, -0.2, -0.4, -0.8]
    assert walked(accuracy, config.sweep_order(), 1) == [0.1, -0.1, -0.2]
    assert walked(accuracy, config.sweep_order(), 9) == [0.1, 0.2, 0.4, 0.8, -0.1, -0.2, -0.4, -0.8]


def test_constrained_choice_is_the_best_inside_the_budget_and_unconstrained_the_best_overall():
    points = {
        0.0: point(0.3, 0.0),
        0.1: point(0.4, 0.05),
        0.2: point(0.5, 0.2),
        0.4: point(0.6, 0.3),
        0.8: point(0.9, 2.0, empty=5),
        -0.1: point(0.45, 0.05),
    }
    budget = DamageBudget(max_kl=0.25, max_empty_increase=0.0, max_repetition_increase=0.1)
    choice = choose(points, [0.1, 0.2, 0.4, 0.8, -0.1], budget)
    assert (choice.constrained, choice.unconstrained, choice.applied) == (0.2, 0.8, 0.2)
    assert choose(points, [0.1, 0.2, 0.4, 0.8, -0.1], DamageBudget(None, None, None)).constrained == 0.8
    assert choose(points, [0.1, 0.2, 0.4, 0.8, -0.1], budget, constrain=False).constrained == 0.8
    nothing = choose(points, [0.4, 0.8], budget)
    assert nothing.constrained is None and nothing.applied == 0.0 and nothing.unconstrained == 0.8
    with pytest.raises(ValueError, match="No coefficient was swept"):
        choose(points, [], budget)


def test_health_limits_are_relative_to_the_unsteered_answers():
    base = point(0.3, 0.0, empty=2, repetition=0.2)
    budget = DamageBudget(max_kl=None, max_empty_increase=0.1, max_repetition_increase=0.05)
    assert within_budget(point(0.5, 9.0, empty=3, repetition=0.25), base, budget)  # +10% empty, +0.05 repetition
    assert not within_budget(point(0.5, 0.0, empty=4), base, budget)
    assert not within_budget(point(0.5, 0.0, repetition=0.3), base, budget)
    assert not within_budget(SweepPoint(0.5), base, DamageBudget())  # unmeasured damage is never within a limit


def test_the_constrained_choice_never_exceeds_the_budget():
    rng = random.Random(0)
    budget = DamageBudget(max_kl=0.3, max_empty_increase=0.05, max_repetition_increase=0.1)
    grid = [-0.8, -0.4, -0.2, -0.1, 0.1, 0.2, 0.4, 0.8]
    for _ in range(300):
        points = {0.0: point(rng.random(), 0.0, rng.randrange(3), rng.random() * 0.2)}
        for c in grid:
            points[c] = point(rng.random(), rng.random() * abs(c), rng.randrange(5), rng.random() * 0.4)
        choice = choose(points, grid, budget)
        inside = [c for c in grid if within_budget(points[c], points[0.0], budget)]
        assert choice.unconstrained == max(grid, key=lambda c: (points[c].accuracy, -abs(c), c > 0))
        if choice.constrained is None:
            assert not inside
        else:
            chosen = points[choice.constrained]
            assert chosen.damage.kl <= budget.max_kl
            assert chosen.health.empty_share <= points[0.0].health.empty_share + budget.max_empty_increase + 1e-12
            assert chosen.health.repetition <= points[0.0].health.repetition + budget.max_repetition_increase + 1e-12
            assert chosen.accuracy == max(points[c].accuracy for c in inside)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_kl": -0.1}, "budget.max_kl"),
        ({"max_empty_increase": float("nan")}, "budget.max_empty_increase"),
        ({"max_repetition_increase": float("inf")}, "budget.max_repetition_increase"),
    ],
)
def test_bad_budgets_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DamageBudget(**kwargs).validate()
