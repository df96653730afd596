"""Steering hooks: identity at coefficient 0, batch/padding/KV-cache invariance, cleanup, dtypes, errors."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from es_lightning.models import get_blocks, hidden_size, load_model
from es_lightning.steering.hooks import steer

PROMPTS = ["the cat is big and red", "a dog", "what is the sun ?"]
NEW_TOKENS = 4


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir, tiny_gemma_dir, tiny_gpt2_dir):
    loaded = {"llama": load_model(str(tiny_llama_dir)), "gemma": load_model(str(tiny_gemma_dir))}
    loaded["gpt2"] = load_model(str(tiny_gpt2_dir))
    for item in loaded.values():
        item.tokenizer.padding_side = "left"
    return loaded


def random_vectors(model: nn.Module, layers: list[int], seed: int = 0) -> dict[int, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    width = hidden_size(model)
    vectors = {layer: torch.randn(width, generator=generator) for layer in layers}
    return {layer: v / v.norm() for layer, v in vectors.items()}


def greedy(model, encoding, **kwargs):
    return model.generate(
        **encoding,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )


def logits(model, input_ids, attention_mask=None, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {key: value.clone() for key, value in model.state_dict().items()},
        "attrs": {name: sorted(vars(module)) for name, module in model.named_modules()},
    }


def assert_untouched(model: nn.Module, before: dict) -> None:
    after = model.state_dict()
    assert after.keys() == before["state"].keys()
    assert all(torch.equal(after[key], value) for key, value in before["state"].items())
    assert {name: sorted(vars(module)) for name, module in model.named_modules()} == before["attrs"]
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


@pytest.mark.parametrize("arch", ["llama", "gemma", "gpt2"])
@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_zero_coefficient_is_identity(tiny, arch, positions):
    model, tokenizer = tiny[arch].model, tiny[arch].tokenizer
    encoding = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    plain_logits = logits(model, **encoding)
    plain = greedy(model, encoding)
    vectors = random_vectors(model, [0, 1])
    with steer(model, vectors, 0.0, positions=positions):
        assert torch.equal(logits(model, **encoding), plain_logits)
        steered = greedy(model, encoding)
    assert torch.equal(steered.sequences, plain.sequences)
    assert all(torch.equal(a, b) for a, b in zip(steered.logits, plain.logits))


@pytest.mark.parametrize("arch", ["llama", "gemma"])
@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_batched_left_padded_equals_one_by_one(tiny, arch, positions):
    """Generation with a KV cache and re-feeding without one agree, batched or not, in every position mode."""
    model, tokenizer = tiny[arch].model, tiny[arch].tokenizer
    vectors = random_vectors(model, [1, 2], seed=3)
    norms = {1: 2.0, 2: 3.0}
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    width = batch.input_ids.shape[1]
    with steer(model, vectors, 1.5, norms=norms, positions=positions) as state:
        batched = greedy(model, batch)
        assert state.prompt_length == (None if positions == "all" else width)  # 'all' tracks no positions
    # The full batched sequences re-fed without a cache (prompt_length is the padded width).
    mask = torch.cat([batch.attention_mask, torch.ones(len(PROMPTS), NEW_TOKENS, dtype=torch.long)], dim=1)
    explicit = {} if positions == "all" else {"prompt_length": width}
    with steer(model, vectors, 1.5, norms=norms, positions=positions, **explicit):
        refed = logits(model, batched.sequences, mask, use_cache=False)
    for row, prompt in enumerate(PROMPTS):
        alone = tokenizer([prompt], return_tensors="pt")
        length = alone.input_ids.shape[1]
        with steer(model, vectors, 1.5, norms=norms, positions=positions):
            single = greedy(model, alone)
        assert torch.equal(single.sequences[0, length:], batched.sequences[row, width:])
        for step in range(NEW_TOKENS):
            torch.testing.assert_close(single.logits[step][0], batched.logits[step][row], atol=1e-5, rtol=1e-5)
        # Cache-less re-feed: the real tokens' logits match the single run and the cached decode steps.
        explicit = {} if positions == "all" else {"prompt_length": length}
        with steer(model, vectors, 1.5, norms=norms, positions=positions, **explicit):
            single_refed = logits(model, single.sequences, use_cache=False)[0]
        torch.testing.assert_close(refed[row, width - length :], single_refed, atol=1e-5, rtol=1e-5)
        for step in range(NEW_TOKENS):
            torch.testing.assert_close(single_refed[length - 1 + step], single.logits[step][0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_model_restored_after_exit_and_exception(tiny, arch):
    model, tokenizer = tiny[arch].model, tiny[arch].tokenizer
    encoding = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    before, plain = snapshot(model), logits(model, **encoding)
    vectors = random_vectors(model, [0, 2])
    for positions in ("all", "generated"):
        with steer(model, vectors, 8.0, positions=positions):
            greedy(model, encoding)
        assert_untouched(model, before)
        assert torch.equal(logits(model, **encoding), plain)
        with pytest.raises(RuntimeError, match="boom"):
            with steer(model, vectors, 8.0, positions=positions):
                logits(model, **encoding)
                raise RuntimeError("boom")
        assert_untouched(model, before)
        assert torch.equal(logits(model, **encoding), plain)


@pytest.mark.parametrize("arch", ["llama", "gemma", "gpt2"])
def test_steering_adds_exactly_the_scaled_vector(tiny, arch):
    model, tokenizer = tiny[arch].model, tiny[arch].tokenizer
    encoding = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    vector = random_vectors(model, [1])[1]

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        seen: list[torch.Tensor] = []
        handle = get_blocks(model)[1].register_forward_hook(lambda _m, _i, out: seen.append(out.detach().clone()))
        try:
            return logits(model, **encoding), seen[0]
        finally:
            handle.remove()

    plain, plain_block = run()
    with steer(model, {1: vector}, 2.5, norms={1: 4.0}):
        steered, steered_block = run()  # this observer hook runs after the steering hook
    assert not torch.allclose(steered, plain, atol=1e-3)
    expected = (10.0 * vector).expand_as(plain_block)
    torch.testing.assert_close(steered_block - plain_block, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_generated_leaves_prompt_untouched(tiny, arch):
    model, tokenizer = tiny[arch].model, tiny[arch].tokenizer
    encoding = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    plain = greedy(model, encoding)
    vectors = random_vectors(model, [1])
    with steer(model, vectors, 6.0, positions="generated"):
        prefill = model(**encoding, use_cache=True)
        steered = greedy(model, encoding)
    assert torch.equal(prefill.logits, logits(model, **encoding))
    assert torch.equal(steered.logits[0], plain.logits[0])  # predicted from the prompt alone
    assert not torch.allclose(steered.logits[1], plain.logits[1], atol=1e-3)
    # Re-fed without a cache, positions below prompt_length keep their plain logits.
    width = encoding.input_ids.shape[1]
    mask = torch.cat([encoding.attention_mask, torch.ones(len(PROMPTS), NEW_TOKENS, dtype=torch.long)], dim=1)
    unsteered = logits(model, steered.sequences, mask)
    with steer(model, vectors, 6.0, positions="generated", prompt_length=width):
        refed = logits(model, steered.sequences, mask)
    assert torch.equal(refed[:, :width], unsteered[:, :width])
    assert not torch.allclose(refed[:, width:], unsteered[:, width:], atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_prompt_mode_steers_prefill_only(tiny, arch):
    """With a KV cache, 'prompt' equals: steer the prefill at every position, then decode unsteered."""
    model, tokenizer = tiny[arch].model, tiny[arch].tokenizer
    encoding = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    vectors = random_vectors(model, [0, 2], seed=5)
    with steer(model, vectors, 6.0, positions="prompt"):
        steered = greedy(model, encoding)
    with torch.no_grad():
        with steer(model, vectors, 6.0):
            out = model(**encoding, use_cache=True)
        manual_logits, cache, mask = [out.logits[:, -1]], out.cache, encoding.attention_mask
        tokens = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(NEW_TOKENS - 1):
            mask = torch.cat([mask, torch.ones_like(tokens)], dim=1)
            out = model(input_ids=tokens, attention_mask=mask, cache=cache, use_cache=True)
            manual_logits.append(out.logits[:, -1])
            cache, tokens = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
    for step in range(NEW_TOKENS):
        torch.testing.assert_close(steered.logits[step], manual_logits[step], atol=1e-5, rtol=1e-5)
    # The prefill differs from the unsteered model, and decode steps differ from steering every position.
    assert not torch.allclose(steered.logits[0], logits(model, **encoding)[:, -1], atol=1e-3)
    with steer(model, vectors, 6.0):
        everywhere = greedy(model, encoding)
    assert not torch.allclose(steered.logits[1], everywhere.logits[1], atol=1e-3)


def test_each_generate_call_starts_a_new_prompt(tiny):
    model, tokenizer = tiny["llama"].model, tiny["llama"].tokenizer
    first, second = (tokenizer([p], return_tensors="pt") for p in PROMPTS[:2])
    vectors = random_vectors(model, [1])
    with steer(model, vectors, 6.0, positions="generated") as state:
        greedy(model, first)
        assert state.prompt_length == first.input_ids.shape[1]
        shared = greedy(model, second)
        assert state.prompt_length == second.input_ids.shape[1]
    with steer(model, vectors, 6.0, positions="generated"):
        fresh = greedy(model, second)
    assert torch.equal(shared.sequences, fresh.sequences)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_agrees_with_float32(tiny, tiny_llama_dir, dtype):
    reference = tiny["llama"]
    low = load_model(str(tiny_llama_dir), dtype=dtype).model
    encoding = reference.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    vectors = {layer: v.double() for layer, v in random_vectors(low, [1, 2]).items()}  # cast to the activations
    with steer(reference.model, vectors, 3.0, norms={1: 2.0, 2: 2.0}):
        expected = logits(reference.model, **encoding)
    with steer(low, vectors, 3.0, norms={1: 2.0, 2: 2.0}):
        got = logits(low, **encoding)
    assert got.dtype == dtype
    shift = (expected - logits(reference.model, **encoding)).abs().max()
    error = (got.float() - expected).abs().max()
    assert error < 0.05 * shift, (error, shift)


class _TupleBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, str]:
        return hidden + self.linear(hidden), "extra"


class _TupleModel(nn.Module):
    """A model whose blocks return tuples and live at an unknown path."""

    def __init__(self, width: int = 8, depth: int = 3):
        super().__init__()
        self.config = SimpleNamespace(model_type="toy", hidden_size=width)
        self.trunk = nn.Module()
        self.trunk.stack = nn.ModuleList(_TupleBlock(width) for _ in range(depth))
        self.seen: list[object] = []

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for block in self.trunk.stack:
            output = block(hidden)
            self.seen.append(output)
            hidden = output[0]
        return hidden


def test_tuple_block_outputs_keep_their_type():
    torch.manual_seed(0)
    model = _TupleModel()
    hidden = torch.randn(2, 5, 8)
    plain = model(hidden)
    vector = torch.ones(8)
    with steer(model, {2: vector}, 0.5, block_path="trunk.stack"):
        model.seen.clear()
        steered = model(hidden)
    assert all(isinstance(output, tuple) and output[1] == "extra" for output in model.seen)
    torch.testing.assert_close(steered, plain + 0.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"coefficient": math.nan}, "finite number"),
        ({"coefficient": math.inf}, "finite number"),
        ({"coefficient": True}, "finite number"),
        ({"vectors": {}}, "No steering vectors"),
        ({"vectors": {4: None}}, "out of range"),
        ({"vectors": {-1: None}}, "out of range"),
        ({"vectors": {1: torch.zeros(31)}}, "hidden size is 32"),
        ({"vectors": {1: torch.zeros(2, 32)}}, "hidden size is 32"),
        ({"vectors": {1: torch.full((32,), math.nan)}}, "NaN or Inf"),
        ({"norms": {2: 1.0}}, "one norm per steered layer"),
        ({"norms": {1: 0.0}}, "must be positive"),
        ({"norms": {1: math.nan}}, "finite number"),
        ({"positions": "decode"}, "Unknown positions"),
        ({"prompt_length": 3}, "only applies"),
        ({"positions": "prompt", "prompt_length": 0}, "positive int"),
        ({"block_path": "model.nothing"}, "does not name an nn.ModuleList"),
    ],
)
def test_bad_inputs_are_refused_with_clear_messages(tiny, kwargs, message):
    model = tiny["llama"].model
    before = snapshot(model)
    arguments = {"vectors": {1: torch.zeros(32)}, "coefficient": 1.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        with steer(model, **arguments):
            pass
    assert_untouched(model, before)
