"""Multiple-choice scoring: the cached scorer matches a naive full forward per choice, with and without steering."""

from __future__ import annotations

import contextlib
import random

import pytest
import torch

from es_lightning.evaluation.scoring import ChoiceScores, accuracy, correctness, predictions, score_choices
from es_lightning.models.layers import get_blocks
from es_lightning.models.loading import load_model


def naive_scores(model, tokenizer, prompts, choices) -> list[list[float]]:
    """Reference: one full forward of prompt+choice per choice, log-softmax in float64."""
    result = []
    for prompt, row in zip(prompts, choices):
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        sums = []
        for choice in row:
            choice_ids = tokenizer(choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([prompt_ids + choice_ids])).logits[0].double()
            logprobs = logits.log_softmax(-1)
            sums.append(sum(float(logprobs[len(prompt_ids) - 1 + j, t]) for j, t in enumerate(choice_ids)))
        result.append(sums)
    return result


WORDS = (
    "the a is not yes no cat dog fish tree water sky sun red blue big small eat run see good bad one two of in and or"
).split()


@contextlib.contextmanager
def add_to_block(model, layer: int, vector: torch.Tensor):
    """A minimal steering context: add ``vector`` to every position of one decoder block's output."""

    def hook(_module, _inputs, output):
        if isinstance(output, tuple):
            return (output[0] + vector,) + tuple(output[1:])
        return output + vector

    handle = get_blocks(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def make_questions(n: int = 7, seed: int = 0) -> tuple[list[str], list[list[str]]]:
    """Prompts of 2-60 words (longer than the tiny Gemma's 16-token sliding window) with 2-5 choices of 1-6 words."""
    rng = random.Random(seed)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 60))) for _ in range(n)]
    choices = [
        [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(2, 5))]
        for _ in prompts
    ]
    return prompts, choices


def max_diff(scores: list[ChoiceScores], reference: list[list[float]]) -> float:
    return max(abs(a - b) for row, ref in zip(scores, reference) for a, b in zip(row.logprob_sum, ref, strict=True))


QUESTIONS = make_questions()


@pytest.fixture(scope="module", params=["tiny_llama_dir", "tiny_gemma_dir", "tiny_gpt2_dir"])
def loaded(request):
    return load_model(str(request.getfixturevalue(request.param)))


@pytest.fixture(scope="module")
def reference(loaded) -> list[list[float]]:
    return naive_scores(loaded.model, loaded.tokenizer, *QUESTIONS)


def test_cached_scores_match_naive_forward(loaded, reference):
    prompts, choices = QUESTIONS
    for batch_size in (1, 4, 64):  # one question per pass, a few, all at once (most padding)
        scores = score_choices(loaded.model, loaded.tokenizer, prompts, choices, batch_size=batch_size, progress=False)
        assert [len(row.logprob_sum) for row in scores] == [len(row) for row in choices]
        assert max_diff(scores, reference) < 1e-4, f"batch_size={batch_size}"
    expected_counts = [
        [len(loaded.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in row] for row in choices
    ]
    assert [list(row.num_tokens) for row in scores] == expected_counts
    for row in scores:
        assert row.logprob_mean == pytest.approx([s / n for s, n in zip(row.logprob_sum, row.num_tokens)])


def test_single_token_choices_skip_the_choice_pass(loaded):
    prompts, _ = make_questions(3, seed=1)
    choices = [["yes", "no", "maybe"]] * 3
    reference = naive_scores(loaded.model, loaded.tokenizer, prompts, choices)
    scores = score_choices(loaded.model, loaded.tokenizer, prompts, choices, progress=False)
    assert max_diff(scores, reference) < 1e-4


def test_steering_context_matches_naive_and_is_removed(loaded, reference):
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts, choices = QUESTIONS
    width = model.get_input_embeddings().weight.shape[1]
    vector = torch.randn(width, generator=torch.Generator().manual_seed(0)) * 2.0
    entries = []

    def context():
        entries.append(1)
        return add_to_block(model, 1, vector)

    with add_to_block(model, 1, vector):
        steered_reference = naive_scores(model, tokenizer, prompts, choices)
    steered = score_choices(model, tokenizer, prompts, choices, context=context, batch_size=64, progress=False)
    assert max_diff(steered, steered_reference) < 1e-4
    assert len(entries) == 1  # one group of questions -> the context is entered once around its model calls
    plain = score_choices(model, tokenizer, prompts, choices, progress=False)
    assert max_diff(plain, reference) < 1e-4  # the hooks are gone after scoring
    assert max_diff(plain, steered_reference) > 1e-3


def test_context_entered_once_per_group(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir))
    prompts, choices = (
        ["the cat", "a dog", "the sun"],
        [["is red", "is blue"], ["runs", "walks", "eats"], ["yes", "no"]],
    )
    entries = []

    def context():
        entries.append(1)
        return contextlib.nullcontext()

    score_choices(loaded.model, loaded.tokenizer, prompts, choices, context=context, batch_size=3, progress=False)
    assert len(entries) == 3  # 2+3 > 3 and 3+2 > 3: each question forms its own group


def test_input_errors(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir))
    model, tokenizer = loaded.model, loaded.tokenizer
    with pytest.raises(ValueError, match="one choice list per prompt"):
        score_choices(model, tokenizer, ["the cat"], [], progress=False)
    with pytest.raises(ValueError, match="tokenizes to no tokens"):
        score_choices(model, tokenizer, ["the cat"], [["red", ""]], progress=False)
    with pytest.raises(ValueError, match="non-empty prompt"):
        score_choices(model, tokenizer, [""], [["red", "blue"]], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        score_choices(model, tokenizer, ["the cat"], [["red", "blue"]], batch_size=0, progress=False)
    model.train()
    try:
        with pytest.raises(ValueError, match="model.eval"):
            score_choices(model, tokenizer, ["the cat"], [["red", "blue"]], progress=False)
    finally:
        model.eval()


def test_predictions_and_accuracy_use_sum_or_mean():
    scores = [
        ChoiceScores(logprob_sum=(-2.0, -3.0), num_tokens=(1, 6)),  # sum picks 0, mean picks 1 (-0.5)
        ChoiceScores(logprob_sum=(-4.0, -1.0, -5.0), num_tokens=(2, 1, 1)),  # both pick 1
        ChoiceScores(logprob_sum=(-1.0, -1.0, -9.0, -9.0), num_tokens=(1, 1, 1, 1)),  # tie -> first
    ]
    answers = [1, 1, 3]
    assert predictions(scores, normalise=False) == [0, 1, 0]
    assert predictions(scores, normalise=True) == [1, 1, 0]
    assert correctness(scores, answers, normalise=True).tolist() == [True, True, False]
    assert accuracy(scores, answers, normalise=False) == pytest.approx(1 / 3)
    assert accuracy(scores, answers, normalise=True) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="out of range"):
        accuracy(scores, [1, 1, 4], normalise=True)
    with pytest.raises(ValueError, match="2 answers"):
        accuracy(scores, [1, 1], normalise=True)
