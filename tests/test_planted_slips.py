"""Unit-level checks of the evaluation protocol on synthetic in-memory states, each able to catch one plausible slip:
fitted pieces that see questions outside the fold's train part, a sweep walk that stops too early or never, random
draws steered without the layer norm, folds of a question subset not mapped back, tests run on the other scoring."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from es_lightning.alignment import AlignmentMaps
from es_lightning.data.cache import PairedLayout
from es_lightning.data.examples import Question
from es_lightning.data.folds import Fold
from es_lightning.evaluation.assemble import assemble_report
from es_lightning.evaluation.choice import CoefficientChoice, SweepPoint
from es_lightning.evaluation.config import EvaluationConfig, GenerationEvaluation
from es_lightning.evaluation.protocol import DRAW, NONE, Evaluator, FoldPlan, LayerInfo, RenderedQuestions
from es_lightning.evaluation.protocol import TestRecord as Record  # not collected as a test class
from es_lightning.evaluation.stage import evaluation_folds
from es_lightning.models.spec import ModelInfo
from es_lightning.steering import vectors as vectors_module
from es_lightning.steering.hooks import row_steering
from es_lightning.steering.pair_search import PairSearchConfig
from es_lightning.steering.rfm import fit_rfm
from es_lightning.steering.vectors import VectorConfig, VectorInputs, compute_vectors

N_QUESTIONS, D_EXPERT, D_TARGET, N_LAYERS = 30, 6, 8, 4
GRID = [-0.8, -0.4, -0.2, -0.1, 0.1, 0.2, 0.4, 0.8]
# Val accuracy of every method at each coefficient (0.0: no steering), as in test_choice's walk: with
# stop_after_falls=2 the walk reaches 0.1, 0.2 (two falls) and -0.1 .. -0.8; 0.4 (the best, 0.9) lies beyond it.
CURVE = {0.0: 0.5, 0.1: 0.4, 0.2: 0.3, 0.4: 0.9, 0.8: 0.9, -0.1: 0.6, -0.2: 0.5, -0.4: 0.7, -0.8: 0.2}
METHODS = ("expertsteer", "rfm_self", "mean_difference", "random")
RFM_OPTIONS = {"iters": 1, "bandwidths": [1.0], "regs": [0.1]}


def _fold() -> Fold:
    """One fold over the synthetic questions: 16 train, 10 val (accuracies in tenths), 4 test, interleaved."""
    order = torch.randperm(N_QUESTIONS, generator=torch.Generator().manual_seed(5)).tolist()
    return Fold(0, tuple(sorted(order[:16])), tuple(sorted(order[16:26])), tuple(sorted(order[26:])))


def _question_rows() -> list[list[int]]:
    """Question q owns rows 2q (label 1) and 2q + 1 (label 0), as a multiple-choice cache does."""
    return [[2 * q, 2 * q + 1] for q in range(N_QUESTIONS)]


def _states(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expert [2N, L, d_E] and target [2N, L, d_T] states with a label direction and offsets, and the labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([1, 0] * N_QUESTIONS)
    u = nn.functional.normalize(torch.randn(D_EXPERT, generator=g), dim=0)
    sign = (2 * labels - 1).float()[:, None, None]
    expert = torch.randn(2 * N_QUESTIONS, N_LAYERS, D_EXPERT, generator=g) + 1.5 * sign * u + 3.0
    maps = torch.randn(N_LAYERS, D_TARGET, D_EXPERT, generator=g)
    noise = 0.1 * torch.randn(2 * N_QUESTIONS, N_LAYERS, D_TARGET, generator=g)
    return expert, torch.einsum("nld,ltd->nlt", expert, maps) + noise + 2.0, labels


def _moved(states: torch.Tensor, questions, seed: int) -> torch.Tensor:
    """``states`` with the rows of ``questions`` replaced by other, larger states."""
    out = states.clone()
    rows = [r for q in questions for r in _question_rows()[q]]
    g = torch.Generator().manual_seed(seed)
    out[rows] = 10.0 * torch.randn(len(rows), *states.shape[1:], generator=g) + 20.0
    return out


class MemoryStore:
    """The part of :class:`es_lightning.data.store.CacheStore` the Evaluator reads, over in-memory states."""

    def __init__(self, expert: torch.Tensor, target: torch.Tensor, labels: torch.Tensor):
        self.states = {"expert": expert, "target": target}
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def layers(self, side: str) -> list[int]:
        return list(range(N_LAYERS))

    def width(self, side: str) -> int:
        return self.states[side].shape[-1]

    def read(self, side: str, rows, layers) -> torch.Tensor:
        index = torch.arange(len(self)) if rows is None else torch.as_tensor(list(rows), dtype=torch.long)
        return self.states[side][index][:, list(layers)].clone()


class TinyTarget(nn.Module):
    """Just enough of a Llama for :func:`row_steering`: a config and ``model.layers``."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(model_type="llama", hidden_size=D_TARGET)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(nn.Identity() for _ in range(N_LAYERS))


class CurveEvaluator(Evaluator):
    """An Evaluator whose multiple-choice scoring follows ``CURVE`` (by coefficient, for every variant) and which
    records, per scored variant, the norm of the steering each layer adds (from the real :func:`row_steering`)."""

    def score(self, questions, variants, desc: str = "scoring"):
        steering = row_steering(self.model, variants, list(range(len(variants))))
        out = []
        for v, variant in enumerate(variants):
            added = {j: float(table[v].norm()) for j, table in steering.table.items()}
            self.added.append((variant.name, variant.coefficient, added))
            right = round(CURVE[variant.coefficient if variant.steers else 0.0] * len(questions))
            correct = torch.arange(len(questions)) < right
            out.append({"mean": correct, "sum": correct.clone()})
        return out


def _evaluator(store: MemoryStore, stop_after_falls: int = 2) -> CurveEvaluator:
    ids = [f"q{q}" for q in range(N_QUESTIONS)]
    rendered = RenderedQuestions([f"prompt {q}" for q in ids], [["a", "b"]] * N_QUESTIONS, [0] * N_QUESTIONS, ids, ids)
    config = EvaluationConfig(
        coefficients=GRID,
        stop_after_falls=stop_after_falls,
        random_draws=2,
        permutations=100,
        generation=GenerationEvaluation(enabled=False),
    )
    vectors = VectorConfig(methods=list(METHODS), rfm_options=dict(RFM_OPTIONS))
    pairing = PairSearchConfig(rule="depth", top_k=2, max_components=16)
    evaluator = CurveEvaluator(
        TinyTarget(),
        None,
        rendered,
        store,
        _question_rows(),
        LayerInfo(list(range(N_LAYERS)), list(range(N_LAYERS)), N_LAYERS, N_LAYERS),
        config,
        vectors,
        pairing,
        progress=False,
    )
    evaluator.added = []
    return evaluator


# ------------------------------------------------------------------ fitted pieces see the fold's train questions only
def test_a_folds_maps_vectors_and_norms_do_not_change_when_its_val_and_test_states_do():
    """The closed-form maps, vectors and layer norms are fitted on the fold's train questions: replacing the cached
    states of its val and test questions changes none of them (a refit on all questions would)."""
    fold = _fold()
    expert, target, labels = _states()
    moved_expert = _moved(expert, fold.val + fold.test, seed=1)
    moved_target = _moved(target, fold.val + fold.test, seed=2)
    base = _evaluator(MemoryStore(expert, target, labels))
    moved = _evaluator(MemoryStore(moved_expert, moved_target, labels))
    pairs, maps, _ = base.fold_alignment(fold)
    moved_pairs, moved_maps, _ = moved.fold_alignment(fold)
    assert pairs == moved_pairs == [(1, 1), (2, 2)]
    for i, _ in pairs:
        assert maps(i).shape == (D_TARGET, D_EXPERT) and torch.equal(maps(i), moved_maps(i)), f"map of expert layer {i}"
    vectors, norms, _ = base.fold_vectors(fold, pairs, maps)
    moved_vectors, moved_norms, _ = moved.fold_vectors(fold, pairs, moved_maps)
    assert norms == moved_norms
    for method, by_layer in vectors.items():
        assert all(torch.equal(v, moved_vectors[method][j]) for j, v in by_layer.items()), method


def test_layer_norms_are_the_mean_state_norms_of_the_folds_train_rows():
    fold = _fold()
    expert, target, labels = _states()
    target = _moved(target, fold.val + fold.test, seed=3)  # other questions' states far from the train rows'
    evaluator = _evaluator(MemoryStore(expert, target, labels))
    pairs, maps, _ = evaluator.fold_alignment(fold)
    _, norms, _ = evaluator.fold_vectors(fold, pairs, maps)
    train_rows = [r for q in fold.train for r in _question_rows()[q]]
    assert sorted(norms) == [1, 2]
    for j, norm in norms.items():
        expected = float(target[train_rows, j].norm(dim=-1).mean())
        assert norm == pytest.approx(expected, rel=1e-6)
        assert abs(float(target[:, j].norm(dim=-1).mean()) - expected) > 0.1 * expected  # all rows would differ


def test_the_rfm_fits_of_a_fold_split_their_validation_rows_by_question(monkeypatch):
    """Every RFM of a fold gets each row's question as its group, so its validation split takes whole questions."""
    fold = _fold()
    seen = []
    real = vectors_module.fit_rfm
    monkeypatch.setattr(vectors_module, "fit_rfm", lambda x, y, **k: seen.append(k.get("groups")) or real(x, y, **k))
    evaluator = _evaluator(MemoryStore(*_states()))
    pairs, maps, _ = evaluator.fold_alignment(fold)
    evaluator.fold_vectors(fold, pairs, maps)
    expected = [f"q{q}" for q in fold.train for _ in range(2)]
    assert len(seen) == 2 * len(pairs)  # expertsteer and rfm_self, one fit per pair
    assert all(groups is not None and list(groups) == expected for groups in seen)


# --------------------------------------------------------------------------- the sweep's walk inside the plan
@pytest.mark.parametrize(
    ("stop_after_falls", "reached", "chosen"),
    [
        (2, [0.1, 0.2, -0.1, -0.2, -0.4, -0.8], -0.4),  # 0.4 (val accuracy 0.9) lies beyond two falls
        (1, [0.1, -0.1, -0.2], -0.1),
    ],
)
def test_the_plan_sweeps_until_the_configured_falls_and_chooses_among_the_reached(stop_after_falls, reached, chosen):
    evaluator = _evaluator(MemoryStore(*_states()), stop_after_falls)
    plan = evaluator.plan(_fold())
    scored = {(name, c) for name, c, _ in evaluator.added}
    assert {("expertsteer", c) for c in GRID} <= scored  # the whole grid is scored in one pass
    for method in METHODS:
        assert sorted(plan.sweep[method]) == sorted([0.0, *reached]), method
        accuracy = {c: p.accuracy for c, p in plan.sweep[method].items()}
        assert accuracy == pytest.approx({c: CURVE[c] for c in [0.0, *reached]})
        assert plan.choices[method] == CoefficientChoice(chosen, chosen)


# ----------------------------------------------------------------------- random draws at the methods' strength
def test_random_draws_add_as_much_steering_as_the_method_at_the_same_coefficient():
    """Draws and methods are unit vectors scaled by coefficient x the layer's mean state norm (about 20 here);
    a draw steered without the norm would add about 20 times less."""
    fold = _fold()
    evaluator = _evaluator(MemoryStore(*_states()))
    plan = evaluator.plan(fold)
    assert all(norm > 5 for norm in plan.norms.values())
    evaluator.added.clear()
    evaluator.score_test(plan, list(fold.test))
    draws = [(name, c, added) for name, c, added in evaluator.added if name.startswith(DRAW)]
    methods = [(name, c, added) for name, c, added in evaluator.added if name != NONE and not name.startswith(DRAW)]
    assert {name for name, _, _ in draws} == {f"{DRAW}0", f"{DRAW}1"} and {c for _, c, _ in draws} == {-0.4}
    for name, coefficient, added in draws + methods:
        assert sorted(added) == sorted(plan.norms), name
        for j, norm in added.items():
            assert norm == pytest.approx(abs(coefficient) * plan.norms[j], rel=1e-5), (name, coefficient, j)


# ------------------------------------------------------------------------------ folds of a subset of questions
def _datamodule(n: int = 40) -> SimpleNamespace:
    questions = [Question(f"q{q}", f"prompt {q}", ["a", "b"], 0, f"topic{q % 7}") for q in range(n)]
    order = random.Random(11).sample(range(n), n)
    split = {"train": sorted(order[:24]), "val": sorted(order[24:32]), "test": sorted(order[32:])}
    return SimpleNamespace(all_questions=questions, question_split=split)  # a QuestionTable's two fields used here


def test_folds_of_a_question_subset_index_the_full_question_list():
    datamodule = _datamodule()
    folds = evaluation_folds(datamodule, EvaluationConfig(folds=3, max_questions=12), seed=4)
    subset = set(folds[0].train) | set(folds[0].val) | set(folds[0].test)
    assert len(subset) == 12 and subset != set(range(12)) and max(subset) >= 12  # a real subset of the 40
    assert sorted(q for fold in folds for q in fold.test) == sorted(subset)  # each of its questions tested once
    for fold in folds:
        parts = [set(fold.train), set(fold.val), set(fold.test)]
        assert sum(len(p) for p in parts) == 12 and set().union(*parts) == subset, fold


def test_the_datamodule_split_of_a_question_subset_keeps_its_questions():
    datamodule = _datamodule()
    (fold,) = evaluation_folds(datamodule, EvaluationConfig(folds=None, max_questions=20), seed=4)
    subset = set(fold.train) | set(fold.val) | set(fold.test)
    assert len(subset) == 20 and max(subset) >= 20
    for name, part in (("train", fold.train), ("val", fold.val), ("test", fold.test)):
        assert list(part) == [q for q in datamodule.question_split[name] if q in subset], name


# ------------------------------------------------------------------------------ tests under the report's scoring
def test_sign_and_permutation_tests_use_the_reports_scoring():
    """Mean and sum correctness differ for the method, no steering and the draws; each scoring gives its own tests."""
    fold = Fold(0, (0, 1), (2,), (3, 4, 5, 6, 7, 8))
    plan = FoldPlan(
        fold,
        [(1, 1)],
        {},
        [{}, {}],
        {1: 1.0},
        {"expertsteer": CoefficientChoice(0.4, 0.4)},
        {"expertsteer": {0.0: SweepPoint(0.5), 0.4: SweepPoint(0.6)}},
    )
    T, F = True, False
    correct = {  # key: (mean, sum) correctness per test question
        (NONE, 0.0): ([T, F, F, F, F, F], [T, T, T, T, F, F]),
        ("expertsteer", 0.4): ([T, T, T, T, T, F], [F, F, F, F, T, T]),
        (f"{DRAW}0", 0.4): ([F, F, F, F, F, F], [T, T, T, T, T, T]),
        (f"{DRAW}1", 0.4): ([T, F, F, F, F, F], [T, T, T, T, T, F]),
    }
    records = [Record({key: {"mean": m[q], "sum": s[q]} for key, (m, s) in correct.items()}, {}) for q in range(6)]
    expected = {"mean": ((4, 0, 2), 5 / 6, (0.0, 1 / 6)), "sum": ((2, 4, 0), 2 / 6, (1.0, 5 / 6))}
    for scoring, (sign, accuracy, draws) in expected.items():
        config = EvaluationConfig(random_draws=2, permutations=200, scoring=scoring)
        steer = assemble_report("toy", [(plan, records)], config, ["expertsteer"]).methods[1]
        for result in (steer, steer.unconstrained):
            assert (result.vs_none.wins, result.vs_none.losses, result.vs_none.ties) == sign, scoring
            assert result.vs_random.accuracy == pytest.approx(accuracy) and result.vs_random.n_questions == 6
            assert result.vs_random.draw_accuracies == pytest.approx(draws), scoring
        assert (steer.folds[0].accuracy_mean, steer.folds[0].accuracy_sum) == pytest.approx((5 / 6, 2 / 6))


# ---------------------------------------------------------------------- expert directions mapped without the bias
def test_expertsteer_maps_the_rfm_direction_by_the_encoder_without_its_bias():
    """With the auto-encoder's own encoder (bias far from zero), expertsteer's vector is the direction in which the
    encoder's output moves when the expert state moves along the RFM direction: W v, not W v + b."""
    layout = PairedLayout(
        ModelInfo("e", "/e", "fe", "gpt2", 4, D_EXPERT, (1, 2)),
        ModelInfo("t", "/t", "ft", "llama", 4, D_TARGET, (1, 2)),
        "last",
    )
    module = AlignmentMaps(objective="paired")
    module.build(layout, {1: 1, 2: 2})
    expert, target, labels = _states()
    module.init_from_layers(lambda i: expert[:, i], lambda j: target[:, j], ridge=1e-3)
    module.enc_bias.data = 5.0 * torch.randn(module.enc_bias.shape, generator=torch.Generator().manual_seed(7))
    inputs = VectorInputs(
        expert[:, 1:3],
        target[:, 1:3],
        labels,
        [1, 2],
        [1, 2],
        encoder_linear=module.encoder_linear,
        rfm_options=dict(RFM_OPTIONS),
        seed=0,
    )
    vector = compute_vectors("expertsteer", [(2, 2)], inputs).vectors[2]
    direction = fit_rfm(expert[:, 2], labels, seed=0, device="cpu", **RFM_OPTIONS).direction
    with torch.no_grad():
        xs, _ = module.standardise(expert[:, 1:3])
        moved = module.encode(xs + direction) - module.encode(xs)  # the expert scale is one scalar per layer
    expected = nn.functional.normalize(moved[:, 1].mean(0), dim=0)
    assert float(vector @ expected) > 1 - 1e-4
