"""The evaluation protocol: k-fold cross-validation over questions, with every fitted piece inside the fold.

Per fold (``protocol: nested``, the default): the fold's *train* questions are split by question into fit and
held-out parts; the layer-pair search (:mod:`es_lightning.steering.pair_search`) fits closed-form alignment maps
on the fit part, scores every pair on the held-out part and chooses pairs; steering vectors of every method come
from all train questions, mapped by that fold's maps. On the fold's *val* questions every coefficient of the grid is
scored (multiple choice) and, with generation evaluated, its damage measured (KL on the target's own unsteered
answers, empty and repetitive answers); each method's constrained and unconstrained coefficients are chosen there
(:mod:`es_lightning.evaluation.choice`). The fold's *test* questions are then scored and answered once with no
steering, with each method at its chosen coefficients, and with ``random_draws`` random unit vectors at those
coefficients. Rows of one batch carry different vectors and coefficients, so each of these is one batched pass.
No fitted piece sees a test question. ``protocol: shared`` reuses the checkpoint's auto-encoders and pairs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from es_lightning.data.folds import Fold
from es_lightning.data.store import CacheStore, LayerRows
from es_lightning.evaluation.answers import AnswerGenerator, AnswerRecord
from es_lightning.evaluation.choice import SweepPoint, choose, walked
from es_lightning.evaluation.config import EvaluationConfig
from es_lightning.evaluation.damage import AnswerHealth, Damage
from es_lightning.evaluation.fold_plan import (
    DRAW,
    NONE,
    FoldPlan,
    LayerInfo,
    RenderedQuestions,
    SharedAlignment,
    TestRecord,
    VariantKey,
    plan_folds,
    render_questions,
)
from es_lightning.evaluation.scoring import ChoiceScores, correctness, score_choices
from es_lightning.steering.hooks import SteeringVariant, row_steering
from es_lightning.steering.pair_search import Objective, PairSearchConfig, search_pairs
from es_lightning.steering.rows import PairedRows, split_by_group
from es_lightning.steering.vectors import VectorConfig, VectorInputs, compute_vector_set, random_directions

log = logging.getLogger(__name__)

# the fold's typed values live in fold_plan.py; importers of this module still find them here
__all__ = [
    "DRAW",
    "NONE",
    "Evaluator",
    "FoldPlan",
    "LayerInfo",
    "RenderedQuestions",
    "SharedAlignment",
    "TestRecord",
    "VariantKey",
    "plan_folds",
    "render_questions",
]


class Evaluator:
    """Runs the protocol on one target model for one data set.

    ``store`` reads the cached example states (memory-mapped, only the rows and layers a step needs) and
    ``question_rows`` maps each question index to its example rows, so a fold's fitted pieces use only its train
    questions. The pair search reads one layer at a time; vectors read only the chosen pairs' layers. ``answers``
    generates and measures answers (damage and generation accuracy) when ``config.generation.enabled``.

    Long because: one fold's life cycle (pieces fitted on its train questions, coefficients chosen on val, test
    scored and answered) shares the model, the cached rows and the batched scoring; each step's own logic lives in
    ``steering/`` (pairs, vectors), ``choice.py``, ``answers.py``, ``damage.py`` and ``scoring.py``.
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
        objective: Objective = "paired",
        shared: SharedAlignment | None = None,
        progress: bool = True,
        add_special_tokens: bool = True,
        block_path: str | None = None,
        answers: AnswerGenerator | None = None,
    ):
        config.validate()
        vectors.validate()
        pairing.validate()
        if config.protocol == "shared" and shared is None:
            raise ValueError(
                "protocol: shared needs the checkpoint's pairs and auto-encoders; fit with LayerPairingCallback."
            )
        self.model, self.tokenizer, self.rendered = model, tokenizer, rendered
        self.store, self.question_rows = store, question_rows
        self.layers, self.config, self.vector_config, self.pairing = layers, config, vectors, pairing
        self.objective, self.shared = objective, shared
        self.progress, self.add_special_tokens, self.block_path = progress, add_special_tokens, block_path
        self.answers = answers if config.generation.enabled else None  # generated answers and damage, if evaluated

    # ----------------------------------------------------------------------------------- scoring
    def score(
        self, questions: Sequence[int], variants: Sequence[SteeringVariant], desc: str = "scoring"
    ) -> list[dict[str, torch.Tensor]]:
        """Per variant, the correctness of each question under both scorings (``mean`` and ``sum``), every
        (variant, question) row scored in one batched pass whose rows carry their own steering."""
        prompts = [self.rendered.prompts[q] for _ in variants for q in questions]
        choices = [self.rendered.choices[q] for _ in variants for q in questions]
        steering = row_steering(
            self.model, variants, [v for v in range(len(variants)) for _ in questions], self.block_path
        )
        scores = score_choices(
            self.model,
            self.tokenizer,
            prompts,
            choices,
            batch_size=self.config.batch_size,
            progress=self.progress,
            desc=desc,
            add_special_tokens=self.add_special_tokens,
            steering=steering,
            positions=self.config.positions,
            block_path=self.block_path,
        )
        n = len(questions)
        return [
            {
                "mean": self.correct(scores[v * n : (v + 1) * n], questions, True),
                "sum": self.correct(scores[v * n : (v + 1) * n], questions, False),
            }
            for v in range(len(variants))
        ]

    def correct(self, scores: Sequence[ChoiceScores], questions: Sequence[int], normalise: bool) -> torch.Tensor:
        """Per-question correctness under one scoring."""
        return correctness(scores, [self.rendered.answers[q] for q in questions], normalise)

    # ----------------------------------------------------------------------------- fitted pieces
    def rows_of(self, questions: Sequence[int]) -> PairedRows:
        """The cached rows of these questions (read one layer at a time on demand), grouped by question."""
        rows = [(r, q) for q in questions for r in self.question_rows[q]]
        index = [r for r, _ in rows]
        expert, target = LayerRows(self.store, "expert", index), LayerRows(self.store, "target", index)
        labels = self.store.labels[torch.tensor(index, dtype=torch.long)]
        return PairedRows(expert, target, labels, [self.rendered.groups[q] for _, q in rows])

    def fold_alignment(self, fold: Fold) -> tuple[list[tuple[int, int]], Callable[[int], torch.Tensor], dict]:
        """Pairs and expert->target maps for a fold: searched inside its train questions (nested) or shared."""
        if self.config.protocol == "shared":
            assert self.shared is not None  # __init__ refuses protocol: shared without it
            return list(self.shared.pairs), self.shared.encoder_linear, {"protocol": "shared"}
        seed = self.vector_config.seed + fold.index
        groups = [self.rendered.groups[q] for q in fold.train]
        kept, held = split_by_group(groups, self.pairing.heldout_fraction, seed)
        info = self.layers
        outcome = search_pairs(
            self.rows_of([fold.train[k] for k in kept]),
            self.rows_of([fold.train[k] for k in held]),
            info.expert_layers,
            info.target_layers,
            info.expert_depth,
            info.target_depth,
            self.pairing,
            self.objective,
        )
        return (
            list(outcome.result.pairs),
            outcome.linear.__getitem__,
            {"protocol": "nested", "search": outcome.result.to_dict()},
        )

    def fold_vectors(
        self, fold: Fold, pairs, encoder_linear
    ) -> tuple[dict[str, dict[int, torch.Tensor]], dict[int, float], dict[str, dict[str, dict[str, float]]]]:
        """Vectors of every method from the fold's train questions only."""
        rows = self.rows_of(fold.train)
        assert isinstance(rows.expert, LayerRows) and isinstance(rows.target, LayerRows) and rows.labels is not None
        seed = self.vector_config.seed + fold.index
        expert_layers, target_layers = (
            list(dict.fromkeys(i for i, _ in pairs)),
            list(dict.fromkeys(j for _, j in pairs)),
        )
        target = self.store.read("target", rows.target.rows, target_layers)  # only the chosen pairs' layers
        inputs = VectorInputs(
            expert=self.store.read("expert", rows.expert.rows, expert_layers),
            target=target,
            labels=rows.labels,
            expert_layers=expert_layers,
            target_layers=target_layers,
            encoder_linear=encoder_linear,
            rfm_options=self.vector_config.rfm_options,
            seed=seed,
            groups=rows.groups,
            device=getattr(self.model, "device", "cpu"),
        )
        result = compute_vector_set(self.vector_config.methods, pairs, inputs)
        return result.vectors, result.norms, result.diagnostics

    def random_draws(self, fold: Fold, pairs) -> list[dict[int, torch.Tensor]]:
        """The fold's random control: ``random_draws`` independent unit vectors per steered layer."""
        width = self.store.width("target")
        base = 1_000_003 * (self.vector_config.seed + 1) + 1009 * fold.index
        return [random_directions([j for _, j in pairs], width, base + d) for d in range(self.config.random_draws)]

    def plan(self, fold: Fold) -> FoldPlan:
        """Alignment and vectors from the fold's train part; every coefficient of the grid scored (and, with
        generation evaluated, its damage measured) on the val part; each method's coefficients chosen there."""
        pairs, encoder_linear, alignment = self.fold_alignment(fold)
        vectors, norms, diagnostics = self.fold_vectors(fold, pairs, encoder_linear)
        val = list(fold.val)
        if self.config.max_val_questions and len(val) > self.config.max_val_questions:
            generator = torch.Generator().manual_seed(self.vector_config.seed + fold.index)
            val = sorted(
                val[i] for i in torch.randperm(len(val), generator=generator)[: self.config.max_val_questions].tolist()
            )
        plan = FoldPlan(
            fold,
            pairs,
            vectors,
            self.random_draws(fold, pairs),
            norms,
            {},
            {},
            {"alignment": alignment, "vectors": diagnostics, "n_val_scored": len(val)},
        )
        sides = self.config.sweep_order()
        keys = [(NONE, 0.0)] + [(m, c) for m in self.vector_config.methods for side in sides for c in side]
        scored = self.score(
            val, [plan.variant(key) for key in keys], desc=f"fold {fold.index} val, {len(keys)} variants"
        )
        accuracy = {key: scored[k][self.config.scoring].float().mean().item() for k, key in enumerate(keys)}
        reached = {}
        for method in self.vector_config.methods:
            curve = {0.0: accuracy[(NONE, 0.0)], **{c: accuracy[(method, c)] for side in sides for c in side}}
            reached[method] = walked(curve, sides, self.config.stop_after_falls)
        points = self.val_points(val, plan, [(m, c) for m, cs in reached.items() for c in cs], accuracy)
        for method in self.vector_config.methods:
            plan.sweep[method] = {0.0: points[(NONE, 0.0)], **{c: points[(method, c)] for c in reached[method]}}
            plan.choices[method] = choose(
                plan.sweep[method], reached[method], self.config.budget, constrain=self.answers is not None
            )
        return plan

    def val_points(
        self, val: list[int], plan: FoldPlan, keys: list[VariantKey], accuracy: dict[VariantKey, float]
    ) -> dict[VariantKey, SweepPoint]:
        """Each walked coefficient's val point: its accuracy and, with generation evaluated, its damage on the
        unsteered answers to the val prompts and (only where that KL is within budget: elsewhere the coefficient is
        out anyway) the health of its own answers."""
        if self.answers is None:
            return {key: SweepPoint(accuracy[key]) for key in [(NONE, 0.0), *keys]}
        reference = self.answers.reference(val)
        damage = [sum(row, Damage()) for row in self.answers.damage(reference, [plan.variant(k) for k in keys])]
        limit = self.config.budget.max_kl
        healthy = [k for k, d in zip(keys, damage) if limit is None or (d.kl is not None and d.kl <= limit)]
        records = self.answers.answer(
            val, [plan.variant(k) for k in [(NONE, 0.0), *healthy]], reference, with_damage=False
        )
        health = {
            key: sum((r.health for r in row), AnswerHealth()) for key, row in zip([(NONE, 0.0), *healthy], records)
        }
        points = {key: SweepPoint(accuracy[key], d, health.get(key)) for key, d in zip(keys, damage)}
        points[(NONE, 0.0)] = SweepPoint(
            accuracy[(NONE, 0.0)], Damage(tokens=sum(len(g.new_ids) for g in reference)), health[(NONE, 0.0)]
        )
        return points

    # -------------------------------------------------------------------------------------- test
    def test_variants(self, plan: FoldPlan) -> tuple[list[VariantKey], list[VariantKey]]:
        """The (variant, coefficient) keys scored on a fold's test part, for multiple choice and for generation:
        no steering; each method at its constrained and its unconstrained coefficient; the random draws at every
        coefficient a steered method chose (multiple choice: both choices; generation: the constrained one, the
        coefficient users generate with). Keys at coefficient 0 are no steering and are not scored again."""
        methods = self.vector_config.methods
        choices = [plan.choices[m] for m in methods]
        steered = [c for m, c in zip(methods, choices) if m != "random"]
        mc = (
            [(NONE, 0.0)]
            + [(m, c.applied) for m, c in zip(methods, choices)]
            + [(m, c.unconstrained) for m, c in zip(methods, choices)]
        )
        gen = [(NONE, 0.0)] + mc[1:]
        for coefficient in dict.fromkeys(x for c in steered for x in (c.applied, c.unconstrained)):
            mc += [(f"{DRAW}{d}", coefficient) for d in range(len(plan.draws))]
        for coefficient in dict.fromkeys(c.applied for c in steered):
            gen += [(f"{DRAW}{d}", coefficient) for d in range(min(len(plan.draws), self.config.generation_draws()))]
        keep = lambda keys: [k for k in dict.fromkeys(keys) if k == (NONE, 0.0) or k[1] != 0]  # noqa: E731
        return keep(mc), keep(gen) if self.answers is not None else []

    def score_test(self, plan: FoldPlan, questions: Sequence[int]) -> list[TestRecord]:
        """Per test question of this fold: correctness (both scorings) of every multiple-choice variant and the
        generated answer of every generation variant."""
        mc_keys, gen_keys = self.test_variants(plan)
        scored = self.score(
            questions, [plan.variant(k) for k in mc_keys], desc=f"fold {plan.fold.index} test, {len(mc_keys)} variants"
        )
        answers: list[list[AnswerRecord]] = []
        if gen_keys:  # the random draws are scored for accuracy only: no damage or perplexity measured for them
            generator = self.answers
            assert generator is not None  # test_variants gives generation variants only with an AnswerGenerator
            answers = generator.answer(
                questions,
                [plan.variant(k) for k in gen_keys],
                generator.reference(questions),
                measured=[not k[0].startswith(DRAW) for k in gen_keys],
            )
        return [
            TestRecord(
                {key: {s: bool(scored[v][s][k]) for s in ("mean", "sum")} for v, key in enumerate(mc_keys)},
                {key: answers[v][k] for v, key in enumerate(gen_keys)},
            )
            for k in range(len(questions))
        ]
