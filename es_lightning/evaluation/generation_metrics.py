"""Scores for a target LLM's generated answers to multiple-choice questions, to measure steering in generated text.

A question is its choices (``list[str]``) and the index of the correct one. Four metrics say whether a generated
answer is correct:

- ``bleu_acc`` and ``rouge_l_acc`` are lm-evaluation-harness truthfulqa_gen's ``bleu_acc`` and ``rougeL_acc``
  (``lm_eval/tasks/truthfulqa/utils.py``): sentence BLEU (sacrebleu, T5 settings) and ROUGE-Lsum F-measure
  (rouge_score), both 0..100, and the answer is correct when its best score against a correct reference is
  strictly above its best score against an incorrect one. lm-eval's definition: the scores, the strict
  comparison and the nan handling. Ours: the references are the question's choices (the correct choice against
  the others), without truthfulqa's preprocessing (adding periods and "I have no comment." to the references).
- ``number_match`` is lm-eval gsm8k's "flexible-extract" filter (the last number in the text) followed by its
  ``exact_match`` normalisation (``,`` and ``$`` removed, one trailing ``.`` removed). lm-eval's definition: the
  regex and the normalisation. Ours: the reference is the number extracted the same way from the correct choice,
  and a match without a digit (lm-eval extracts ``...`` from a trailing ellipsis) counts as no number.
- ``letter_match`` is ours: the answer's first standalone option letter (see ``extract_letter``) against the
  correct choice's letter, for prompts built by ``lettered_prompt``.

``cut_answer`` is lm-eval truthfulqa_gen's stop sequence (``until: ["\\n\\n"]``), plus a strip of whitespace.
``repetition`` and ``is_empty`` flag degenerate generations (loops, nothing said); they are ours.
"""

from __future__ import annotations

import functools
import math
import re
import string
from collections.abc import Sequence
from typing import Literal, get_args

GenerationMetric = Literal["bleu_acc", "rouge_l_acc", "number_match", "letter_match"]
GENERATION_METRICS: tuple[str, ...] = get_args(GenerationMetric)

# lm-eval gsm8k.yaml: the "flexible-extract" filter (regex, group_select -1) and exact_match's regexes_to_ignore.
_GSM8K_NUMBER = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_GSM8K_IGNORED = (",", r"\$", r"(?s).*#### ", r"\.$")
_LETTERS = string.ascii_uppercase
# An uppercase letter with no letter, digit, underscore, apostrophe or hyphen touching it.
_STANDALONE_LETTER = re.compile(r"(?<![\w'’-])([A-Z])(?![\w'’-])")
_WORD = re.compile(r"\w+")


def bleu(reference: str, prediction: str) -> float:
    """lm-eval truthfulqa's ``bleu([[reference]], [prediction])``: sacrebleu corpus BLEU with T5 settings, 0..100."""
    import sacrebleu

    return sacrebleu.corpus_bleu(
        [prediction],
        [[reference]],
        smooth_method="exp",
        smooth_value=0.0,
        force=False,
        lowercase=False,
        tokenize="intl",
        use_effective_order=False,
    ).score


@functools.cache
def _rouge_scorer():
    from rouge_score import rouge_scorer  # imports nltk: seconds, so only when ROUGE is used

    return rouge_scorer.RougeScorer(["rougeLsum"])


def _prepare_summary(summary: str) -> str:
    # lm-eval's sentence splitting for rougeLsum: rouge_score reads one sentence per line.
    return summary.replace(" . ", ".\n")


def rouge_l(reference: str, prediction: str) -> float:
    """lm-eval truthfulqa's ``rouge([reference], [prediction])["rougeLsum"]``: ROUGE-Lsum F-measure, 0..100."""
    scores = _rouge_scorer().score(_prepare_summary(reference), _prepare_summary(prediction))
    return scores["rougeLsum"].fmeasure * 100


_SIMILARITIES = {"bleu_acc": bleu, "rouge_l_acc": rouge_l}


def _nanmax(values: Sequence[float]) -> float:
    # np.nanmax: the largest non-nan value, nan when all are nan.
    numbers = [value for value in values if not math.isnan(value)]
    return max(numbers) if numbers else math.nan


def similarity_correct(
    prediction: str, correct: Sequence[str], incorrect: Sequence[str], metric: Literal["bleu_acc", "rouge_l_acc"]
) -> bool:
    """lm-eval's ``bleu_acc``/``rougeL_acc``: best score over ``correct`` strictly above best over ``incorrect``.

    Nan scores are skipped (``np.nanmax``); if every score on one side is nan the comparison is False.
    """
    if not correct or not incorrect:
        raise ValueError(
            f"{metric} compares the answer against correct and incorrect references; got {len(correct)} correct "
            f"and {len(incorrect)} incorrect. Give at least one of each."
        )
    score = _SIMILARITIES[metric]
    best_correct = _nanmax([score(reference, prediction) for reference in correct])
    best_incorrect = _nanmax([score(reference, prediction) for reference in incorrect])
    return best_correct > best_incorrect


def extract_number(text: str) -> str | None:
    """The last number in ``text`` as lm-eval gsm8k compares it, or None if there is none.

    The last match of the "flexible-extract" regex (first non-empty group, stripped), then exact_match's
    ``regexes_to_ignore`` in order: ``,`` and ``$`` removed, one trailing ``.`` removed ("$1,000." -> "1000",
    "#### 42" -> "42", "-3.5" -> "-3.5"). A match without a digit (an ellipsis "...") is None.
    """
    matches = _GSM8K_NUMBER.findall(text)
    if not matches:
        return None
    number = next(group for group in matches[-1] if group).strip()
    for ignored in _GSM8K_IGNORED:
        number = re.sub(ignored, "", number)
    return number if any(character.isdigit() for character in number) else None


def extract_letter(text: str, n_choices: int) -> int | None:
    """Index (A=0) of the first standalone option letter in ``text``, among the first ``n_choices`` letters.

    A standalone letter is an uppercase letter with no letter, digit, underscore, apostrophe or hyphen on either
    side, so "B", "(B)", "B.", "B) Paris", "Answer: B" and "The answer is B" all give 1, while "Bob", "B2", "I'm"
    and "A-list" give nothing. Lowercase letters never count. Letters past the choices are skipped ("E" with 4
    choices). Caveat: an uppercase article "A" or pronoun "I" is read as a letter ("A cat ..." gives 0), which
    is why ``lettered_prompt`` asks for the letter alone. None if there is no such letter.
    """
    for match in _STANDALONE_LETTER.finditer(text):
        index = _LETTERS.index(match.group(1))
        if index < n_choices:
            return index
    return None


def lettered_prompt(prompt: str, choices: Sequence[str]) -> str:
    """``prompt``, then one "A. choice" line per choice, then a one-line instruction to answer with the letter."""
    if not 1 <= len(choices) <= len(_LETTERS):
        raise ValueError(
            f"lettered_prompt needs 1 to {len(_LETTERS)} choices (letters A-Z); this question has {len(choices)}. "
            f"Use bleu_acc or rouge_l_acc for it, or drop choices."
        )
    options = "".join(f"{letter}. {choice}\n" for letter, choice in zip(_LETTERS, choices))
    return f"{prompt}\n{options}Answer with only the letter (A-{_LETTERS[len(choices) - 1]}) of the correct option."


def cut_answer(text: str) -> str:
    """The answer up to the first blank line ("\\n\\n"), stripped: lm-eval truthfulqa_gen's stop sequence."""
    return text.split("\n\n", 1)[0].strip()


def answer_correct(metric: GenerationMetric, prediction: str, choices: Sequence[str], answer: int) -> bool:
    """Whether ``prediction`` answers the question whose correct choice is ``choices[answer]``, by ``metric``."""
    if metric == "number_match":
        expected = extract_number(choices[answer])
        return expected is not None and extract_number(prediction) == expected
    if metric == "letter_match":
        return extract_letter(prediction, len(choices)) == answer
    incorrect = [choice for index, choice in enumerate(choices) if index != answer]
    return similarity_correct(prediction, [choices[answer]], incorrect, metric)


def _offenders(description: str, ids: list[str], fix: str) -> ValueError:
    shown = ", ".join(repr(question_id) for question_id in ids[:5])
    more = f" and {len(ids) - 5} more" if len(ids) > 5 else ""
    return ValueError(f"{len(ids)} question(s) {description}: {shown}{more}. {fix}")


def check_references(metric: str, questions: Sequence[tuple[str, Sequence[str], int]]) -> None:
    """Raise ValueError if ``metric`` cannot score ``questions`` (``(id, choices, answer)``); call before loading.

    The message names the problem, the first offending question ids and the fix.
    """
    if metric not in GENERATION_METRICS:
        raise ValueError(f"Unknown generation metric {metric!r}; valid ones are {', '.join(GENERATION_METRICS)}.")
    out_of_range = [question_id for question_id, choices, answer in questions if not 0 <= answer < len(choices)]
    if out_of_range:
        raise _offenders(
            "have an answer index outside their choices", out_of_range, "Fix the answer indices or the choices."
        )
    if metric in ("bleu_acc", "rouge_l_acc"):
        single = [question_id for question_id, choices, _ in questions if len(choices) < 2]
        if single:
            raise _offenders(
                f"have no incorrect choice, which {metric} needs as references to compare against "
                f"(a dataset without references)",
                single,
                "Use a dataset with incorrect choices, or metric number_match for numeric answers.",
            )
    elif metric == "number_match":
        numberless = [
            question_id for question_id, choices, answer in questions if extract_number(choices[answer]) is None
        ]
        if numberless:
            raise _offenders(
                "have a correct choice without a number, which number_match needs",
                numberless,
                "Use a numeric-answer dataset for number_match, or metric bleu_acc/rouge_l_acc/letter_match.",
            )
    else:
        too_many = [question_id for question_id, choices, _ in questions if len(choices) > len(_LETTERS)]
        if too_many:
            raise _offenders(
                f"have more than {len(_LETTERS)} choices, more than letters A-Z can name for letter_match",
                too_many,
                "Drop choices from those questions, or use metric bleu_acc or rouge_l_acc.",
            )


def repetition(text: str, n: int = 3) -> float:
    """Share of the answer's word n-grams that repeat an n-gram seen earlier in it, 0.0 to (k-1)/k for k n-grams.

    Words are runs of letters, digits and underscores, lowercased, so punctuation and case do not hide a loop.
    0.0 means no n-gram repeats; an answer with fewer than n+1 words (at most one n-gram) scores 0.0. A loop
    scores near 1: "suchs suchs suchs ..." with 20 words scores 17/18, and "the the the the" with n=3 scores 0.5,
    the most any 4-word answer can.
    """
    words = _WORD.findall(text.lower())
    ngrams = [tuple(words[start : start + n]) for start in range(len(words) - n + 1)]
    if len(ngrams) < 2:
        return 0.0
    return 1.0 - len(set(ngrams)) / len(ngrams)


def is_empty(text: str) -> bool:
    """Whether the answer says nothing: no letter or digit, only whitespace, punctuation or symbols."""
    return not any(character.isalnum() for character in text)
