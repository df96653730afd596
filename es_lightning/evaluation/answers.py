"""Generated answers to multiple-choice questions, many steering variants in one batch, each judged and measured.

For a set of questions and variants (unsteered, methods at coefficients, random draws), every (variant, question)
row is generated greedily in one batched pass whose rows carry their own steering; each answer is then scored by
the configured metrics (:mod:`es_lightning.evaluation.generation_metrics`), its health measured (empty, repeated
3-grams, the unsteered model's likelihood of it) and, per variant, the damage on the unsteered answer to the same
question (:mod:`es_lightning.evaluation.damage`). The unsteered answers are generated once and reused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from es_lightning.data.examples import Question
from es_lightning.evaluation.config import GenerationEvaluation
from es_lightning.evaluation.damage import AnswerHealth, Damage, answer_nll, continuation_damage
from es_lightning.evaluation.generation_metrics import answer_correct, cut_answer, is_empty, lettered_prompt, repetition
from es_lightning.models.prompting import render_prompt
from es_lightning.steering.generation import Generated, GenerationSettings, generate_rendered, uses_chat_template
from es_lightning.steering.hooks import Positions, SteeringVariant, row_steering


@dataclass(frozen=True)
class AnswerRecord:
    """One variant's generated answer to one question: its text (cut at the first blank line), whether it is correct
    under each metric, its health, and the variant's damage on the unsteered answer to the same question."""

    text: str
    correct: dict[str, bool]
    health: AnswerHealth
    damage: Damage


class AnswerGenerator:
    """Generates, judges and measures answers to ``questions`` (indexed as in the evaluation) with one target."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        questions: Sequence[Question],
        config: GenerationEvaluation,
        positions: Positions = "all",
        block_path: str | None = None,
    ):
        self.model, self.tokenizer, self.questions, self.config = model, tokenizer, questions, config
        self.positions, self.block_path = positions, block_path
        self.settings = GenerationSettings(
            max_new_tokens=config.max_new_tokens, batch_size=config.batch_size, chat_template=config.chat_template
        )
        self.chat = uses_chat_template(self.settings, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("The target's tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token.")
        self.pad_id = int(pad)

    def prompt(self, question: int) -> str:
        """The text the target answers: the question's prompt (with lettered choices for ``letter_match``), in the
        chat template when the settings ask for it."""
        q = self.questions[question]
        text = lettered_prompt(q.prompt, q.choices) if "letter_match" in self.config.metrics else q.prompt
        return render_prompt(self.tokenizer, text, self.chat)

    def _generate(self, questions: Sequence[int], variants: Sequence[SteeringVariant]) -> list[list[Generated]]:
        """Greedy answers ``[variant][question]``, all rows in one batched generation."""
        if not variants:
            return []
        texts = [self.prompt(q) for q in questions]
        steering = row_steering(
            self.model, variants, [v for v in range(len(variants)) for _ in questions], self.block_path
        )
        generated = generate_rendered(
            self.model,
            self.tokenizer,
            texts * len(variants),
            self.settings,
            add_special_tokens=not self.chat,
            steering=steering,
            positions=self.positions,
            block_path=self.block_path,
        )
        return [generated[v * len(questions) : (v + 1) * len(questions)] for v in range(len(variants))]

    def reference(self, questions: Sequence[int]) -> list[Generated]:
        """The unsteered target's answers: the neutral text damage is measured on."""
        return self._generate(questions, [SteeringVariant("none")])[0]

    def damage(self, reference: Sequence[Generated], variants: Sequence[SteeringVariant]) -> list[list[Damage]]:
        """``[variant][question]`` divergence of each variant from the unsteered model on the reference answers."""
        pairs = [(g.prompt_ids, g.new_ids) for g in reference]
        return continuation_damage(
            self.model, self.pad_id, pairs, variants, self.positions, self.block_path, batch_size=self.config.batch_size
        )

    def answer(
        self,
        questions: Sequence[int],
        variants: Sequence[SteeringVariant],
        reference: Sequence[Generated],
        measured: Sequence[bool] | None = None,
        with_damage: bool = True,
    ) -> list[list[AnswerRecord]]:
        """``[variant][question]`` records. Unsteered variants reuse ``reference`` (the unsteered answers to the same
        questions); variants not ``measured`` (e.g. random draws, scored for accuracy only) get no damage and no
        perplexity, which saves two forward passes per answer; ``with_damage=False`` skips the damage of all
        (when the caller measured it already)."""
        measured = [True] * len(variants) if measured is None else list(measured)
        steered = [v for v, variant in enumerate(variants) if variant.steers]
        generated = dict(zip(steered, self._generate(questions, [variants[v] for v in steered])))
        answers = [generated.get(v, list(reference)) for v in range(len(variants))]
        pairs = [(g.prompt_ids, g.new_ids) for v in range(len(variants)) if measured[v] for g in answers[v]]
        nll = iter(answer_nll(self.model, self.pad_id, pairs, batch_size=self.config.batch_size))
        kept = [v for v in range(len(variants)) if measured[v] and with_damage]
        damage_of = dict(zip(kept, self.damage(reference, [variants[v] for v in kept])))
        records = []
        for v in range(len(variants)):
            row = []
            for k, q in enumerate(questions):
                text = cut_answer(answers[v][k].text)
                question = self.questions[q]
                correct: dict[str, bool] = {
                    m: answer_correct(m, text, question.choices, question.answer) for m in self.config.metrics
                }
                likelihood = next(nll) if measured[v] else (0.0, 0)
                health = AnswerHealth(1, int(is_empty(text)), repetition(text), *likelihood)
                row.append(AnswerRecord(text, correct, health, damage_of[v][k] if v in damage_of else Damage()))
            records.append(row)
        return records
