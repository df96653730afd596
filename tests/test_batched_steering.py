"""Per-row steering (many vectors and coefficients in one batch) equals one steering context per vector, in
multiple-choice scoring, in greedy generation and in the damage measurement; coefficient 0 is no steering."""

from __future__ import annotations

import pytest
import torch

from es_lightning.evaluation.damage import answer_nll, continuation_damage
from es_lightning.evaluation.scoring import score_choices
from es_lightning.models import hidden_size, load_model
from es_lightning.steering.generation import GenerationSettings, generate_rendered
from es_lightning.steering.hooks import SteeringVariant, row_steering, steer

PROMPTS = ["what is the big cat ?", "a dog is", "the sun is red and", "one two three four five six"]
CHOICES = [["red", "the cat is big and true"], ["good", "bad", "old"], ["blue", "green"], ["seven", "eight nine ten"]]


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir, tiny_gemma_dir):
    return {"llama": load_model(str(tiny_llama_dir)), "gemma": load_model(str(tiny_gemma_dir))}


def variants_of(model, seed: int = 0) -> list[SteeringVariant]:
    """No steering, two vectors at several coefficients (one at 0), on different layers."""
    generator = torch.Generator().manual_seed(seed)
    width = hidden_size(model)
    a = {1: torch.randn(width, generator=generator), 2: torch.randn(width, generator=generator)}
    b = {0: torch.randn(width, generator=generator)}
    norms_a, norms_b = {1: 2.0, 2: 3.0}, {0: 1.5}
    return [
        SteeringVariant("none"),
        SteeringVariant("a", 0.7, a, norms_a),
        SteeringVariant("a", -1.3, a, norms_a),
        SteeringVariant("b", 2.0, b, norms_b),
        SteeringVariant("a", 0.0, a, norms_a),
    ]


def looped_context(model, variant: SteeringVariant, positions: str = "all"):
    if not variant.steers:
        return None
    return lambda: steer(model, variant.vectors, variant.coefficient, variant.norms, positions=positions)


@pytest.mark.parametrize("family", ["llama", "gemma"])
@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_batched_scoring_equals_one_context_per_vector(tiny, family, positions):
    model, tokenizer = tiny[family].model, tiny[family].tokenizer
    variants = variants_of(model)
    variant_of = [v for v in range(len(variants)) for _ in PROMPTS]
    steering = row_steering(model, variants, variant_of)
    batched = score_choices(
        model,
        tokenizer,
        PROMPTS * len(variants),
        CHOICES * len(variants),
        batch_size=7,
        progress=False,
        steering=steering,
        positions=positions,
    )
    worst = 0.0
    for v, variant in enumerate(variants):
        looped = score_choices(
            model,
            tokenizer,
            PROMPTS,
            CHOICES,
            context=looped_context(model, variant, positions),
            batch_size=3,
            progress=False,
        )
        for q, row in enumerate(looped):
            got = batched[v * len(PROMPTS) + q]
            worst = max(worst, max(abs(x - y) for x, y in zip(got.logprob_sum, row.logprob_sum)))
    assert worst < 1e-4

    def gap(rows, other):
        return max(abs(x - y) for a, b in zip(rows, other) for x, y in zip(a.logprob_sum, b.logprob_sum))

    unsteered = batched[: len(PROMPTS)]
    assert gap(batched[4 * len(PROMPTS) :], unsteered) < 1e-5  # coefficient 0 is no steering (up to padding rounding)
    assert gap(batched[len(PROMPTS) : 2 * len(PROMPTS)], unsteered) > 1e-2  # and a nonzero one changes the scores


@pytest.mark.parametrize("family", ["llama", "gemma"])
@pytest.mark.parametrize("positions", ["all", "generated"])
def test_batched_greedy_generation_equals_one_context_per_vector(tiny, family, positions):
    model, tokenizer = tiny[family].model, tiny[family].tokenizer
    variants = variants_of(model, seed=1)
    settings = GenerationSettings(max_new_tokens=6, batch_size=6)
    steering = row_steering(model, variants, [v for v in range(len(variants)) for _ in PROMPTS])
    batched = generate_rendered(
        model, tokenizer, PROMPTS * len(variants), settings, True, steering=steering, positions=positions
    )
    for v, variant in enumerate(variants):
        looped = generate_rendered(
            model,
            tokenizer,
            PROMPTS,
            GenerationSettings(max_new_tokens=6, batch_size=1),
            True,
            positions=positions,
            context=looped_context(model, variant, positions),
        )
        assert [g.new_ids for g in batched[v * len(PROMPTS) : (v + 1) * len(PROMPTS)]] == [g.new_ids for g in looped]
    plain = [g.new_ids for g in batched[: len(PROMPTS)]]
    assert [g.new_ids for g in batched[4 * len(PROMPTS) :]] == plain  # coefficient 0 generates the unsteered answers
    assert any(g.new_ids != p for g, p in zip(batched[len(PROMPTS) : 2 * len(PROMPTS)], plain))


def test_damage_is_zero_unsteered_grows_with_the_coefficient_and_matches_a_naive_kl(tiny):
    model, tokenizer = tiny["llama"].model, tiny["llama"].tokenizer
    generator = torch.Generator().manual_seed(3)
    vector = {1: torch.randn(hidden_size(model), generator=generator)}
    coefficients = [0.0, 0.25, -0.5, 1.0, 2.0]
    variants = [SteeringVariant("v", c, vector, {1: 1.0}) for c in coefficients]
    settings = GenerationSettings(max_new_tokens=5, batch_size=4)
    plain = generate_rendered(model, tokenizer, PROMPTS, settings, True)
    pairs = [(g.prompt_ids, g.new_ids) for g in plain]
    damage = continuation_damage(model, tokenizer.pad_token_id, pairs, variants, batch_size=6)
    kl = [sum(d.kl_sum for d in row) / sum(d.tokens for d in row) for row in damage]
    assert abs(kl[0]) < 1e-6 and all(abs(d.ce_increase_sum) < 1e-5 for d in damage[0])
    assert kl[1] < kl[2] < kl[3] < kl[4]  # grows with |coefficient|
    # A naive KL for one continuation and one coefficient: full forward passes, no batching.
    prompt, continuation = pairs[0]
    ids = torch.tensor([list(prompt) + list(continuation)])
    with torch.no_grad():
        base = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
        with steer(model, vector, 1.0, {1: 1.0}):
            steered = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
    naive = float((base.exp() * (base - steered)).sum())
    assert damage[3][0].kl_sum == pytest.approx(naive, rel=1e-4, abs=1e-6) and damage[3][0].tokens == len(continuation)
    nll = answer_nll(model, tokenizer.pad_token_id, pairs)
    targets = torch.tensor(list(continuation))
    assert nll[0][0] == pytest.approx(float(-base.gather(-1, targets[:, None]).sum()), rel=1e-4)
