"""What a fold decided and what its test questions gave, as typed values: the fold's plan (pairs, vectors, draws,
sweep and coefficient choices), one test question's record, the rendered questions, and the folds themselves."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from es_lightning.data.examples import Question
from es_lightning.data.folds import Fold, make_folds
from es_lightning.evaluation.answers import AnswerRecord
from es_lightning.evaluation.choice import CoefficientChoice, SweepPoint
from es_lightning.evaluation.config import EvaluationConfig
from es_lightning.models.prompting import render_prompt
from es_lightning.steering.hooks import SteeringVariant

NONE = "none"
DRAW = "random draw "  # variant name prefix of the random control's draws: "random draw 3"
VariantKey = tuple[str, float]  # (none | method | "random draw d", coefficient)


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
    """What a fold's train and val parts decided: pairs, vectors per method, random draws, each method's sweep
    (coefficient -> val point; 0.0 is no steering) and coefficient choices."""

    fold: Fold
    pairs: list[tuple[int, int]]
    vectors: dict[str, dict[int, torch.Tensor]]
    draws: list[dict[int, torch.Tensor]]
    norms: dict[int, float]
    choices: dict[str, CoefficientChoice]
    sweep: dict[str, dict[float, SweepPoint]]
    diagnostics: dict[str, Any] = field(default_factory=dict)

    @property
    def chosen(self) -> dict[str, float]:
        """Each method's tested coefficient: the constrained choice, 0 where none was within budget."""
        return {method: choice.applied for method, choice in self.choices.items()}

    def variant(self, key: VariantKey) -> SteeringVariant:
        """The steering of a (variant, coefficient) key: no steering, a method's vectors or a random draw."""
        name, coefficient = key
        if name == NONE or coefficient == 0:
            return SteeringVariant(name)
        vectors = self.draws[int(name[len(DRAW) :])] if name.startswith(DRAW) else self.vectors[name]
        return SteeringVariant(name, coefficient, vectors, self.norms)


@dataclass(frozen=True)
class TestRecord:
    """One test question's results: per multiple-choice key its correctness under both scorings (``mean``,
    ``sum``), per generation key its :class:`AnswerRecord`."""

    choice: dict[VariantKey, dict[str, bool]]
    generated: dict[VariantKey, AnswerRecord]


@dataclass
class RenderedQuestions:
    """Prompts and choices as the target model sees them, plus answers and groups."""

    prompts: list[str]
    choices: list[list[str]]
    answers: list[int]
    groups: list[str]
    ids: list[str]


def render_questions(
    tokenizer, questions: Sequence[Question], completion_template: str, chat_template: bool
) -> RenderedQuestions:
    """Render questions for scoring with the same templates that built the cached examples."""
    prompts, choices = [], []
    for q in questions:
        prompts.append(render_prompt(tokenizer, q.prompt, chat_template))
        rendered = [completion_template.format(choice=c) for c in q.choices]
        choices.append([c.lstrip() for c in rendered] if chat_template else rendered)
    return RenderedQuestions(
        prompts, choices, [q.answer for q in questions], [q.group for q in questions], [q.id for q in questions]
    )


def plan_folds(
    n_questions: int,
    groups: Sequence[str],
    config: EvaluationConfig,
    seed: int,
    split: dict[str, list[int]] | None = None,
) -> list[Fold]:
    """The folds: k-fold over questions, or one 'fold' from a given train/val/test split of question indices."""
    if config.folds is None:
        if split is None:
            raise ValueError("folds: null needs the DataModule's train/val/test split of questions.")
        return [Fold(0, tuple(split["train"]), tuple(split["val"]), tuple(split["test"]))]
    ids = [f"q{i}" for i in range(n_questions)]
    return make_folds(
        ids,
        k=config.folds,
        mode=config.fold_mode,
        seed=seed,
        groups=list(groups) if config.fold_mode == "group" else None,
        val_fraction=config.val_fraction,
    )
