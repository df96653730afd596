"""How ``es-lightning test`` evaluates: folds, protocol, coefficient grid, random control, scoring."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from es_lightning.data.folds import FoldMode
from es_lightning.evaluation.generation_metrics import GENERATION_METRICS, GenerationMetric
from es_lightning.steering.options import Positions, check_coefficients

Scoring = Literal["mean", "sum"]  # length-normalised or summed log-likelihood of a choice


@dataclass
class GenerationEvaluation:
    """Generated answers in ``test`` (``model.evaluation.generation``): each fold's val prompts measure every swept
    coefficient's damage; its test questions are answered unsteered, by each method at its chosen coefficients and
    by the random draws."""

    enabled: bool = True
    """Evaluate generated answers and damage at all (false: multiple choice only, unconstrained coefficients)."""
    metrics: list[GenerationMetric] = field(default_factory=lambda: ["bleu_acc", "rouge_l_acc"])
    """How an answer is scored against the question's choices; the first runs the tests and the verdict.
    ``bleu_acc``/``rouge_l_acc``: lm-eval ``truthfulqa_gen`` (more similar to the correct choice than to every
    incorrect one); ``number_match``: lm-eval ``gsm8k`` (the last number equals the correct choice's);
    ``letter_match``: the choices go into the prompt as A., B., ... and the first letter answered is scored (alone)."""
    max_new_tokens: int = 32
    """Greedy tokens per answer (an answer ends at a blank line, as in lm-eval)."""
    chat_template: bool | None = None
    """null: prompts in the target's chat template when it has one, as ``predict`` does."""
    batch_size: int = 64
    """Rows per generate call (rows carry different vectors and coefficients)."""
    random_draws: int | None = None
    """How many of the fold's random draws also answer the test questions (null: all of ``evaluation.random_draws``);
    generation costs far more than scoring, so a CPU run may use fewer."""

    def validate(self) -> None:
        """Refuse bad settings before any model is loaded."""
        unknown = [m for m in self.metrics if m not in GENERATION_METRICS]
        if unknown or not self.metrics:
            raise ValueError(
                f"evaluation.generation.metrics {list(self.metrics)!r}: unknown or empty; use some of "
                f"{list(GENERATION_METRICS)} (or evaluation.generation.enabled: false)."
            )
        if "letter_match" in self.metrics and len(self.metrics) > 1:
            raise ValueError(
                "evaluation.generation.metrics: letter_match changes the prompt, so it must be the only metric."
            )
        if self.random_draws is not None and self.random_draws < 1:
            raise ValueError(f"evaluation.generation.random_draws must be >= 1 or null, got {self.random_draws}.")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError(
                f"evaluation.generation max_new_tokens and batch_size must be >= 1; got "
                f"{self.max_new_tokens} and {self.batch_size}."
            )


@dataclass
class DamageBudget:
    """How much damage the constrained coefficient may do (``model.evaluation.budget``), measured on each fold's val
    prompts (README: the defaults, measured). The constrained coefficient is the best val accuracy among those
    inside every limit; when none is, the method is not steered in that fold ("no coefficient within budget")."""

    max_kl: float | None = 0.5
    """Mean KL(unsteered || steered) per token of the target's own unsteered continuations, in nats; null: no limit."""
    max_empty_increase: float | None = 0.0
    """Share of empty answers above the unsteered model's; null: no limit."""
    max_repetition_increase: float | None = 0.1
    """Mean share of repeated word 3-grams per answer above the unsteered model's; null: no limit."""

    def validate(self) -> None:
        """Refuse negative or non-finite limits."""
        for name in ("max_kl", "max_empty_increase", "max_repetition_increase"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not value >= 0 or value == float("inf")):
                raise ValueError(f"evaluation.budget.{name} must be a finite number >= 0 or null, got {value!r}.")


@dataclass
class EvaluationConfig:
    """Settings of the cross-validated evaluation, ``test`` (``model.evaluation``; methods, RFM options and seed live
    in ``model.vectors``, the pair search in ``model.pairing``)."""

    protocol: Literal["nested", "shared"] = "nested"
    """``nested``: everything that scores a fold's test questions (maps, pairs, vectors, coefficients) is fitted on
    that fold's train and val questions only; ``shared``: the checkpoint's auto-encoders and pairs in every fold
    (test questions of the data module's train split were seen by the alignment; the report says so)."""
    coefficients: list[float] = field(default_factory=lambda: [-0.8, -0.4, -0.2, -0.1, 0.1, 0.2, 0.4, 0.8])
    """The grid, relative to each steered layer's mean hidden-state norm, swept on val outwards from 0 per side."""
    stop_after_falls: int = 2
    """A side of the sweep stops once val accuracy has fallen this many times in a row."""
    random_draws: int = 8
    """Random unit vectors per fold, each scored at every coefficient a method chose (the control)."""
    permutations: int = 10000
    """Permutations of the test against the random draws."""
    folds: int | None = 5
    """k of the cross-validation over questions; null: the data module's split (one fold)."""
    fold_mode: FoldMode = "random"
    """``random`` by question, ``group`` by the data's group field, ``contiguous`` blocks."""
    val_fraction: float = 0.25
    """Share of each fold's non-test questions that chooses coefficients (the rest fits)."""
    max_questions: int | None = None
    """A seeded subset of the questions; null: all."""
    max_val_questions: int | None = None
    """Val questions scored per coefficient at most; null: all."""
    scoring: Scoring = "mean"
    """``mean`` (length-normalised) or ``sum`` log-likelihood: picks coefficients and runs the tests."""
    positions: Positions = "all"
    """Where the vectors are added while scoring and generating."""
    batch_size: int = 16
    """Questions per scoring batch."""
    alpha: float = 0.05
    """Significance level of the verdicts (against no steering and against the draws)."""
    generation: GenerationEvaluation = field(default_factory=GenerationEvaluation)
    """The generated-answer evaluation and the damage measurement."""
    budget: DamageBudget = field(default_factory=DamageBudget)
    """The damage the constrained coefficient may do (the unconstrained choice is reported beside it)."""

    def validate(self) -> None:
        """Refuse bad settings before any model is loaded."""
        self.generation.validate()
        self.budget.validate()
        if self.protocol not in ("nested", "shared"):
            raise ValueError(f"evaluation.protocol must be 'nested' or 'shared', got {self.protocol!r}.")
        check_coefficients(self.coefficients, "evaluation.coefficients")
        if 0 in self.coefficients:
            raise ValueError("evaluation.coefficients must not hold 0: no steering is always scored as the baseline.")
        if not isinstance(self.random_draws, int) or self.random_draws < 1:
            raise ValueError(
                f"evaluation.random_draws must be an integer >= 1 (8 or more recommended), got {self.random_draws!r}."
            )
        if self.stop_after_falls < 1 or self.permutations < 100:
            raise ValueError(
                f"stop_after_falls must be >= 1 and permutations >= 100; "
                f"got {self.stop_after_falls}, {self.permutations}."
            )
        if self.folds is not None and self.folds < 2:
            raise ValueError(f"folds must be >= 2 (or null for the DataModule's split), got {self.folds}.")
        if self.fold_mode not in ("random", "group", "contiguous"):
            raise ValueError(f"fold_mode must be 'random', 'group' or 'contiguous', got {self.fold_mode!r}.")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must lie in (0, 1), got {self.val_fraction}.")
        if self.max_questions is not None and self.max_questions < 2 * (self.folds or 2):
            raise ValueError(
                f"max_questions={self.max_questions} is too few for {self.folds or 'a'} folds; "
                f"use at least {2 * (self.folds or 2)} or null."
            )
        if self.max_val_questions is not None and self.max_val_questions < 1:
            raise ValueError(f"max_val_questions must be >= 1 or null, got {self.max_val_questions}.")
        if self.batch_size < 1 or not 0 < self.alpha < 1:
            raise ValueError(f"batch_size must be >= 1 and alpha in (0, 1); got {self.batch_size} and {self.alpha}.")
        if self.positions not in ("all", "prompt", "generated"):
            raise ValueError(f"positions must be 'all', 'prompt' or 'generated', got {self.positions!r}.")
        if self.scoring not in ("mean", "sum"):
            raise ValueError(f"scoring must be 'mean' or 'sum', got {self.scoring!r}.")

    def generation_draws(self) -> int:
        """How many random draws answer the test questions: ``generation.random_draws``, at most ``random_draws``."""
        return min(self.random_draws, self.generation.random_draws or self.random_draws)

    def sweep_order(self) -> list[list[float]]:
        """The grid as two walks outwards from zero: positive ascending, negative descending."""
        grid = sorted({float(c) for c in self.coefficients})
        return [c for c in ([x for x in grid if x > 0], sorted((x for x in grid if x < 0), reverse=True)) if c]
