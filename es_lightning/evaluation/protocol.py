"""The evaluation protocol: k-fold cross-validation over questions, vectors and coefficients chosen inside
each fold's training part, accuracy on its test part, paired tests against no steering and random vectors.

Per fold: steering vectors come from the cached states of the fold's *train* questions (the auto-encoders
and the layer pairs use no labels, so they are shared by all folds); each method's coefficient is chosen
on the fold's *val* questions from a grid; the fold's *test* questions are then scored once with no
steering, with each method at its chosen coefficient, and with the random control at each of those
coefficients. Every question is tested exactly once over the folds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from es_lightning.data.examples import Question
from es_lightning.data.folds import Fold, make_folds
from es_lightning.evaluation.report import DatasetReport, FoldResult, method_result, sweep_curve
from es_lightning.evaluation.scoring import ChoiceScores, correctness, score_choices
from es_lightning.models.prompting import render_prompt
from es_lightning.steering.hooks import steer
from es_lightning.steering.vectors import METHODS, VectorInputs, compute_vectors, layer_norms

log = logging.getLogger(__name__)

NONE = "none"


@dataclass
class EvaluationConfig:
    """How ``es-lightning test`` evaluates.

    ``coefficients``: the grid (relative to each steered layer's mean hidden-state norm) searched on val,
    both signs. ``folds``: k for cross-validation over questions; ``null`` uses the DataModule's own
    train/val/test split instead. ``fold_mode``: ``random`` by question, ``group`` by the data's group field,
    or ``contiguous`` blocks (for sets that pair adjacent rows). ``max_questions``: evaluate a seeded subset.
    ``max_val_questions``: cap the val questions used for the coefficient sweep in each fold.
    ``scoring``: ``mean`` (length-normalised) or ``sum`` log-likelihood picks coefficients and runs the tests;
    accuracy is reported under both.
    """

    methods: list[str] = field(default_factory=lambda: list(METHODS))
    coefficients: list[float] = field(default_factory=lambda: [-0.2, -0.1, 0.1, 0.2])
    folds: int | None = 5
    fold_mode: Literal["random", "group", "contiguous"] = "random"
    val_fraction: float = 0.25
    max_questions: int | None = None
    max_val_questions: int | None = None
    scoring: Literal["mean", "sum"] = "mean"
    positions: Literal["all", "prompt", "generated"] = "all"
    batch_size: int = 16
    alpha: float = 0.05
    seed: int = 0
    rfm_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Refuse bad settings before any model is loaded."""
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"Unknown evaluation methods {unknown}: use some of {list(METHODS)}.")
        if "random" not in self.methods:
            raise ValueError("The evaluation needs the 'random' control among its methods: a gain counts only where it beats random vectors.")
        if not self.coefficients:
            raise ValueError("The coefficient grid is empty: give at least one coefficient, e.g. [-0.2, -0.1, 0.1, 0.2].")
        bad = [c for c in self.coefficients if not isinstance(c, (int, float)) or c != c or abs(c) == float("inf")]
        if bad:
            raise ValueError(f"Coefficients must be finite numbers, got {bad}.")
        if self.folds is not None and self.folds < 2:
            raise ValueError(f"folds must be >= 2 (or null for the DataModule's split), got {self.folds}.")
        if self.fold_mode not in ("random", "group", "contiguous"):
            raise ValueError(f"fold_mode must be 'random', 'group' or 'contiguous', got {self.fold_mode!r}.")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must lie in (0, 1), got {self.val_fraction}.")
        if self.max_questions is not None and self.max_questions < 2 * (self.folds or 2):
            raise ValueError(f"max_questions={self.max_questions} is too few for {self.folds or 'a'} folds; use at least {2 * (self.folds or 2)} or null.")
        if self.max_val_questions is not None and self.max_val_questions < 1:
            raise ValueError(f"max_val_questions must be >= 1 or null, got {self.max_val_questions}.")
        if self.batch_size < 1 or not 0 < self.alpha < 1:
            raise ValueError(f"batch_size must be >= 1 and alpha in (0, 1); got {self.batch_size} and {self.alpha}.")
        if self.positions not in ("all", "prompt", "generated"):
            raise ValueError(f"positions must be 'all', 'prompt' or 'generated', got {self.positions!r}.")
        if self.scoring not in ("mean", "sum"):
            raise ValueError(f"scoring must be 'mean' or 'sum', got {self.scoring!r}.")


@dataclass
class FoldPlan:
    """What a fold's training and val parts decided: vectors per method and the chosen coefficients."""

    fold: Fold
    vectors: dict[str, dict[int, torch.Tensor]]
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


def plan_folds(n_questions: int, groups: Sequence[str], config: EvaluationConfig, split: dict[str, list[int]] | None = None) -> list[Fold]:
    """The folds: k-fold over questions, or one 'fold' from a given train/val/test split of question indices."""
    if config.folds is None:
        if split is None:
            raise ValueError("folds: null needs the DataModule's train/val/test split of questions.")
        return [Fold(0, tuple(split["train"]), tuple(split["val"]), tuple(split["test"]))]
    ids = [f"q{i}" for i in range(n_questions)]
    return make_folds(ids, k=config.folds, mode=config.fold_mode, seed=config.seed,
                      groups=list(groups) if config.fold_mode == "group" else None, val_fraction=config.val_fraction)


class Evaluator:
    """Runs the protocol on one target model for one data set.

    ``states`` holds the cached example tensors (``expert``, ``target``, ``label``) and ``question_rows``
    maps each question index to its example rows, so a fold's vectors use only its training questions.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        rendered: RenderedQuestions,
        states: dict[str, torch.Tensor],
        question_rows: Sequence[Sequence[int]],
        expert_layers: Sequence[int],
        target_layers: Sequence[int],
        pairs: Sequence[tuple[int, int]],
        encoder_linear: Callable[[int], torch.Tensor] | None,
        config: EvaluationConfig,
        progress: bool = True,
        add_special_tokens: bool = True,
        block_path: str | None = None,
    ):
        config.validate()
        self.add_special_tokens = add_special_tokens
        self.block_path = block_path
        self.model, self.tokenizer, self.rendered = model, tokenizer, rendered
        self.states, self.question_rows = states, question_rows
        self.expert_layers, self.target_layers = list(expert_layers), list(target_layers)
        self.pairs = [tuple(p) for p in pairs]
        self.encoder_linear = encoder_linear
        self.config = config
        self.progress = progress

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

    # ------------------------------------------------------------------------------------ vectors
    def fold_vectors(self, fold: Fold) -> tuple[dict[str, dict[int, torch.Tensor]], dict[int, float], dict[str, Any]]:
        """Vectors of every method from the fold's training questions only."""
        rows = [r for q in fold.train for r in self.question_rows[q]]
        index = torch.tensor(rows, dtype=torch.long)
        inputs = VectorInputs(
            expert=self.states["expert"][index], target=self.states["target"][index], labels=self.states["label"][index],
            expert_layers=self.expert_layers, target_layers=self.target_layers, encoder_linear=self.encoder_linear,
            rfm_options=dict(self.config.rfm_options), seed=self.config.seed + fold.index,
        )
        vectors, diagnostics = {}, {}
        for method in self.config.methods:
            result = compute_vectors(method, self.pairs, inputs)
            vectors[method] = result.vectors
            diagnostics[method] = {str(k): v for k, v in result.diagnostics.items()}
        norms = layer_norms(inputs.target, self.target_layers, [j for _, j in self.pairs])
        return vectors, norms, diagnostics

    def plan(self, fold: Fold) -> FoldPlan:
        """Vectors from the fold's train part; each method's coefficient chosen on its val part."""
        vectors, norms, diagnostics = self.fold_vectors(fold)
        val = list(fold.val)
        if self.config.max_val_questions and len(val) > self.config.max_val_questions:
            generator = torch.Generator().manual_seed(self.config.seed + fold.index)
            val = sorted(val[i] for i in torch.randperm(len(val), generator=generator)[: self.config.max_val_questions].tolist())
        normalise = self.config.scoring == "mean"
        base = self.correct(self.score(val, desc=f"fold {fold.index} val, no steering"), val, normalise).float().mean().item()
        sweep, chosen = {}, {}
        for method in self.config.methods:
            curve = {0.0: base}
            for coefficient in self.config.coefficients:
                scores = self.score(val, method, coefficient, vectors[method], norms, desc=f"fold {fold.index} val, {method} x{coefficient:g}")
                curve[float(coefficient)] = self.correct(scores, val, normalise).float().mean().item()
            sweep[method] = curve
            grid = [float(c) for c in self.config.coefficients]
            chosen[method] = max(grid, key=lambda c: (curve[c], -abs(c), c > 0))
        return FoldPlan(fold, vectors, norms, chosen, sweep, {"vectors": diagnostics, "n_val_scored": len(val)})

    # -------------------------------------------------------------------------------------- test
    def test_variants(self, plan: FoldPlan) -> list[tuple[str, float]]:
        """(method, coefficient) pairs to score on a fold's test part: none, each method, random at each choice."""
        variants = [(NONE, 0.0)] + [(m, plan.chosen[m]) for m in self.config.methods]
        variants += [("random", plan.chosen[m]) for m in self.config.methods if m != "random"]
        return list(dict.fromkeys(variants))

    def score_test(self, plan: FoldPlan, questions: Sequence[int]) -> dict[tuple[str, float], dict[str, torch.Tensor]]:
        """Correctness (both scorings) of every test variant on the given test questions of this fold."""
        out = {}
        for method, coefficient in self.test_variants(plan):
            scores = self.score(questions, method, coefficient, plan.vectors.get(method), plan.norms,
                                desc=f"fold {plan.fold.index} test, {method} x{coefficient:g}")
            out[(method, coefficient)] = {"mean": self.correct(scores, questions, True), "sum": self.correct(scores, questions, False)}
        return out


def assemble_report(
    dataset: str,
    plans: Sequence[FoldPlan],
    results: dict[int, dict[tuple[str, float], dict[str, torch.Tensor]]],
    test_questions: dict[int, Sequence[int]],
    config: EvaluationConfig,
) -> DatasetReport:
    """Per-method fold accuracies, spreads, sign tests (pooled over folds) and verdicts."""
    scoring = config.scoring
    methods = [NONE] + list(config.methods)
    pooled: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
    pooled_random: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
    fold_results: dict[str, list[FoldResult]] = {m: [] for m in methods}
    for plan in plans:
        fold = plan.fold.index
        if not len(test_questions.get(fold, [])):
            continue
        fold_scores = results[fold]
        for method in methods:
            coefficient = 0.0 if method == NONE else plan.chosen[method]
            correct = fold_scores[(method, coefficient)]
            fold_results[method].append(FoldResult(
                fold, None if method == NONE else coefficient, correct["sum"].float().mean().item(),
                correct["mean"].float().mean().item(), len(correct["mean"]),
            ))
            pooled[method].append(correct[scoring])
            if method != NONE:
                pooled_random[method].append(fold_scores[("random", coefficient)][scoring])
    none = torch.cat(pooled[NONE])
    entries = []
    for method in methods:
        sweep = None if method == NONE else sweep_curve([plan.sweep[method] for plan in plans])
        if method == NONE:
            entries.append(method_result(NONE, fold_results[NONE], alpha=config.alpha))
        elif method == "random":
            entries.append(method_result(method, fold_results[method], torch.cat(pooled[method]), none, sweep=sweep, alpha=config.alpha))
        else:
            entries.append(method_result(method, fold_results[method], torch.cat(pooled[method]), none,
                                         torch.cat(pooled_random[method]), sweep=sweep, alpha=config.alpha))
    return DatasetReport(dataset, sum(len(q) for q in test_questions.values()), tuple(entries))
