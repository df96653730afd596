"""The evaluation protocol: k-fold cross-validation over questions, with every fitted piece inside the fold.

Per fold (``protocol: nested``, the default): the fold's *train* questions are split by question into fit and
held-out parts; the layer-pair search (:mod:`es_lightning.steering.pair_search`) fits closed-form alignment maps
on the fit part, scores every pair on the held-out part and chooses pairs; steering vectors of every method come
from all train questions, mapped by that fold's maps; each method's coefficient is chosen on the fold's *val*
questions by a sweep outwards from zero; the fold's *test* questions are then scored once with no steering, with
each method at its chosen coefficient, and with ``random_draws`` random unit vectors at every chosen coefficient.
No fitted piece sees a test question. ``protocol: shared`` reuses the checkpoint's auto-encoders and pairs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from es_lightning.data.examples import Question
from es_lightning.data.store import CacheStore, LayerRows
from es_lightning.data.folds import Fold, make_folds
from es_lightning.evaluation.config import EvaluationConfig
from es_lightning.evaluation.scoring import ChoiceScores, correctness, score_choices
from es_lightning.models.prompting import render_prompt
from es_lightning.steering.hooks import steer
from es_lightning.steering.pair_search import PairSearchConfig, search_pairs
from es_lightning.steering.rows import PairedRows, split_by_group
from es_lightning.steering.vectors import VectorConfig, VectorInputs, compute_vectors, layer_norms, random_directions

log = logging.getLogger(__name__)

NONE = "none"
DRAW = "random draw "  # variant name prefix of the random control's draws: "random draw 3"


@dataclass
class SharedAlignment:
    """The ``shared`` protocol's alignment: the checkpoint's pairs and auto-encoder maps, the same in every fold."""

    pairs: list[tuple[int, int]]
    encoder_linear: Callable[[int], torch.Tensor]


@dataclass
class LayerInfo:
    """Captured layers of both models and their depths (for the pair search's depth baseline)."""

    expert_layers: list[int]
    target_layers: list[int]
    expert_depth: int
    target_depth: int


@dataclass
class FoldPlan:
    """What a fold's train and val parts decided: pairs, vectors per method, random draws, chosen coefficients."""

    fold: Fold
    pairs: list[tuple[int, int]]
    vectors: dict[str, dict[int, torch.Tensor]]
    draws: list[dict[int, torch.Tensor]]
    norms: dict[int, float]
    chosen: dict[str, float]
    sweep: dict[str, dict[float, float]]  # method -> coefficient -> val accuracy (0.0 holds no steering)
    diagnostics: dict[str, Any] = field(default_factory=dict)


@dataclass
class RenderedQuestions:
    """Prompts and choices as the target model sees them, plus answers and groups."""

    prompts: list[str]
    choices: list[list[str]]
    answers: list[int]
    groups: list[str]
    ids: list[str]


def render_questions(tokenizer, questions: Sequence[Question], completion_template: str, chat_template: bool) -> RenderedQuestions:
    """Render questions for scoring with the same templates that built the cached examples."""
    prompts, choices = [], []
    for q in questions:
        prompts.append(render_prompt(tokenizer, q.prompt, chat_template))
        rendered = [completion_template.format(choice=c) for c in q.choices]
        choices.append([c.lstrip() for c in rendered] if chat_template else rendered)
    return RenderedQuestions(prompts, choices, [q.answer for q in questions], [q.group for q in questions], [q.id for q in questions])


def plan_folds(n_questions: int, groups: Sequence[str], config: EvaluationConfig, seed: int,
               split: dict[str, list[int]] | None = None) -> list[Fold]:
    """The folds: k-fold over questions, or one 'fold' from a given train/val/test split of question indices."""
    if config.folds is None:
        if split is None:
            raise ValueError("folds: null needs the DataModule's train/val/test split of questions.")
        return [Fold(0, tuple(split["train"]), tuple(split["val"]), tuple(split["test"]))]
    ids = [f"q{i}" for i in range(n_questions)]
    return make_folds(ids, k=config.folds, mode=config.fold_mode, seed=seed,
                      groups=list(groups) if config.fold_mode == "group" else None, val_fraction=config.val_fraction)


class Evaluator:
    """Runs the protocol on one target model for one data set.

    ``store`` reads the cached example states (memory-mapped, only the rows and layers a step needs) and
    ``question_rows`` maps each question index to its example rows, so a fold's fitted pieces use only its train
    questions. The pair search reads one layer at a time; vectors read only the chosen pairs' layers.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        rendered: RenderedQuestions,
        store: CacheStore,
        question_rows: Sequence[Sequence[int]],
        layers: LayerInfo,
        config: EvaluationConfig,
        vectors: VectorConfig,
        pairing: PairSearchConfig,
        objective: str = "paired",
        shared: SharedAlignment | None = None,
        progress: bool = True,
        add_special_tokens: bool = True,
        block_path: str | None = None,
    ):
        config.validate()
        vectors.validate()
        pairing.validate()
        if config.protocol == "shared" and shared is None:
            raise ValueError("protocol: shared needs the checkpoint's pairs and auto-encoders; fit with LayerPairingCallback.")
        self.model, self.tokenizer, self.rendered = model, tokenizer, rendered
        self.store, self.question_rows = store, question_rows
        self.layers, self.config, self.vector_config, self.pairing = layers, config, vectors, pairing
        self.objective, self.shared = objective, shared
        self.progress, self.add_special_tokens, self.block_path = progress, add_special_tokens, block_path

    # ----------------------------------------------------------------------------------- scoring
    def score(self, questions: Sequence[int], method: str = NONE, coefficient: float = 0.0,
              vectors: dict[int, torch.Tensor] | None = None, norms: dict[int, float] | None = None,
              desc: str = "scoring") -> list[ChoiceScores]:
        """Score the given question indices, steered by ``vectors`` at ``coefficient`` unless method is none."""
        prompts = [self.rendered.prompts[q] for q in questions]
        choices = [self.rendered.choices[q] for q in questions]
        context = None
        if method != NONE and coefficient != 0:
            context = lambda: steer(self.model, vectors, coefficient, norms, positions=self.config.positions,  # noqa: E731
                                    block_path=self.block_path)
        return score_choices(self.model, self.tokenizer, prompts, choices, context=context, batch_size=self.config.batch_size,
                             progress=self.progress, desc=desc, add_special_tokens=self.add_special_tokens)

    def correct(self, scores: Sequence[ChoiceScores], questions: Sequence[int], normalise: bool) -> torch.Tensor:
        """Per-question correctness under one scoring."""
        return correctness(scores, [self.rendered.answers[q] for q in questions], normalise)

    # ----------------------------------------------------------------------------- fitted pieces
    def rows_of(self, questions: Sequence[int]) -> PairedRows:
        """The cached rows of these questions (read one layer at a time on demand), grouped by the question's group key."""
        rows = [(r, q) for q in questions for r in self.question_rows[q]]
        index = [r for r, _ in rows]
        return PairedRows(LayerRows(self.store, "expert", index), LayerRows(self.store, "target", index),
                          self.store.labels[torch.tensor(index, dtype=torch.long)], [self.rendered.groups[q] for _, q in rows])

    def fold_alignment(self, fold: Fold) -> tuple[list[tuple[int, int]], Callable[[int], torch.Tensor], dict]:
        """Pairs and expert->target maps for a fold: searched inside its train questions (nested) or shared."""
        if self.config.protocol == "shared":
            return list(self.shared.pairs), self.shared.encoder_linear, {"protocol": "shared"}
        seed = self.vector_config.seed + fold.index
        groups = [self.rendered.groups[q] for q in fold.train]
        kept, held = split_by_group(groups, self.pairing.heldout_fraction, seed)
        info = self.layers
        outcome = search_pairs(
            self.rows_of([fold.train[k] for k in kept]), self.rows_of([fold.train[k] for k in held]),
            info.expert_layers, info.target_layers, info.expert_depth, info.target_depth, self.pairing, self.objective,
        )
        return list(outcome.result.pairs), outcome.linear.__getitem__, {"protocol": "nested", "search": outcome.result.to_dict()}

    def fold_vectors(self, fold: Fold, pairs, encoder_linear) -> tuple[dict[str, dict[int, torch.Tensor]], dict[int, float], dict[str, Any]]:
        """Vectors of every method from the fold's train questions only."""
        rows = self.rows_of(fold.train)
        seed = self.vector_config.seed + fold.index
        expert_layers, target_layers = list(dict.fromkeys(i for i, _ in pairs)), list(dict.fromkeys(j for _, j in pairs))
        target = self.store.read("target", rows.target.rows, target_layers)  # only the chosen pairs' layers
        inputs = VectorInputs(
            expert=self.store.read("expert", rows.expert.rows, expert_layers), target=target, labels=rows.labels,
            expert_layers=expert_layers, target_layers=target_layers, encoder_linear=encoder_linear,
            rfm_options=dict(self.vector_config.rfm_options), seed=seed, groups=rows.groups,
            device=getattr(self.model, "device", "cpu"),
        )
        vectors, diagnostics = {}, {}
        for method in self.vector_config.methods:
            result = compute_vectors(method, pairs, inputs)
            vectors[method] = result.vectors
            diagnostics[method] = {str(k): v for k, v in result.diagnostics.items()}
        norms = layer_norms(target, target_layers, [j for _, j in pairs])
        return vectors, norms, diagnostics

    def random_draws(self, fold: Fold, pairs) -> list[dict[int, torch.Tensor]]:
        """The fold's random control: ``random_draws`` independent unit vectors per steered layer."""
        width = self.store.width("target")
        base = 1_000_003 * (self.vector_config.seed + 1) + 1009 * fold.index
        return [random_directions([j for _, j in pairs], width, base + d) for d in range(self.config.random_draws)]

    def sweep(self, fold: Fold, val: list[int], method: str, vectors, norms, base: float) -> dict[float, float]:
        """Val accuracy per coefficient, walking outwards from zero on each side until it falls repeatedly."""
        normalise = self.config.scoring == "mean"
        curve = {0.0: base}
        for side in self.config.sweep_order():
            previous, falls = base, 0
            for coefficient in side:
                scores = self.score(val, method, coefficient, vectors, norms, desc=f"fold {fold.index} val, {method} x{coefficient:g}")
                curve[coefficient] = accuracy = self.correct(scores, val, normalise).float().mean().item()
                falls = falls + 1 if accuracy < previous else 0
                previous = accuracy
                if falls >= self.config.stop_after_falls:
                    break
        return curve

    def plan(self, fold: Fold) -> FoldPlan:
        """Alignment and vectors from the fold's train part; each method's coefficient chosen on its val part."""
        pairs, encoder_linear, alignment = self.fold_alignment(fold)
        vectors, norms, diagnostics = self.fold_vectors(fold, pairs, encoder_linear)
        val = list(fold.val)
        if self.config.max_val_questions and len(val) > self.config.max_val_questions:
            generator = torch.Generator().manual_seed(self.vector_config.seed + fold.index)
            val = sorted(val[i] for i in torch.randperm(len(val), generator=generator)[: self.config.max_val_questions].tolist())
        normalise = self.config.scoring == "mean"
        base = self.correct(self.score(val, desc=f"fold {fold.index} val, no steering"), val, normalise).float().mean().item()
        sweep, chosen = {}, {}
        for method in self.vector_config.methods:
            curve = self.sweep(fold, val, method, vectors[method], norms, base)
            sweep[method] = curve
            chosen[method] = max((c for c in curve if c != 0.0), key=lambda c: (curve[c], -abs(c), c > 0))
        return FoldPlan(fold, pairs, vectors, self.random_draws(fold, pairs), norms, chosen, sweep,
                        {"alignment": alignment, "vectors": diagnostics, "n_val_scored": len(val)})

    # -------------------------------------------------------------------------------------- test
    def test_variants(self, plan: FoldPlan) -> list[tuple[str, float]]:
        """(variant, coefficient) pairs scored on a fold's test part: none, each method at its choice, and every
        random draw at every coefficient a steered method chose (draws for equal coefficients are shared)."""
        variants = [(NONE, 0.0)] + [(m, plan.chosen[m]) for m in self.vector_config.methods]
        for coefficient in dict.fromkeys(plan.chosen[m] for m in self.vector_config.methods if m != "random"):
            variants += [(f"{DRAW}{d}", coefficient) for d in range(len(plan.draws))]
        return list(dict.fromkeys(variants))

    def score_test(self, plan: FoldPlan, questions: Sequence[int]) -> dict[tuple[str, float], dict[str, torch.Tensor]]:
        """Correctness (both scorings) of every test variant on the given test questions of this fold."""
        out = {}
        for variant, coefficient in self.test_variants(plan):
            if variant.startswith(DRAW):
                vectors = plan.draws[int(variant[len(DRAW):])]
            else:
                vectors = plan.vectors.get(variant)
            scores = self.score(questions, variant, coefficient, vectors, plan.norms,
                                desc=f"fold {plan.fold.index} test, {variant} x{coefficient:g}")
            out[(variant, coefficient)] = {"mean": self.correct(scores, questions, True), "sum": self.correct(scores, questions, False)}
        return out
