"""Hidden-state capture: early stop equals a full forward, padding side and batching do not matter."""

import pytest
import torch

from es_lightning.models import capture_hidden_states, get_blocks, hidden_size, load_model, num_layers
from es_lightning.models.capture import capture_texts, pool

TEXTS = ["what is the big cat ?", "the dog is red", "where is the small green tree and the old fish ?"]


@pytest.fixture(scope="module", params=["tiny_llama_dir", "tiny_gpt2_dir", "tiny_gemma_dir"])
def loaded(request):
    return load_model(str(request.getfixturevalue(request.param)))


def _batch(tokenizer, texts, side):
    tokenizer.padding_side = side
    return tokenizer(texts, return_tensors="pt", padding=True)


def test_early_stop_equals_output_hidden_states(loaded):
    batch = _batch(loaded.tokenizer, TEXTS, "right")
    layers = list(range(num_layers(loaded.model) - 1))  # the last entry of hidden_states is post-final-norm
    full = loaded.model(**batch, output_hidden_states=True).hidden_states
    captured = capture_hidden_states(loaded.model, batch["input_ids"], batch["attention_mask"], layers, "mean")
    for k, layer in enumerate(layers):
        expected = pool(full[layer + 1], batch["attention_mask"], "mean")
        torch.testing.assert_close(captured[:, k], expected, rtol=1e-5, atol=1e-5)


def test_later_blocks_never_run(loaded):
    blocks = get_blocks(loaded.model)
    before = [dict(b._forward_hooks) for b in blocks]
    ran = []
    handles = [b.register_forward_hook(lambda m, i, o, k=k: ran.append(k)) for k, b in enumerate(blocks)]
    try:
        batch = _batch(loaded.tokenizer, TEXTS, "right")
        capture_hidden_states(loaded.model, batch["input_ids"], batch["attention_mask"], [0], "last")
    finally:
        for h in handles:
            h.remove()
    assert ran == [0]
    assert [dict(b._forward_hooks) for b in blocks] == before  # capture left no hook behind


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_left_padding_equals_right_padding(loaded, pooling):
    if loaded.model.config.model_type == "gpt2":
        pytest.skip("GPT-2 uses absolute positions without position_ids from the mask")
    right = _batch(loaded.tokenizer, TEXTS, "right")
    left = _batch(loaded.tokenizer, TEXTS, "left")
    layers = [0, 1]
    a = capture_hidden_states(loaded.model, right["input_ids"], right["attention_mask"], layers, pooling)
    b = capture_hidden_states(loaded.model, left["input_ids"], left["attention_mask"], layers, pooling)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_batched_equals_one_by_one(loaded):
    layers = [1, 0]
    batched, _ = capture_texts(loaded.model, loaded.tokenizer, TEXTS, layers, "last", batch_size=3)
    single = torch.cat(
        [capture_texts(loaded.model, loaded.tokenizer, [t], layers, "last", batch_size=1)[0] for t in TEXTS]
    )
    assert batched.shape == (3, 2, hidden_size(loaded.model))
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-4)


def test_truncation_is_counted(loaded):
    _, truncated = capture_texts(loaded.model, loaded.tokenizer, TEXTS, [0], "last", max_length=5)
    assert truncated == 2


def test_nan_hidden_state_names_the_layer(loaded):
    block = get_blocks(loaded.model)[1]
    handle = block.register_forward_hook(
        lambda m, i, o: (o[0] * float("nan"),) + tuple(o[1:]) if isinstance(o, tuple) else o * float("nan")
    )
    try:
        batch = _batch(loaded.tokenizer, TEXTS, "right")
        with pytest.raises(FloatingPointError, match="block 1"):
            capture_hidden_states(loaded.model, batch["input_ids"], batch["attention_mask"], [0, 1, 2], "last")
    finally:
        handle.remove()


def test_token_budget_batches_give_the_states_of_row_batches(loaded):
    from es_lightning.models.capture import token_batches, tokenize_texts

    texts = TEXTS * 3 + ["the cat", "is big and red and good and old and new and small"]
    layers = [0, num_layers(loaded.model) - 1]
    by_rows, _ = capture_texts(loaded.model, loaded.tokenizer, texts, layers, "last", batch_size=4)
    by_tokens, _ = capture_texts(loaded.model, loaded.tokenizer, texts, layers, "last", batch_size=64, batch_tokens=24)
    torch.testing.assert_close(by_tokens, by_rows, rtol=1e-5, atol=1e-5)
    lengths = [len(row) for row in tokenize_texts(loaded.tokenizer, texts, 512)[0]]
    batches = token_batches(lengths, 64, 24)
    assert sorted(i for b in batches for i in b) == list(range(len(texts)))  # every text once
    assert len(batches) > 2 and all(len(b) * max(lengths[i] for i in b) <= 24 or len(b) == 1 for b in batches)
    assert all(len(b) <= 3 for b in token_batches(lengths, 3, None))
