"""Batched steered generation: batch invariance, steering identity at 0, seeded sampling, settings errors."""

from __future__ import annotations

import pytest
import torch

from es_lightning.models import hidden_size, load_model
from es_lightning.steering.bundle import ModelIdentity, SteeringBundle
from es_lightning.steering.generation import GenerationSettings, SeededSampler, generate, row_seed

PROMPTS = ["the cat is big and red", "a dog", "what is the sun ?", "one two three four five six seven eight nine"]


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir, tiny_gemma_dir):
    return {"llama": load_model(str(tiny_llama_dir)), "gemma": load_model(str(tiny_gemma_dir))}


def make_bundle(loaded, layers=(1, 2), seed=0) -> SteeringBundle:
    generator = torch.Generator().manual_seed(seed)
    width = hidden_size(loaded.model)
    directions = {layer: torch.randn(width, generator=generator) for layer in layers}
    return SteeringBundle.from_directions(
        "random", directions, {layer: 1.0 for layer in layers}, ModelIdentity.of(loaded)
    )


def settings(**kwargs) -> GenerationSettings:
    return GenerationSettings(**{"max_new_tokens": 6, "batch_size": 3, **kwargs})


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_greedy_batched_left_padded_equals_one_by_one(tiny, family):
    loaded = tiny[family]
    side = loaded.tokenizer.padding_side
    batched = generate(loaded.model, loaded.tokenizer, PROMPTS, settings())
    single = [generate(loaded.model, loaded.tokenizer, [prompt], settings(batch_size=1))[0] for prompt in PROMPTS]
    assert batched == single
    assert all(isinstance(text, str) and text == text.strip() for text in batched)
    assert any(batched)
    assert loaded.tokenizer.padding_side == side  # the tokenizer is not modified
    assert generate(loaded.model, loaded.tokenizer, [], settings()) == []


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_steering_identity_at_zero_and_change_when_nonzero(tiny, family):
    loaded = tiny[family]
    bundle = make_bundle(loaded)
    plain = generate(loaded.model, loaded.tokenizer, PROMPTS, settings())
    assert generate(loaded.model, loaded.tokenizer, PROMPTS, settings(), steering=bundle, coefficient=0.0) == plain
    steered = generate(loaded.model, loaded.tokenizer, PROMPTS, settings(), steering=bundle, coefficient=40.0)
    assert steered != plain
    for positions in ("prompt", "generated"):
        batched = generate(loaded.model, loaded.tokenizer, PROMPTS, settings(), bundle, 40.0, positions)
        single = [
            generate(loaded.model, loaded.tokenizer, [p], settings(batch_size=1), bundle, 40.0, positions)[0]
            for p in PROMPTS
        ]
        assert batched == single
    assert generate(loaded.model, loaded.tokenizer, PROMPTS, settings()) == plain  # hooks are gone afterwards


def test_seeded_sampling_is_reproducible_batch_invariant_and_leaves_global_rng(tiny):
    loaded = tiny["llama"]
    sample = settings(do_sample=True, temperature=1.3, top_p=0.95, seed=7)
    state = torch.random.get_rng_state()
    first = generate(loaded.model, loaded.tokenizer, PROMPTS, sample)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert generate(loaded.model, loaded.tokenizer, PROMPTS, sample) == first
    single = [
        generate(
            loaded.model,
            loaded.tokenizer,
            [p],
            settings(do_sample=True, temperature=1.3, top_p=0.95, seed=7, batch_size=1),
        )[0]
        for p in PROMPTS
    ]
    assert single == first
    reordered = generate(loaded.model, loaded.tokenizer, PROMPTS[::-1], sample)
    assert reordered == first[::-1]
    other = generate(loaded.model, loaded.tokenizer, PROMPTS, settings(do_sample=True, temperature=1.3, seed=8))
    assert other != first
    greedy = generate(loaded.model, loaded.tokenizer, PROMPTS, settings())
    assert generate(loaded.model, loaded.tokenizer, PROMPTS, settings(do_sample=True, top_p=1e-6)) == greedy
    assert generate(loaded.model, loaded.tokenizer, PROMPTS, settings(do_sample=True, temperature=1e-4)) == greedy


def test_seeded_sampler_matches_the_top_p_softmax_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])
    n = 6000
    sampler = SeededSampler([row_seed(0, f"p{i}") for i in range(n)], temperature=0.8)
    picks = sampler(None, logits.expand(n, -1).clone()).argmax(dim=-1)
    frequency = torch.bincount(picks, minlength=5).float() / n
    torch.testing.assert_close(frequency, (logits / 0.8).softmax(-1), atol=0.02, rtol=0)
    probs = logits.softmax(-1)  # [0.61, 0.22, 0.14, 0.03, 0.004]: top_p 0.8 keeps the first two
    sampler = SeededSampler([row_seed(1, f"p{i}") for i in range(n)], top_p=0.8)
    picks = sampler(None, logits.expand(n, -1).clone()).argmax(dim=-1)
    frequency = torch.bincount(picks, minlength=5).float() / n
    kept = probs[:2] / probs[:2].sum()
    torch.testing.assert_close(frequency, torch.cat([kept, torch.zeros(3)]), atol=0.02, rtol=0)


def test_chat_template_is_applied(tiny, tiny_llama_dir):
    from transformers import AutoTokenizer

    loaded = tiny["llama"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.chat_template = "{% for m in messages %}question : {{ m['content'] }} ?{% endfor %} answer :"
    chat = generate(loaded.model, tokenizer, PROMPTS[:2], settings(chat_template=True))
    rendered = [f"question : {p} ? answer :" for p in PROMPTS[:2]]
    assert chat == generate(loaded.model, loaded.tokenizer, rendered, settings())
    with pytest.raises(ValueError, match="no chat template"):
        generate(loaded.model, loaded.tokenizer, PROMPTS, settings(chat_template=True))
    # the default (None) uses a model's chat template when it has one, and plain text when it has none
    assert GenerationSettings().chat_template is None
    assert generate(loaded.model, tokenizer, PROMPTS[:2], settings(chat_template=None)) == chat
    assert generate(loaded.model, tokenizer, PROMPTS[:2], settings(chat_template=False)) == generate(
        loaded.model, loaded.tokenizer, PROMPTS[:2], settings(chat_template=None)
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be a positive int"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"do_sample": "yes"}, "do_sample must be true or false"),
        ({"temperature": 0}, "temperature must be a finite number > 0.*do_sample: false"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0}, r"top_p must be a number in \(0, 1\]"),
        ({"top_p": 1.5}, "top_p"),
        ({"seed": -1}, "seed must be an int"),
        ({"batch_size": 0}, "batch_size must be a positive int"),
        ({"chat_template": 1}, "chat_template must be true, false or null"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerationSettings(**kwargs)


def test_bad_generate_arguments_are_refused(tiny):
    llama, gemma = tiny["llama"], tiny["gemma"]
    with pytest.raises(ValueError, match=r"width 40, but this model's hidden size is 32.*another model"):
        generate(llama.model, llama.tokenizer, PROMPTS, settings(), steering=make_bundle(gemma), coefficient=1.0)
    with pytest.raises(ValueError, match="without a steering bundle"):
        generate(llama.model, llama.tokenizer, PROMPTS, settings(), coefficient=1.0)
    with pytest.raises(ValueError, match="Unknown positions"):
        generate(llama.model, llama.tokenizer, PROMPTS, settings(), make_bundle(llama), 1.0, positions="middle")
    with pytest.raises(ValueError, match="coefficient must be a finite number"):
        generate(llama.model, llama.tokenizer, PROMPTS, settings(), make_bundle(llama), float("inf"))
    with pytest.raises(ValueError, match="Prompt 1 is empty"):
        generate(llama.model, llama.tokenizer, ["a dog", "  "], settings())
    with pytest.raises(TypeError, match="list of strings"):
        generate(llama.model, llama.tokenizer, "a dog", settings())
