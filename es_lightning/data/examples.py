"""Turn records into labelled prompt/completion examples: text+label rows, or contrastive multiple choice."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Literal

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One text to encode with both models. ``group`` ties the rows of one question together."""

    id: str
    group: str
    prompt: str
    completion: str
    label: int


@dataclass(frozen=True)
class Question:
    """A multiple-choice question, kept whole for log-likelihood evaluation."""

    id: str
    prompt: str
    choices: list[str]
    answer: int
    group: str


@dataclass
class ExampleFormat:
    """How records become examples.

    ``multiple_choice`` rows (``question``, ``choices``, ``answer``) become one example per choice:
    prompt + correct choice -> label 1, prompt + wrong choice -> label 0. ``text`` rows give one example
    each from ``text_field`` with its ``label_field``. Templates are ``str.format`` strings over the row's
    fields (``completion_template`` sees only ``{choice}``, the choice text).
    """

    kind: Literal["multiple_choice", "text"] = "multiple_choice"
    prompt_template: str = "Question: {question}\nAnswer:"
    completion_template: str = " {choice}"
    id_field: str | None = "id"
    group_field: str | None = None
    question_field: str = "question"
    choices_field: str = "choices"
    answer_field: str = "answer"
    text_field: str = "text"
    text_template: str = "{text}"
    label_field: str | None = "label"
    label_values: dict[str, int] = field(default_factory=dict)
    negatives_per_question: int | None = None
    negatives_seed: int = 0

    def required_columns(self) -> list[str]:
        """Columns a source must have for this format."""
        if self.kind == "multiple_choice":
            return [self.question_field, self.choices_field, self.answer_field]
        return [self.text_field] + ([self.label_field] if self.label_field else [])


def _format(template: str, row: dict[str, Any], where: str, **extra: Any) -> str:
    try:
        return template.format(**row, **extra)
    except KeyError as err:
        raise KeyError(
            f"Template {template!r} uses the field {err.args[0]!r}, which {where} does not have "
            f"(fields: {sorted(row) + sorted(extra)}). Fix the template or the data."
        ) from err


def _row_id(row: dict[str, Any], index: int, fmt: ExampleFormat) -> str:
    if fmt.id_field and row.get(fmt.id_field) not in (None, ""):
        return str(row[fmt.id_field])
    return f"row-{index}"


def check_unique_ids(ids: list[str], source: str) -> None:
    """Duplicate ids would merge unrelated questions into one group; refuse them."""
    seen: set[str] = set()
    duplicates = sorted({i for i in ids if i in seen or seen.add(i)})  # type: ignore[func-returns-value]
    if duplicates:
        raise ValueError(
            f"{source}: duplicate ids {duplicates[:5]}{' ...' if len(duplicates) > 5 else ''}. "
            f"Give every row a unique id, or set id_field: null to number rows instead."
        )


def questions_from_rows(rows: list[dict[str, Any]], fmt: ExampleFormat, source: str) -> list[Question]:
    """Parse multiple-choice rows into :class:`Question` objects, validating answers and choices."""
    questions = []
    for index, row in enumerate(rows):
        where = f"{source} row {index + 1}"
        choices = row[fmt.choices_field]
        if not isinstance(choices, list) or len(choices) < 2:
            raise ValueError(f"{where}: '{fmt.choices_field}' must be a list of at least two choices, got {choices!r}.")
        answer = row[fmt.answer_field]
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise ValueError(
                f"{where}: answer {answer!r} is not a valid index into its {len(choices)} choices "
                f"(use 0..{len(choices) - 1})."
            )
        if not str(row[fmt.question_field]).strip() or any(not str(c).strip() for c in choices):
            raise ValueError(f"{where}: empty question or choice text. Remove the row or fill it in.")
        row_id = _row_id(row, index, fmt)
        group = str(row[fmt.group_field]) if fmt.group_field else row_id
        prompt = _format(fmt.prompt_template, row, where)
        questions.append(Question(row_id, prompt, [str(c) for c in choices], answer, group))
    check_unique_ids([q.id for q in questions], source)
    return questions


def examples_from_questions(questions: list[Question], fmt: ExampleFormat) -> list[Example]:
    """Contrastive examples: each question's correct choice -> label 1, its (kept) wrong ones -> label 0."""
    if fmt.negatives_per_question is not None and fmt.negatives_per_question < 1:
        raise ValueError(f"negatives_per_question must be >= 1 or null (all), got {fmt.negatives_per_question}.")
    rng = random.Random(fmt.negatives_seed)
    examples = []
    for question in questions:
        wrong = [c for c in range(len(question.choices)) if c != question.answer]
        if fmt.negatives_per_question is not None:
            wrong = sorted(rng.sample(wrong, min(fmt.negatives_per_question, len(wrong))))
        for c in sorted([question.answer, *wrong]):
            choice = question.choices[c]
            completion = fmt.completion_template.format(choice=choice)
            label = int(c == question.answer)
            examples.append(Example(f"{question.id}/{c}", question.group, question.prompt, completion, label))
    return examples


def _label(value: Any, fmt: ExampleFormat, where: str) -> int:
    if isinstance(value, str) and value in fmt.label_values:
        return fmt.label_values[value]
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and value in (0, 1):
        return value
    raise ValueError(
        f"{where}: label {value!r} is not 0/1/true/false. Map string labels with label_values, e.g. "
        f"{{'yes': 1, 'no': 0}}."
    )


def examples_from_text_rows(rows: list[dict[str, Any]], fmt: ExampleFormat, source: str) -> list[Example]:
    """One example per row from a text field and a binary label field."""
    examples = []
    for index, row in enumerate(rows):
        where = f"{source} row {index + 1}"
        text = row[fmt.text_field]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: empty text in '{fmt.text_field}'. Remove the row or fill it in.")
        row_id = _row_id(row, index, fmt)
        group = str(row[fmt.group_field]) if fmt.group_field else row_id
        prompt = _format(fmt.text_template, row, where)
        label = _label(row[fmt.label_field], fmt, where) if fmt.label_field else -1  # -1: unlabelled
        examples.append(Example(row_id, group, prompt, "", label))
    check_unique_ids([e.id for e in examples], source)
    return examples


def check_two_classes(labels: list[int], what: str) -> None:
    """Steering directions need both classes."""
    present = sorted(set(labels))
    if len(present) < 2:
        raise ValueError(
            f"The {what} has labels of only one class ({present}); steering needs both label 0 and label 1. "
            f"Check the label field / answer index, or use a larger or different split."
        )
