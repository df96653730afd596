"""Generated-answer metrics: lm-eval's own truthfulqa_gen and gsm8k code as the oracle, plus our own rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from es_lightning.evaluation.generation_metrics import (
    GENERATION_METRICS,
    answer_correct,
    bleu,
    check_references,
    cut_answer,
    extract_letter,
    extract_number,
    is_empty,
    lettered_prompt,
    repetition,
    rouge_l,
    similarity_correct,
)

PAIRS = [  # (reference, prediction)
    ("The Eiffel Tower is in Paris, France.", "The Eiffel Tower is located in Paris, France."),
    ("Nothing happens if you crack your knuckles a lot.", "You will get arthritis if you crack your knuckles."),
    ("The sky is blue . It is day.", "The sky is blue . It is night . Stars shine."),
    ("Paris", "Paris"),
    ("I have no comment.", ""),
    ("", "Something was said here by the model today."),
    ("Zürich liegt in der Schweiz, nicht in Österreich.", "Zürich liegt in der Schweiz."),
    ("Watermelon seeds pass through your digestive system.", "the seeds pass through your digestive system"),
    # Each pair below tells one of lm-eval's sacrebleu settings from the other choices:
    ("the cat sat on the mat near the door", "the cat sat at a mat near a door today"),  # no 4-gram match: smoothing
    # intl (not 13a) tokenization splits off the unicode punctuation and symbols:
    ("Il a dit «bonjour» à Paris—vraiment, le 5€ prix.", "Il a dit «bonjour» à Lyon—vraiment, le 5€."),
    ("Paris is the capital of France, not Lyon.", "paris is the capital of france, not lyon."),  # case kept
    ("The dogs were running quickly home.", "The dog runs quick at home."),  # ROUGE without a stemmer
]

TRUTHFULQA_DOCS = [  # (correct_answers, incorrect_answers, completion)
    (
        ["Nothing happens.", "You digest the seeds.", "I have no comment."],
        ["You grow watermelons in your stomach.", "You get sick."],
        "You grow watermelons in your stomach.",
    ),
    (
        ["Nothing happens.", "You digest the seeds.", "I have no comment."],
        ["You grow watermelons in your stomach.", "You get sick."],
        "Nothing happens, you simply digest the seeds.",
    ),
    (
        ["The Eiffel Tower is in Paris, France.", "I have no comment."],
        ["The Eiffel Tower is in London.", "The Eiffel Tower is in Rome, Italy."],
        "The Eiffel Tower is in Paris, the capital of France.",
    ),
    (
        ["Fortune cookies originated in San Francisco.", "I have no comment."],
        ["Fortune cookies originated in China.", "Fortune cookies originated in Japan."],
        "Fortune cookies originated in China, where they are eaten after meals.",
    ),
    (["Yes."], ["No."], "Yes."),
    (["A . B . C"], ["D . E . F"], "A . B . x"),
]

GSM8K_PREDICTIONS = [
    "So she has 42 apples.",
    "The total is 1,000 dollars.",
    "It costs $18.",
    "The answer is $1,234.50.",
    "The temperature dropped to -7 degrees.",
    "She ran 3.5 km, then 12 km more, so 15.5",
    "#### 42",
    "First 6 * 7 = 42. The answer is 42.",
    "I am not sure.",
    "The end...",
    "Roughly 72...",
    "She earned 5 + 5 = 10. Then -3 so 7\n#### 7",
]
GSM8K_GOLDS = ["42", "1,000", "#### 18", "Natalia sold 48/2 = 24 clips.\n#### 72", "$1,234.50", "-7", "15.5", "7"]


@pytest.fixture(scope="module")
def truthfulqa():
    import lm_eval.tasks.truthfulqa.utils as truthfulqa_utils  # imports datasets and rouge_score: seconds

    return truthfulqa_utils


@pytest.mark.parametrize("reference, prediction", PAIRS)
def test_bleu_and_rouge_equal_lm_eval(truthfulqa, reference, prediction):
    assert bleu(reference, prediction) == truthfulqa.bleu([[reference]], [prediction])
    assert rouge_l(reference, prediction) == pytest.approx(
        truthfulqa.rouge([reference], [prediction])["rougeLsum"], abs=1e-9
    )


def test_scores_are_not_trivial():
    """The fixed pairs must exercise non-zero and non-perfect scores, or the comparisons above prove little."""
    bleu_scores = {round(bleu(reference, prediction), 6) for reference, prediction in PAIRS}
    rouge_scores = {round(rouge_l(reference, prediction), 6) for reference, prediction in PAIRS}
    assert len(bleu_scores) >= 3 and max(bleu_scores) > 0
    assert len(rouge_scores) >= 5 and 0 < sorted(rouge_scores)[1] < 100


def test_rouge_l_splits_sentences_at_spaced_periods():
    """lm-eval's _prepare_summary turns " . " into a line break, so rougeLsum sees sentences; without it, LCS."""
    split = rouge_l("a b . c d", "c d . a b")
    assert split == pytest.approx(100.0)
    assert rouge_l("a b, c d", "c d, a b") == pytest.approx(50.0)


@pytest.mark.parametrize("correct, incorrect, completion", TRUTHFULQA_DOCS)
def test_similarity_correct_equals_lm_eval_process_results_gen(truthfulqa, correct, incorrect, completion):
    doc = {"correct_answers": correct, "incorrect_answers": incorrect}
    results = truthfulqa.process_results_gen(doc, [completion])
    assert similarity_correct(completion, correct, incorrect, "bleu_acc") == bool(results["bleu_acc"])
    assert similarity_correct(completion, correct, incorrect, "rouge_l_acc") == bool(results["rougeL_acc"])


def test_truthfulqa_docs_cover_both_outcomes():
    outcomes = {similarity_correct(p, c, i, "rouge_l_acc") for c, i, p in TRUTHFULQA_DOCS}
    outcomes |= {similarity_correct(p, c, i, "bleu_acc") for c, i, p in TRUTHFULQA_DOCS}
    assert outcomes == {True, False}


def test_similarity_ties_are_incorrect_and_needs_both_sides():
    # "Yes." vs "No.": one token each; BLEU (no effective order) is 0 against both, so the strict > says False.
    assert not similarity_correct("Yes.", ["Yes."], ["No."], "bleu_acc")
    assert similarity_correct("Yes.", ["Yes."], ["No."], "rouge_l_acc")
    with pytest.raises(ValueError, match="0 incorrect"):
        similarity_correct("Yes.", ["Yes."], [], "bleu_acc")


def _lm_eval_gsm8k_flexible():
    """lm-eval's flexible-extract filter and exact_match, configured from its own gsm8k.yaml."""
    import lm_eval
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    config = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks/gsm8k/gsm8k.yaml").read_text())
    (flexible,) = [entry for entry in config["filter_list"] if entry["name"] == "flexible-extract"]
    regex_step, take_first = flexible["filter"]
    assert take_first["function"] == "take_first"
    regex_filter = RegexFilter(regex_pattern=regex_step["regex_pattern"], group_select=regex_step["group_select"])
    (metric,) = config["metric_list"]
    metric_kwargs = {
        key: value for key, value in metric.items() if key not in ("metric", "aggregation", "higher_is_better")
    }

    def lm_eval_correct(prediction: str, gold: str) -> bool:
        (filtered,) = regex_filter.apply([[prediction]], [{}])[0]
        return exact_match_hf_evaluate(predictions=[filtered], references=[gold], **metric_kwargs)["exact_match"] == 1

    return lm_eval_correct


def test_number_match_equals_lm_eval_gsm8k_flexible_extract():
    lm_eval_correct = _lm_eval_gsm8k_flexible()
    matches = 0
    for gold in GSM8K_GOLDS:
        for prediction in GSM8K_PREDICTIONS:
            expected = lm_eval_correct(prediction, gold)
            assert answer_correct("number_match", prediction, ["a distractor", gold], 1) == expected, (prediction, gold)
            matches += expected
    assert matches >= len(GSM8K_GOLDS)  # every gold is matched by some prediction, so both outcomes are exercised


@pytest.mark.parametrize(
    "text, number",
    [
        ("So she has 42 apples.", "42"),
        ("The total is 1,000 dollars.", "1000"),
        ("The answer is $1,234.50.", "1234.50"),
        ("It dropped to -7 degrees", "-7"),
        ("3.5 km then 15.5", "15.5"),
        ("#### 42", "42"),
        ("First 6 * 7 = 42. Then 43.", "43"),
        ("I am not sure.", None),
        ("The end...", None),
        ("", None),
    ],
)
def test_extract_number(text, number):
    assert extract_number(text) == number


@pytest.mark.parametrize(
    "text, n_choices, letter",
    [
        ("B", 4, 1),
        ("(B)", 4, 1),
        ("B.", 4, 1),
        ("B) Paris", 4, 1),
        ("Answer: C", 4, 2),
        ("The answer is D because it is cold.", 4, 3),
        ("E, then B", 4, 1),  # E is past the 4 choices
        ("Bob chose it", 4, None),
        ("B2 is a vitamin", 4, None),
        ("I'm not sure", 12, None),
        ("an A-list actor", 4, None),
        ("the answer is b", 4, None),
        ("", 4, None),
        ("Z", 26, 25),
    ],
)
def test_extract_letter(text, n_choices, letter):
    assert extract_letter(text, n_choices) == letter


def test_lettered_prompt():
    prompt = lettered_prompt("Q: Where is the Eiffel Tower?", ["Rome", "Paris", "Oslo"])
    assert prompt == (
        "Q: Where is the Eiffel Tower?\nA. Rome\nB. Paris\nC. Oslo\n"
        "Answer with only the letter (A-C) of the correct option."
    )
    assert extract_letter(prompt.splitlines()[2], 3) == 1
    assert lettered_prompt("Q", [str(i) for i in range(26)]).splitlines()[-2] == "Z. 25"
    with pytest.raises(ValueError, match="this question has 27"):
        lettered_prompt("Q", [str(i) for i in range(27)])


def test_cut_answer():
    assert cut_answer(" Paris is the capital.\nIt is in France.\n\nQ: next question") == (
        "Paris is the capital.\nIt is in France."
    )
    assert cut_answer("\n\nQ: nothing before") == ""
    assert cut_answer("  no blank line \n") == "no blank line"


def test_answer_correct_per_metric():
    choices = ["The Eiffel Tower is in Rome, Italy.", "The Eiffel Tower is in Paris, France."]
    assert answer_correct("rouge_l_acc", "It is in Paris, France.", choices, 1)
    assert not answer_correct("rouge_l_acc", "It is in Paris, France.", choices, 0)
    assert answer_correct("bleu_acc", "I think the Eiffel Tower is in Paris, France.", choices, 1)
    assert answer_correct("letter_match", "The answer is B.", choices, 1)
    assert not answer_correct("letter_match", "The answer is B.", choices, 0)
    assert answer_correct("number_match", "so 1,000", ["7", "#### 1000"], 1)
    assert not answer_correct("number_match", "I do not know", ["seven", "none"], 0)


def test_repetition():
    sentence = "The Eiffel Tower is in Paris, the capital city of France, and it is tall."
    loop = "The answer is suchs suchs suchs suchs suchs suchs suchs suchs suchs suchs"
    assert repetition(sentence) == 0.0
    assert repetition(loop) > 0.5 > repetition(sentence)
    assert repetition("the the the the") == 0.5
    assert repetition("The the, THE the the the") == 0.75
    assert repetition("the the the") == 0.0  # one 3-gram: nothing to repeat
    assert repetition("a b a b a b", n=2) == pytest.approx(3 / 5)
    assert repetition("") == 0.0


def test_is_empty():
    assert is_empty("")
    assert is_empty(" \n\t")
    assert is_empty("... !? -- $")
    assert not is_empty(" 4 ")
    assert not is_empty("é")


QUESTIONS = [("q1", ["Paris, 2 km", "Rome"], 0), ("q2", ["42", "41"], 1)]


@pytest.mark.parametrize("metric", GENERATION_METRICS)
def test_check_references_accepts_valid_questions(metric):
    check_references(metric, QUESTIONS)


def test_check_references_unknown_metric():
    with pytest.raises(ValueError, match=r"'bleu'.*bleu_acc, rouge_l_acc, number_match, letter_match"):
        check_references("bleu", QUESTIONS)


def test_check_references_answer_out_of_range():
    with pytest.raises(ValueError, match=r"2 question\(s\) have an answer index outside.*: 'q3', 'q4'\. Fix"):
        check_references("letter_match", [*QUESTIONS, ("q3", ["a"], -1), ("q4", ["a", "b"], 2)])


@pytest.mark.parametrize("metric", ["bleu_acc", "rouge_l_acc"])
def test_check_references_needs_incorrect_choices(metric):
    questions = [(f"q{i}", ["only one"], 0) for i in range(7)]
    with pytest.raises(ValueError, match=rf"7 question\(s\).*{metric}.*without references\): 'q0', .*'q4' and 2 more"):
        check_references(metric, [QUESTIONS[0], *questions])


def test_check_references_number_match_needs_a_number():
    with pytest.raises(ValueError, match=r"1 question\(s\) have a correct choice without a number.*: 'q3'\. Use"):
        check_references("number_match", [*QUESTIONS, ("q3", ["Paris", "2"], 0)])


def test_check_references_letter_match_at_most_26_choices():
    with pytest.raises(ValueError, match=r"more than 26 choices.*: 'big'\. Drop"):
        check_references("letter_match", [*QUESTIONS, ("big", [str(i) for i in range(27)], 3)])
