"""The evaluation protocol never lets a fold's test questions reach a fitted piece, and scores the random control
at each method's own coefficient. Each test records what reached a piece and fails on a leak."""

from __future__ import annotations

import json

import pytest
from test_evaluation_cli import fitted  # noqa: F401 - the fitted tiny run, a module fixture

from es_lightning.cli import build_cli
from es_lightning.data.folds import Fold
from es_lightning.evaluation import protocol
from es_lightning.evaluation.answers import AnswerGenerator
from es_lightning.evaluation.assemble import assemble_report
from es_lightning.evaluation.choice import CoefficientChoice, SweepPoint
from es_lightning.evaluation.config import EvaluationConfig
from es_lightning.evaluation.protocol import DRAW, Evaluator, FoldPlan, TestRecord
from es_lightning.evaluation.report import load_report


def _questions_of(evaluator: Evaluator, groups) -> set[int]:
    index = {g: q for q, g in enumerate(evaluator.rendered.groups)}
    return {index[g] for g in groups}


@pytest.fixture()
def recorded(fitted, monkeypatch):  # noqa: F811
    """Run `test` with spies on every fitted piece and on generation; returns {fold: {piece: questions}} (the
    "generated test" piece records what each fold's test scoring generated) and the folds."""
    tmp, args = fitted
    seen: dict[int, dict[str, set[int]]] = {}
    folds: dict[int, Fold] = {}
    state = {"fold": None, "evaluator": None, "test_fold": None}
    real_plan, real_search, real_vectors, real_score = (
        Evaluator.plan,
        protocol.search_pairs,
        protocol.compute_vector_set,
        Evaluator.score,
    )
    real_answer, real_reference, real_test = AnswerGenerator.answer, AnswerGenerator.reference, Evaluator.score_test

    def plan(self, fold):
        state["fold"], state["evaluator"] = fold.index, self
        folds[fold.index] = fold
        try:
            return real_plan(self, fold)
        finally:
            state["fold"] = None

    def record(piece, questions):
        seen.setdefault(state["fold"], {}).setdefault(piece, set()).update(questions)

    def search(fit, heldout, *a, **k):
        record("alignment", _questions_of(state["evaluator"], fit.groups))
        record("pairs", _questions_of(state["evaluator"], list(fit.groups) + list(heldout.groups)))
        return real_search(fit, heldout, *a, **k)

    def vectors(methods, pairs, inputs):
        record("vectors", _questions_of(state["evaluator"], inputs.groups))
        return real_vectors(methods, pairs, inputs)

    def score(self, questions, *a, **k):
        if state["fold"] is not None:
            record("coefficients", questions)
        return real_score(self, questions, *a, **k)

    def generated(questions):
        if state["fold"] is not None:
            record("damage and health", questions)
        if state["test_fold"] is not None:
            seen.setdefault(state["test_fold"], {}).setdefault("generated test", set()).update(questions)

    def answer(self, questions, *a, **k):
        generated(questions)
        return real_answer(self, questions, *a, **k)

    def reference(self, questions):
        generated(questions)
        return real_reference(self, questions)

    def score_test(self, plan, questions):
        state["test_fold"] = plan.fold.index
        try:
            return real_test(self, plan, questions)
        finally:
            state["test_fold"] = None

    monkeypatch.setattr(AnswerGenerator, "answer", answer)
    monkeypatch.setattr(AnswerGenerator, "reference", reference)
    monkeypatch.setattr(Evaluator, "score_test", score_test)
    monkeypatch.setattr(Evaluator, "plan", plan)
    monkeypatch.setattr(protocol, "search_pairs", search)
    monkeypatch.setattr(protocol, "compute_vector_set", vectors)
    monkeypatch.setattr(Evaluator, "score", score)
    out = tmp / "leak-report"
    build_cli(
        ["test", *args, "--model.report_dir", str(out), "--ckpt_path", str(tmp / "runs" / "default" / "last.ckpt")]
    )
    return seen, folds, out


def test_no_fitted_piece_sees_a_fold_test_question(recorded):
    seen, folds, _ = recorded
    assert sorted(seen) == sorted(folds) == [0, 1, 2]
    for index, fold in folds.items():
        pieces = seen[index]
        generated = pieces.pop("generated test")
        assert set(pieces) == {"alignment", "pairs", "vectors", "coefficients", "damage and health"}
        for piece, questions in pieces.items():
            assert questions, piece
            assert not questions & set(fold.test), (
                f"fold {index}: {piece} saw test questions {sorted(questions & set(fold.test))}"
            )
        assert pieces["alignment"] | pieces["pairs"] | pieces["vectors"] <= set(fold.train)
        assert pieces["coefficients"] | pieces["damage and health"] <= set(fold.val)  # chosen on val questions only
        assert generated == set(fold.test)  # each fold's generated answers are its own test questions, all of them


def test_report_states_the_protocol_and_every_draw(recorded):
    _, folds, out = recorded
    report = load_report(out)
    meta = json.loads((out / "report.json").read_text())["meta"]
    assert meta["protocol"] == "nested" and meta["random_draws"] == 2
    assert all(
        plan["alignment"]["protocol"] == "nested" and plan["alignment"]["search"]["n_heldout"] > 0
        for plan in meta["fold_plans"]
    )
    for entry in report.datasets[0].methods:
        if entry.method in ("expertsteer", "rfm_self", "mean_difference"):
            assert len(entry.vs_random.draw_accuracies) == 2
            assert all(len(f.random_draws) == 2 for f in entry.folds)


def test_random_draws_are_scored_at_each_methods_chosen_coefficient(fitted, monkeypatch):  # noqa: F811
    tmp, args = fitted
    scored: list[tuple[int, str, str, float]] = []
    plans: dict[int, FoldPlan] = {}
    real = Evaluator.score_test

    def spy(self, plan, questions):
        plans[plan.fold.index] = plan
        out = real(self, plan, questions)
        for record in out:
            scored.extend((plan.fold.index, "choice", v, c) for v, c in record.choice)
            scored.extend((plan.fold.index, "generated", v, c) for v, c in record.generated)
        return out

    monkeypatch.setattr(Evaluator, "score_test", spy)
    build_cli(
        [
            "test",
            *args,
            "--model.report_dir",
            str(tmp / "draws"),
            "--ckpt_path",
            str(tmp / "runs" / "default" / "last.ckpt"),
        ]
    )
    steered = ("expertsteer", "rfm_self", "mean_difference")
    for index, plan in plans.items():
        for kind in ("choice", "generated"):
            draws = {(v, c) for f, k, v, c in scored if f == index and k == kind and v.startswith(DRAW)}
            coefficients = {plan.choices[m].applied for m in steered}
            if kind == "choice":  # multiple choice also tests the unconstrained choice against its draws
                coefficients |= {plan.choices[m].unconstrained for m in steered}
            assert draws == {(f"{DRAW}{d}", c) for c in coefficients - {0.0} for d in range(2)}


def _records(answers: dict) -> list[TestRecord]:
    """TestRecords of one fold from {key: [correct per question]} (multiple choice only)."""
    n = len(next(iter(answers.values())))
    return [
        TestRecord({key: {"mean": bool(v[q]), "sum": bool(v[q])} for key, v in answers.items()}, {}) for q in range(n)
    ]


def test_assembled_random_control_uses_the_draws_at_the_methods_coefficient():
    fold = Fold(0, (0, 1), (2,), (3, 4, 5, 6))
    choices = {"expertsteer": CoefficientChoice(0.4, 0.4), "random": CoefficientChoice(0.1, 0.1)}
    sweep = {m: {0.0: SweepPoint(0.5), c.applied: SweepPoint(0.6)} for m, c in choices.items()}
    plan = FoldPlan(fold, [(1, 1)], {}, [{}, {}], {1: 1.0}, choices, sweep)
    right, wrong = [True] * 4, [False] * 4
    records = _records(
        {
            ("none", 0.0): wrong,
            ("expertsteer", 0.4): right,
            ("random", 0.1): wrong,
            (f"{DRAW}0", 0.4): right,
            (f"{DRAW}1", 0.4): right,  # at expertsteer's coefficient: all right
            (f"{DRAW}0", 0.1): wrong,
            (f"{DRAW}1", 0.1): wrong,  # at another coefficient: all wrong
        }
    )
    config = EvaluationConfig(random_draws=2, permutations=200)
    report = assemble_report("toy", [(plan, records)], config, ["expertsteer", "random"])
    steer = next(m for m in report.methods if m.method == "expertsteer")
    assert steer.vs_random.draw_accuracies == (1.0, 1.0) and steer.vs_random.p_value == 1.0
    assert steer.verdict == "no gain"  # no better than random vectors at the same coefficient
    assert steer.generation is None  # no generated answers recorded


def test_a_fold_without_a_coefficient_in_budget_is_scored_unsteered_against_unsteered_draws():
    fold = Fold(0, (0, 1), (2,), (3, 4, 5, 6))
    plan = FoldPlan(
        fold,
        [(1, 1)],
        {},
        [{}, {}],
        {1: 1.0},
        {"expertsteer": CoefficientChoice(None, 0.8)},
        {"expertsteer": {0.0: SweepPoint(0.5), 0.8: SweepPoint(0.9)}},
    )
    records = _records(
        {
            ("none", 0.0): [True, False, True, False],
            ("expertsteer", 0.8): [True] * 4,
            (f"{DRAW}0", 0.8): [False] * 4,
            (f"{DRAW}1", 0.8): [False] * 4,
        }
    )
    report = assemble_report(
        "toy", [(plan, records)], EvaluationConfig(random_draws=2, permutations=200), ["expertsteer"]
    )
    steer = report.methods[1]
    assert steer.coefficients == (0.0,) and not steer.folds[0].within_budget
    assert steer.accuracy_mean.mean == 0.5 and steer.vs_none.wins == steer.vs_none.losses == 0  # equals no steering
    assert steer.vs_random.draw_accuracies == (0.5, 0.5)  # draws at coefficient 0 are no steering too
    assert steer.unconstrained.coefficients == (0.8,) and steer.unconstrained.accuracy_mean.mean == 1.0
    assert steer.unconstrained.vs_random.draw_accuracies == (0.0, 0.0)
