"""Named row adapters: turn a source's rows into the multiple-choice format before examples are built.

The multiple-choice format (see :mod:`es_lightning.data.examples`) is
``{"id": str, "question": str, "choices": [str, ...], "answer": int}`` with ``answer`` an index into
``choices``; extra fields pass through and may be used by prompt templates (e.g. ``{context}``).

``adapt_rows(rows, "gsm8k_mc", seed=0, n_distractors=3)`` applies the adapter named in
``ADAPTERS``; ``adapt_rows(rows, None)`` returns the rows unchanged.

Long because: one registry of independent, short adapters (GSM8K, PubMedQA, TruthfulQA's Hub rows), each with its
checks; one file per data set would scatter a table users read as a whole.
"""

from __future__ import annotations

import bisect
import inspect
import logging
import random
import re
from collections.abc import Callable
from fractions import Fraction
from typing import Any

log = logging.getLogger(__name__)

Row = dict[str, Any]

# ------------------------------------------------------------------------------------------ gsm8k_mc

_FINAL = re.compile(r"####\s*(.*?)\s*$", re.S)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_TEXT_NUMBER = re.compile(r"(?<![\d.])\d{1,3}(?:,\d{3})+(?:\.\d+)?|(?<![\d.,])\d+(?:\.\d+)?")
_CALC = re.compile(r"<<([^<>=]*)=([^<>]*)>>")
_BINARY = re.compile(r"^\s*\(?\s*(-?\d+(?:\.\d+)?)\s*([-+*/x])\s*(-?\d+(?:\.\d+)?)\s*\)?\s*$")

# Sampling weight of each distractor source (higher = chosen more often). "perturb" is kept rare and
# capped at one per question: several perturbations of the true answer would surround it and give
# it away as the "centre" of the choices.
_WEIGHTS = {"step": 3.0, "op": 2.0, "peer": 4.0, "extra": 1.0, "solution": 1.0, "perturb": 0.5, "fill": 0.5}
_CAPPED = {"perturb": 1}


def _parse_number(text: str) -> Fraction | None:
    """``"1,234"``, ``"$5"``, ``"-3"``, ``"2.50"`` -> exact value; ``None`` when it is not one number."""
    cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".")
    if not _NUMBER.fullmatch(cleaned):
        return None
    return Fraction(cleaned)


def _fmt(value: Fraction) -> str:
    """Canonical choice text: ``"42"``, ``"-3"``, ``"2.5"`` (so no choice stands out by its formatting)."""
    if value.denominator == 1:
        return str(value.numerator)
    text = f"{float(value):.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def final_answer(solution: Any, row_number: int) -> Fraction:
    """The number after ``####`` in a GSM8K answer, commas removed; a clear error names the row if absent."""
    if not isinstance(solution, str):
        raise ValueError(
            f"gsm8k_mc: row {row_number}: 'answer' must be the GSM8K worked solution string ending in "
            f"'#### <number>', got {type(solution).__name__}. Fix or remove that row."
        )
    match = _FINAL.search(solution)
    value = _parse_number(match.group(1)) if match else None
    if value is None:
        found = repr(match.group(1)[:40]) if match else "no '####' marker"
        raise ValueError(
            f"gsm8k_mc: row {row_number}: no final number after '####' in its answer ({found}). Every GSM8K "
            f"answer must end in '#### <number>', e.g. '... #### 72'. Fix or remove that row."
        )
    return value


def _solution_parts(solution: str) -> tuple[list[Fraction], tuple[Fraction, str, Fraction] | None, list[Fraction]]:
    """(intermediate results of ``<<expr=value>>`` calculations, the final binary step, other numbers in the text)."""
    body = solution.rsplit("####", 1)[0]
    results: list[Fraction] = []
    steps: list[tuple[str, Fraction | None]] = []
    for expr, out in _CALC.findall(body):
        value = _parse_number(out)
        steps.append((expr, value))
        if value is not None:
            results.append(value)
    last = None
    if steps:
        expr, _ = steps[-1]
        match = _BINARY.match(expr)
        if match:
            last = (Fraction(match.group(1)), match.group(2).replace("x", "*"), Fraction(match.group(3)))
    plain = _CALC.sub(" ", body)
    numbers = [v for v in (_parse_number(t) for t in _TEXT_NUMBER.findall(plain)) if v is not None]
    return results, last, numbers


def _apply(a: Fraction, op: str, b: Fraction) -> Fraction | None:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return a / b if b != 0 else None


def _window(answer: Fraction) -> tuple[Fraction, Fraction]:
    """Plausible magnitude range for distractors (a far-off number is trivially wrong)."""
    size = abs(answer)
    if size < 10:
        low, high = Fraction(0), Fraction(200)
    else:
        low, high = size / 20, size * 20
    return (low, high) if answer >= 0 else (-high, -low)


def _peer_range(answer: Fraction) -> tuple[Fraction, Fraction]:
    """Other questions' answers of similar magnitude: within 2x of the answer (0..20 for small answers)."""
    size = abs(answer)
    low, high = (Fraction(0), Fraction(20)) if size < 10 else (size / 2, size * 2)
    return (low, high) if answer >= 0 else (-high, -low)


def _candidates(
    answer: Fraction, solution: str, peers: list[Fraction], rng: random.Random, want: int
) -> dict[str, tuple[Fraction, str]]:
    """Distractor candidates ``{choice text: (value, source)}``, in a deterministic order (never the answer)."""
    results, last, numbers = _solution_parts(solution)
    found: list[tuple[Fraction | None, str]] = []
    found += [(v, "step") for v in results]
    if last is not None:
        a, op, b = last
        found += [(_apply(a, other, b), "op") for other in "+-*/" if other != op]
        found += [(_apply(answer, op, b), "extra")]  # one step too many: the last operation applied again
    found += [(v, "solution") for v in numbers]
    low, high = _peer_range(answer)
    near = peers[bisect.bisect_left(peers, low) : bisect.bisect_right(peers, high)]
    found += [(v, "peer") for v in rng.sample(near, min(len(near), 3 * want))]
    found += [(answer + 1, "perturb"), (answer - 1, "perturb"), (answer * 10, "perturb")]
    if (answer / 10).denominator == 1 or answer.denominator != 1:
        found.append((answer / 10, "perturb"))

    integral = answer.denominator == 1
    low, high = _window(answer)
    answer_text = _fmt(answer)
    out: dict[str, tuple[Fraction, str]] = {}
    for value, source in found:
        if value is None or (integral and value.denominator != 1) or not low <= value <= high:
            continue
        text = _fmt(value)
        if text != answer_text and text not in out:
            out[text] = (value, source)
    # Rarely needed (tiny inputs, answers near 0): plain offsets so there are always enough on each side.
    step = 1
    while sum(v < answer for v, _ in out.values()) < want and step <= want + 2 and answer - step >= low:
        out.setdefault(_fmt(answer - step), (answer - step, "fill"))
        step += 1
    step = 1
    while len(out) < 2 * want or sum(v > answer for v, _ in out.values()) < want:
        out.setdefault(_fmt(answer + step), (answer + step, "fill"))
        step += 1
    return out


def _pick(side: list[tuple[str, Fraction, str]], k: int, rng: random.Random) -> list[str]:
    """``k`` texts by weighted sampling without replacement (Efraimidis-Spirakis keys), with per-source caps."""
    keyed = sorted(side, key=lambda c: rng.random() ** (1.0 / _WEIGHTS[c[2]]), reverse=True)
    chosen: list[str] = []
    skipped: list[str] = []
    used = {s: 0 for s in _WEIGHTS}
    for text, _, source in keyed:
        if len(chosen) == k:
            break
        if source in _CAPPED and used[source] >= _CAPPED[source]:
            skipped.append(text)
            continue
        chosen.append(text)
        used[source] += 1
    return chosen + skipped[: k - len(chosen)]


def gsm8k_mc(rows: list[Row], *, seed: int = 0, n_distractors: int = 3) -> list[Row]:
    """GSM8K ``{"question", "answer": "<worked solution> #### <number>"}`` rows -> multiple choice.

    Each question gets its correct final number (parsed after ``####``, commas removed) and
    ``n_distractors`` wrong numbers; choices are strings such as ``"42"`` in one canonical format; the
    choice order is shuffled. The worked solution is dropped (it would give the answer away in a prompt);
    ``id`` is kept, or set to ``gsm8k-<row index>``. Everything is deterministic for a ``seed``.

    Distractors come from several sources, all wrong numbers a solver plausibly reaches:

    * ``step``: intermediate results of the worked solution's ``<<expr=value>>`` calculations (stopping a
      step or more too early);
    * ``op``: the final calculation with a wrong operator (``48+24`` -> 24, 1152, 2);
    * ``extra``: the final operation applied once more (one step too many);
    * ``solution``: other numbers in the worked solution (usually the question's given quantities);
    * ``peer``: final answers of other questions in ``rows`` within 2x of the true answer;
    * ``perturb``: the answer ±1, x10 or /10 (at most one per question).

    Why this is fair (a model cannot pick the answer by surface features alone):

    * magnitude rank: the number of distractors below the answer is drawn uniformly from
      ``0..n_distractors`` before the distractors are chosen, so the answer is equally often the
      smallest, the largest or in between (only answers near 0 lack smaller candidates);
    * outliers: distractors have the answer's sign and integrality (whole answers get whole distractors)
      and lie within 20x of it (0-200 for answers below 10), so no choice is absurd at a glance;
    * centrality: at most one ±1/x10 perturbation, so the answer is not the number the others surround;
    * mixing peers (real answers to other questions, of similar size) with solution-derived numbers
      means "the number derived from the question's quantities" does not single the answer out either;
    * peers are drawn with repeats from the answers' own distribution, so round numbers are about as
      common among distractors as among answers;
    * the correct answer never appears twice, and no two choices are equal.

    Measured on the 7473 GSM8K training questions (seed 0, 3 distractors, chance 25%): picking the
    choice that is a whole ten, not in the question text, the magnitude-central one, the one with a ±1
    or x10 neighbour, or the one of the most common length gives 23.5-27% accuracy; the answer's
    magnitude rank is 0/1/2/3 in 25 ± 0.5% of questions each.
    """
    if not isinstance(n_distractors, int) or isinstance(n_distractors, bool) or n_distractors < 1:
        raise ValueError(
            f"gsm8k_mc: n_distractors must be an integer >= 1, got {n_distractors!r}. Fix adapter_options."
        )
    finals = _final_answers(rows)
    peers_sorted = sorted(finals)  # with repeats: peers follow the answers' distribution (e.g. share of round numbers)
    return [
        _multiple_choice_row(row, index, answer, peers_sorted, seed, n_distractors)
        for index, (row, answer) in enumerate(zip(rows, finals))
    ]


def _final_answers(rows: list[Row]) -> list[Fraction]:
    """Each GSM8K row's final number (after ``####``); a row without ``question`` or ``answer`` is an error."""
    finals = []
    for index, row in enumerate(rows):
        for key in ("question", "answer"):
            if key not in row:
                raise KeyError(
                    f"gsm8k_mc: row {index + 1} has no {key!r} field (fields: {sorted(row)}). GSM8K rows are "
                    f"{{'question': ..., 'answer': '<solution> #### <number>'}}; point the config at GSM8K data."
                )
        finals.append(final_answer(row["answer"], index + 1))
    return finals


def _multiple_choice_row(
    row: Row, index: int, answer: Fraction, peers_sorted: list[Fraction], seed: int, n_distractors: int
) -> Row:
    """Row ``index`` as multiple choice: its answer and ``n_distractors`` wrong numbers, shuffled (seeded by row)."""
    rng = random.Random(f"gsm8k_mc:{seed}:{index}")
    pool = _candidates(answer, row["answer"], peers_sorted, rng, n_distractors)
    below = [(t, v, s) for t, (v, s) in pool.items() if v < answer]
    above = [(t, v, s) for t, (v, s) in pool.items() if v > answer]
    k_below = rng.randint(0, n_distractors)
    k_below = max(min(k_below, len(below)), n_distractors - len(above))
    distractors = _pick(below, k_below, rng) + _pick(above, n_distractors - k_below, rng)
    choices = [_fmt(answer), *distractors]
    order = list(range(len(choices)))
    rng.shuffle(order)
    shuffled = [choices[i] for i in order]
    row_id = row.get("id")
    extra = {k: v for k, v in row.items() if k not in ("question", "answer", "id", "choices")}
    return {
        **extra,
        "id": str(row_id) if row_id not in (None, "") else f"gsm8k-{index}",
        "question": row["question"],
        "choices": shuffled,
        "answer": order.index(0),
    }


# ------------------------------------------------------------------------------------------ pubmedqa

_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")


def trim_context(text: str, max_chars: int) -> str:
    """Cut ``text`` to at most ``max_chars`` characters at the last sentence end (``.``, ``!``, ``?``).

    If the kept part would be less than half of ``max_chars`` (one very long sentence), it is cut at the
    last space instead (mid-word when the second half has none) and ends in ``...``; the result is never
    longer than ``max_chars``. A period after an abbreviation ("e.g. ") also counts as a sentence end.
    Texts within the limit are returned unchanged.
    """
    if len(text) <= max_chars:
        return text
    window = text[:max_chars]
    ends = [m.end() for m in _SENTENCE_END.finditer(text[: max_chars + 1]) if m.end() <= max_chars]
    if ends and ends[-1] >= max_chars // 2:
        return window[: ends[-1]].rstrip()
    cut = window[: max(max_chars - 3, 1)]
    space = cut.rfind(" ")
    if space >= max_chars // 2:
        cut = cut[:space]
    return cut.rstrip() + "..."


def pubmedqa(rows: list[Row], *, seed: int = 0, max_context_chars: int | None = 2000) -> list[Row]:
    """PubMedQA rows already in the multiple-choice format (``/work/shared/data/pubmedqa_pqal.jsonl``).

    Checks that every row has a non-empty string ``context`` (the abstract without its conclusion, used
    by prompt templates as ``{context}``) and trims contexts longer than ``max_context_chars`` (default
    2000; ``null`` keeps them whole) with :func:`trim_context`, i.e. at the last sentence end that fits,
    so the prompt stays within the models' ``max_length`` and never ends mid-sentence. ``seed`` is unused.
    Rows are copied; nothing else changes.
    """
    del seed
    if max_context_chars is not None and (
        not isinstance(max_context_chars, int) or isinstance(max_context_chars, bool) or max_context_chars < 1
    ):
        raise ValueError(
            f"pubmedqa: max_context_chars must be an integer >= 1 or null, got {max_context_chars!r}. "
            "Fix adapter_options."
        )
    out, trimmed = [], 0
    for index, row in enumerate(rows):
        if "context" not in row:
            raise KeyError(
                f"pubmedqa: row {index + 1} has no 'context' field (fields: {sorted(row)}). PubMedQA rows need the "
                f"abstract as 'context'; point the config at pubmedqa_pqal.jsonl or drop the adapter."
            )
        context = row["context"]
        if not isinstance(context, str) or not context.strip():
            raise ValueError(
                f"pubmedqa: row {index + 1}: 'context' must be a non-empty string, got {context!r:.60}. "
                f"Join list contexts into one string or remove the row."
            )
        new = dict(row)
        if max_context_chars is not None and len(context) > max_context_chars:
            new["context"] = trim_context(context, max_context_chars)
            trimmed += 1
        out.append(new)
    if trimmed:
        log.info("pubmedqa: trimmed %d of %d contexts to <= %d characters.", trimmed, len(rows), max_context_chars)
    return out


# ------------------------------------------------------------------------------------------ registry

ADAPTERS: dict[str, Callable[..., list[Row]]] = {"gsm8k_mc": gsm8k_mc, "pubmedqa": pubmedqa}


def adapter_options(adapter: str) -> list[str]:
    """The option names ``adapter`` accepts (besides ``seed``)."""
    params = inspect.signature(ADAPTERS[adapter]).parameters
    return [name for name, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "seed"]


def adapt_rows(rows: list[Row], adapter: str | None, seed: int = 0, **options: Any) -> list[Row]:
    """Apply the adapter named ``adapter`` (a key of :data:`ADAPTERS`) to ``rows``; ``None`` returns them as is."""
    if adapter is None:
        if options:
            raise ValueError(
                f"adapter_options {sorted(options)} were given without an adapter. Set data.data.adapter or drop them."
            )
        return list(rows)
    if adapter not in ADAPTERS:
        raise ValueError(
            f"Unknown data adapter {adapter!r}: use one of {sorted(ADAPTERS)} or null (rows already multiple choice)."
        )
    allowed = adapter_options(adapter)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"Adapter {adapter!r} has no option(s) {unknown}; it accepts {allowed}. Fix adapter_options.")
    return ADAPTERS[adapter](rows, seed=seed, **options)
