"""The evaluation protocol never lets a fold's test questions reach a fitted piece, and scores the random control
at each method's own coefficient. Each test records what reached a piece and fails on a leak."""

from __future__ import annotations

import json

import pytest
import torch

from es_lightning.cli import build_cli
from es_lightning.data.folds import Fold
from es_lightning.evaluation import protocol
from es_lightning.evaluation.assemble import assemble_report
from es_lightning.evaluation.config import EvaluationConfig
from es_lightning.evaluation.protocol import DRAW, Evaluator, FoldPlan
from es_lightning.evaluation.report import load_report
from test_evaluation_cli import fitted  # noqa: F401 - the fitted tiny run, a module fixture


def _questions_of(evaluator: Evaluator, groups) -> set[int]:
    index = {g: q for q, g in enumerate(evaluator.rendered.groups)}
    return {index[g] for g in groups}


@pytest.fixture()
def recorded(fitted, monkeypatch):  # noqa: F811
    """Run `test` with spies on every fitted piece; returns {fold: {piece: questions}} and the folds."""
    tmp, args = fitted
    seen: dict[int, dict[str, set[int]]] = {}
    folds: dict[int, Fold] = {}
    state = {"fold": None, "evaluator": None}
    real_plan, real_search, real_vectors, real_score = Evaluator.plan, protocol.search_pairs, protocol.compute_vectors, Evaluator.score

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

    def vectors(method, pairs, inputs):
        record("vectors", _questions_of(state["evaluator"], inputs.groups))
        return real_vectors(method, pairs, inputs)

    def score(self, questions, *a, **k):
        if state["fold"] is not None:
            record("coefficients", questions)
        return real_score(self, questions, *a, **k)

    monkeypatch.setattr(Evaluator, "plan", plan)
    monkeypatch.setattr(protocol, "search_pairs", search)
    monkeypatch.setattr(protocol, "compute_vectors", vectors)
    monkeypatch.setattr(Evaluator, "score", score)
    out = tmp / "leak-report"
    build_cli(["test", *args, "--model.report_dir", str(out), "--ckpt_path", str(tmp / "runs" / "default" / "last.ckpt")])
    return seen, folds, out


def test_no_fitted_piece_sees_a_fold_test_question(recorded):
    seen, folds, _ = recorded
    assert sorted(seen) == sorted(folds) == [0, 1, 2]
    for index, fold in folds.items():
        pieces = seen[index]
        assert set(pieces) == {"alignment", "pairs", "vectors", "coefficients"}
        for piece, questions in pieces.items():
            assert questions, piece
            assert not questions & set(fold.test), f"fold {index}: {piece} saw test questions {sorted(questions & set(fold.test))}"
        assert pieces["alignment"] | pieces["pairs"] | pieces["vectors"] <= set(fold.train)
        assert pieces["coefficients"] <= set(fold.val)  # chosen on val questions only


def test_report_states_the_protocol_and_every_draw(recorded):
    _, folds, out = recorded
    report = load_report(out)
    meta = json.loads((out / "report.json").read_text())["meta"]
    assert meta["protocol"] == "nested" and meta["random_draws"] == 2
    assert all(plan["alignment"]["protocol"] == "nested" and plan["alignment"]["search"]["n_heldout"] > 0 for plan in meta["fold_plans"])
    for entry in report.datasets[0].methods:
        if entry.method in ("expertsteer", "rfm_self", "mean_difference"):
            assert len(entry.vs_random.draw_accuracies) == 2
            assert all(len(f.random_draws) == 2 for f in entry.folds)


def test_random_draws_are_scored_at_each_methods_chosen_coefficient(fitted, monkeypatch):  # noqa: F811
    tmp, args = fitted
    scored: list[tuple[int, str, float]] = []
    plans: dict[int, FoldPlan] = {}
    real = Evaluator.score_test

    def spy(self, plan, questions):
        plans[plan.fold.index] = plan
        out = real(self, plan, questions)
        scored.extend((plan.fold.index, variant, coefficient) for variant, coefficient in out)
        return out

    monkeypatch.setattr(Evaluator, "score_test", spy)
    build_cli(["test", *args, "--model.report_dir", str(tmp / "draws"), "--ckpt_path", str(tmp / "runs" / "default" / "last.ckpt")])
    for index, plan in plans.items():
        draws = {(v, c) for f, v, c in scored if f == index and v.startswith(DRAW)}
        wanted = {(f"{DRAW}{d}", plan.chosen[m]) for m in ("expertsteer", "rfm_self", "mean_difference") for d in range(2)}
        assert draws == wanted


def test_assembled_random_control_uses_the_draws_at_the_methods_coefficient():
    fold = Fold(0, (0, 1), (2,), (3, 4, 5, 6))
    plan = FoldPlan(fold, [(1, 1)], {}, [{}, {}], {1: 1.0}, {"expertsteer": 0.4, "random": 0.1}, {"expertsteer": {0.0: 0.5, 0.4: 0.6}, "random": {0.0: 0.5, 0.1: 0.5}})
    right, wrong = torch.tensor([True, True, True, True]), torch.tensor([False, False, False, False])
    both = lambda c: {"mean": c, "sum": c}  # noqa: E731
    results = {0: {
        ("none", 0.0): both(wrong), ("expertsteer", 0.4): both(right), ("random", 0.1): both(wrong),
        (f"{DRAW}0", 0.4): both(right), (f"{DRAW}1", 0.4): both(right),  # at expertsteer's coefficient: all right
        (f"{DRAW}0", 0.1): both(wrong), (f"{DRAW}1", 0.1): both(wrong),  # at another coefficient: all wrong
    }}
    config = EvaluationConfig(random_draws=2, permutations=200)
    report = assemble_report("toy", [plan], results, {0: fold.test}, config, ["expertsteer", "random"])
    steer = next(m for m in report.methods if m.method == "expertsteer")
    assert steer.vs_random.draw_accuracies == (1.0, 1.0) and steer.vs_random.p_value == 1.0
    assert steer.verdict == "no gain"  # no better than random vectors at the same coefficient
