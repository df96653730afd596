"""Capture pooled block outputs with forward hooks, stopping after the deepest requested block."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, cast

import torch
from torch import nn

from es_lightning.models.layers import get_blocks
from es_lightning.stopping import check_stop

Pooling = Literal["last", "mean"]


class _StopForward(Exception):
    """Raised by the hook on the deepest requested block so later blocks and the LM head never run."""


def block_output(output: object) -> torch.Tensor:
    """The hidden-state tensor inside a decoder block's output (a tensor or a tuple led by one)."""
    if isinstance(output, (tuple, list)):
        return output[0]
    return cast(torch.Tensor, output)  # a block that returns no tuple returns its hidden state itself


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-padding token of each row; correct for left and right padding."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * (positions + 1)).argmax(dim=1)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Pool ``hidden: [B, T, d]`` over non-padding tokens to ``[B, d]``; values at padding positions never matter."""
    if pooling == "last":
        index = last_token_index(attention_mask)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]
    if pooling == "mean":  # padding positions are filled, not multiplied by 0: a NaN there would survive a product
        mask = attention_mask.bool().unsqueeze(-1)
        return hidden.masked_fill(~mask, 0).sum(dim=1) / mask.sum(dim=1).clamp_min(1).to(hidden.dtype)
    raise ValueError(f"Unknown pooling {pooling!r}: use 'last' or 'mean'.")


@torch.no_grad()
def capture_hidden_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layers: Sequence[int],
    pooling: Pooling = "last",
    block_path: str | None = None,
) -> torch.Tensor:
    """Pooled outputs of the given blocks, ``[B, len(layers), d]`` in float32.

    Blocks after ``max(layers)`` and the LM head never run. The model is not modified: hooks are
    removed before returning, also on errors. A non-finite value at a real token (``attention_mask`` 1) is an
    error; padding positions are never read, so whatever a model leaves there is ignored.
    """
    blocks = get_blocks(model, block_path)
    wanted = sorted(set(layers))
    deepest = wanted[-1]
    captured: dict[int, torch.Tensor] = {}
    real = attention_mask.bool()

    def make_hook(index: int):
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            hidden = block_output(output)
            if not torch.isfinite(hidden[real]).all():
                raise FloatingPointError(
                    f"Non-finite values (NaN/Inf) in the output of block {index}. This is often a float16 "
                    f"overflow: load the model in float32 or bfloat16 (dtype in the model config)."
                )
            captured[index] = pool(hidden, attention_mask, pooling).float()
            if index == deepest:
                raise _StopForward

        return hook

    handles = [blocks[index].register_forward_hook(make_hook(index)) for index in wanted]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([captured[index] for index in layers], dim=1)


def tokenize_texts(
    tokenizer, texts: Sequence[str], max_length: int, add_special_tokens: bool = True
) -> tuple[list[list[int]], int]:
    """Token ids per text, truncated from the left to ``max_length``; also returns how many were truncated."""
    ids = tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]
    truncated = sum(len(row) > max_length for row in ids)
    bos = tokenizer.bos_token_id
    out = []
    for row in ids:
        if len(row) > max_length:  # keep a leading BOS: models such as Gemma depend on it
            row = (
                [row[0], *row[len(row) - max_length + 1 :]] if bos is not None and row[0] == bos else row[-max_length:]
            )
        out.append(row)
    return out, truncated


def token_batches(lengths: Sequence[int], max_rows: int, max_tokens: int | None = None) -> list[list[int]]:
    """Indices grouped into batches by length: at most ``max_rows`` rows and, when ``max_tokens`` is set, at most
    that many padded tokens (rows x longest row) per batch; a single longer text forms its own batch."""
    if max_rows < 1 or (max_tokens is not None and max_tokens < 1):
        raise ValueError(f"Batch limits must be positive: max_rows={max_rows}, max_tokens={max_tokens}.")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    for i in order:  # ascending lengths: the newest row is the longest of its batch
        batch = batches[-1] if batches else None
        if (
            batch is None
            or len(batch) >= max_rows
            or (max_tokens is not None and (len(batch) + 1) * lengths[i] > max_tokens)
        ):
            batches.append([i])
        else:
            batch.append(i)
    return batches


@torch.no_grad()
def capture_texts(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    layers: Sequence[int],
    pooling: Pooling = "last",
    max_length: int = 512,
    batch_size: int = 16,
    add_special_tokens: bool = True,
    block_path: str | None = None,
    on_batch=None,
    batch_tokens: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Pooled block outputs ``[n, len(layers), d]`` for raw texts, batched by length; returns (states, n_truncated).

    Texts are sorted by length so batches carry little padding, then put back in input order. A batch holds at
    most ``batch_size`` texts and, when ``batch_tokens`` is set, at most that many padded tokens.
    ``on_batch(k)`` is called after each batch of k texts (for progress bars). A stop signal ends the loop between
    batches (:func:`es_lightning.stopping.check_stop`).
    """
    ids, truncated = tokenize_texts(tokenizer, texts, max_length, add_special_tokens)
    if any(len(row) == 0 for row in ids):
        raise ValueError("A text tokenized to zero tokens; remove empty texts from the data.")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[torch.Tensor | None] = [None] * len(ids)
    for chunk in token_batches([len(row) for row in ids], batch_size, batch_tokens):
        check_stop()
        width = max(len(ids[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):  # right padding; pooling handles either side
            input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
            mask[row, : len(ids[i])] = 1
        states = capture_hidden_states(model, input_ids.to(device), mask.to(device), layers, pooling, block_path)
        for row, i in enumerate(chunk):
            out[i] = states[row].cpu()
        if on_batch is not None:
            on_batch(len(chunk))
    return torch.stack(out), truncated  # type: ignore[arg-type]
