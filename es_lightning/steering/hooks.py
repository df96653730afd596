"""Steer a model by adding vectors to its decoder blocks' outputs, with forward hooks in a context manager.

Inside ``with steer(model, vectors, coefficient):`` the output hidden states of every steered block ``j``
get ``coefficient * norm_j * vectors[j]`` added. Nothing is written to the model: the hooks are removed
when the block exits, also on an exception.

Positions are counted in *slots* of the (padded) sequence, the way a KV cache counts them: slot ``s`` of a
forward pass is ``s = past + t`` where ``past`` is the number of tokens already in the pass's KV cache
(0 without one) and ``t`` the index in the pass. The prompt is every slot below ``prompt_length``:

* ``"all"``: every slot is steered.
* ``"prompt"``: only slots ``< prompt_length`` (the prefill). Decode steps with a KV cache are not steered,
  but they attend to the steered prompt keys and values.
* ``"generated"``: only slots ``>= prompt_length``: decode steps with a KV cache, or the tail of a full
  sequence re-fed without a cache.

``prompt_length`` is the number of slots covered by the first forward pass inside the context, unless given
explicitly. A pass that starts a fresh KV cache (past == 0, as every ``generate`` call does) starts a new
prompt, so one context may wrap several ``generate`` calls. Passes without a cache never reset it: when
several cache-less generations share a context, pass ``prompt_length`` or use one context per call. With
left padding the prompt is the padded width, so every row's real prompt tokens fall below it and its
generated tokens above it, exactly as when each prompt runs alone.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache

from es_lightning.models.capture import block_output
from es_lightning.models.layers import get_blocks, hidden_size
from es_lightning.steering.options import Positions

POSITIONS: tuple[str, ...] = ("all", "prompt", "generated")


@dataclass
class SteeringState:
    """What the hooks know about the current sequence; yielded by :func:`steer` for inspection."""

    positions: Positions
    prompt_length: int | None = None  # slots below it are the prompt; None until the first forward pass
    explicit: bool = False  # prompt_length was given, so passes never reset it
    start: int = 0  # slice of the current pass that is steered
    stop: int = 0

    def begin_pass(self, past: int, length: int, fresh_cache: bool) -> None:
        """Record a new forward pass of ``length`` tokens after ``past`` cached ones; pick its steered slice."""
        if not self.explicit and (self.prompt_length is None or fresh_cache):
            self.prompt_length = past + length
        boundary = min(max(self.prompt_length - past, 0), length)  # type: ignore[operator]
        self.start, self.stop = (0, boundary) if self.positions == "prompt" else (boundary, length)


def _check_number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}.")
    return float(value)


def _deltas(
    model: nn.Module,
    vectors: Mapping[int, torch.Tensor],
    coefficient: float,
    norms: Mapping[int, float] | None,
    n_blocks: int,
) -> dict[int, torch.Tensor]:
    """Validate the inputs and return ``coefficient * norm_j * v_j`` per block, in float32."""
    coefficient = _check_number(coefficient, "The steering coefficient")
    if not vectors:
        raise ValueError("No steering vectors given: pass a mapping {block index: vector} with at least one entry.")
    width = hidden_size(model)
    if norms is not None and set(norms) != set(vectors):
        raise ValueError(
            f"norms covers layers {sorted(norms)} but vectors covers {sorted(vectors)}: give one norm per "
            f"steered layer, or norms=None for a norm of 1 everywhere."
        )
    deltas = {}
    for layer, vector in vectors.items():
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_blocks:
            raise ValueError(
                f"Steering layer {layer!r} is out of range: this model has {n_blocks} blocks, so use indices "
                f"0..{n_blocks - 1}."
            )
        if not isinstance(vector, torch.Tensor) or vector.shape != (width,):
            shape = tuple(vector.shape) if isinstance(vector, torch.Tensor) else type(vector).__name__
            raise ValueError(
                f"The steering vector for layer {layer} has shape {shape} but this model's hidden size is "
                f"{width}: each vector must be 1-D of length {width}. Vectors made for another model do not fit."
            )
        if not torch.isfinite(vector).all():
            raise ValueError(f"The steering vector for layer {layer} contains NaN or Inf values.")
        norm = 1.0 if norms is None else _check_number(norms[layer], f"The norm of layer {layer}")
        if norm <= 0:
            raise ValueError(f"The norm of layer {layer} must be positive, got {norm}.")
        deltas[layer] = vector.detach().float().cpu() * (coefficient * norm)
    return deltas


def _add(hidden: torch.Tensor, delta: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """``hidden`` with ``delta`` added at sequence positions ``start:stop`` (out of place)."""
    if start == 0 and stop == hidden.shape[1]:
        return hidden + delta
    if start >= stop:
        return hidden
    steered = hidden.clone()
    steered[:, start:stop] += delta
    return steered


def _find_cache(args: tuple, kwargs: dict) -> Cache | None:

    return next((value for value in (*args, *kwargs.values()) if isinstance(value, Cache)), None)


def _check_positions(positions: str, prompt_length: int | None) -> None:
    if positions not in POSITIONS:
        raise ValueError(f"Unknown positions {positions!r}: use one of {list(POSITIONS)}.")
    if prompt_length is not None:
        if positions == "all":
            raise ValueError("prompt_length only applies to positions='prompt' or 'generated', not 'all'.")
        if isinstance(prompt_length, bool) or not isinstance(prompt_length, int) or prompt_length < 1:
            raise ValueError(f"prompt_length must be a positive int, got {prompt_length!r}.")


@contextlib.contextmanager
def _hooked(
    blocks: nn.ModuleList,
    layers: Sequence[int],
    delta_for: Callable[[int, torch.Tensor], torch.Tensor],
    state: SteeringState,
) -> Iterator[None]:
    """Install the hooks that add ``delta_for(layer, hidden)`` (broadcast over positions) to each layer's output at
    the positions ``state`` picks; remove them on exit, also on an exception."""

    def on_pass(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        cache = _find_cache(args, kwargs)
        past = int(cache.get_seq_length()) if cache is not None else 0
        state.begin_pass(past, hidden.shape[1], fresh_cache=cache is not None and past == 0)

    def make_hook(layer: int):
        def hook(_module: nn.Module, _inputs: object, output: object) -> object:
            hidden = block_output(output)
            delta = delta_for(layer, hidden)
            if state.positions == "all":
                steered = hidden + delta
            else:
                steered = _add(hidden, delta, state.start, state.stop)
            if isinstance(output, (tuple, list)):
                return type(output)((steered, *output[1:]))
            return steered

        return hook

    handles = []
    try:
        if state.positions != "all":
            handles.append(blocks[0].register_forward_pre_hook(on_pass, with_kwargs=True))
        for layer in sorted(layers):
            handles.append(blocks[layer].register_forward_hook(make_hook(layer)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def steer(
    model: nn.Module,
    vectors: Mapping[int, torch.Tensor],
    coefficient: float,
    norms: Mapping[int, float] | None = None,
    positions: Positions = "all",
    prompt_length: int | None = None,
    block_path: str | None = None,
) -> Iterator[SteeringState]:
    """Add ``coefficient * norms[j] * vectors[j]`` to the output of each block ``j`` while the block runs.

    ``vectors`` maps 0-based block indices to 1-D tensors of the hidden size (any dtype or device: they are
    cast to the activations' dtype and device). ``norms`` defaults to 1 per layer. ``positions`` and
    ``prompt_length`` choose the steered positions (see the module docstring). Yields a
    :class:`SteeringState`; the model itself is never modified.
    """
    _check_positions(positions, prompt_length)
    blocks = get_blocks(model, block_path)
    deltas = _deltas(model, vectors, coefficient, norms, len(blocks))
    state = SteeringState(positions=positions, prompt_length=prompt_length, explicit=prompt_length is not None)
    cast: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}

    def delta_for(layer: int, hidden: torch.Tensor) -> torch.Tensor:
        key = (layer, hidden.dtype, hidden.device)
        if key not in cast:
            cast[key] = deltas[layer].to(device=hidden.device, dtype=hidden.dtype)
        return cast[key]

    with _hooked(blocks, list(deltas), delta_for, state):
        yield state


@dataclass(frozen=True)
class SteeringVariant:
    """One way to steer a row: ``coefficient * norms[j] * vectors[j]`` at each block ``j``; no vectors or a zero
    coefficient leave the row unsteered. ``name`` is for the caller (e.g. "expertsteer", "random draw 3")."""

    name: str
    coefficient: float = 0.0
    vectors: Mapping[int, torch.Tensor] | None = None
    norms: Mapping[int, float] | None = None

    @property
    def steers(self) -> bool:
        return self.vectors is not None and self.coefficient != 0


@dataclass(frozen=True)
class RowSteering:
    """Per-row steering of a batch of prompts: prompt ``p`` is steered by ``table[j][variant_of[p]]`` at block ``j``.

    ``table`` holds one float32 row per variant and steered block (zeros where a variant leaves the block alone),
    so one forward pass can carry many vectors and coefficients at once (random draws, sweep points).
    """

    table: Mapping[int, torch.Tensor]  # block -> [variants, hidden]
    variant_of: tuple[int, ...]  # per prompt: its row of the table

    def subset(self, prompts: Sequence[int]) -> RowSteering:
        """The same table for a sub-batch of the prompts (in the given order)."""
        return RowSteering(self.table, tuple(self.variant_of[p] for p in prompts))


def row_steering(
    model: nn.Module, variants: Sequence[SteeringVariant], variant_of: Sequence[int], block_path: str | None = None
) -> RowSteering:
    """Build a :class:`RowSteering`: ``variants`` are checked like :func:`steer`'s arguments, ``variant_of`` gives
    each prompt's variant index."""
    if not variants:
        raise ValueError("row_steering needs at least one variant (an unsteered one is SteeringVariant('none')).")
    bad = [v for v in variant_of if isinstance(v, bool) or not 0 <= int(v) < len(variants)]
    if bad:
        raise ValueError(f"Variant indices {bad[:5]} are out of range for {len(variants)} variants.")
    n_blocks, width = len(get_blocks(model, block_path)), hidden_size(model)
    per_variant = [
        _deltas(model, v.vectors, v.coefficient, v.norms, n_blocks) if v.vectors is not None and v.steers else {}
        for v in variants
    ]
    layers = sorted({layer for deltas in per_variant for layer in deltas})
    table = {layer: torch.zeros(len(variants), width) for layer in layers}
    for index, deltas in enumerate(per_variant):
        for layer, delta in deltas.items():
            table[layer][index] = delta
    return RowSteering(table, tuple(int(v) for v in variant_of))


@dataclass
class RowState(SteeringState):
    """:class:`SteeringState` plus which table row each batch row uses; :meth:`select` re-maps the rows when a batch
    is reshaped between passes (e.g. a prompt's KV cache expanded to one row per answer choice)."""

    rows: torch.Tensor | None = None

    def select(self, index: Sequence[int] | torch.Tensor) -> None:
        """Batch row ``r`` now takes the table row of former batch row ``index[r]``."""
        assert self.rows is not None
        self.rows = self.rows[torch.as_tensor(index, dtype=torch.long, device=self.rows.device)]


@contextlib.contextmanager
def steer_rows(
    model: nn.Module,
    steering: RowSteering,
    positions: Positions = "all",
    prompt_length: int | None = None,
    block_path: str | None = None,
) -> Iterator[RowState]:
    """Like :func:`steer`, but batch row ``r`` gets its own delta ``table[j][variant_of[r]]`` at block ``j``.

    The batch's rows are ``steering.variant_of`` in order; use :meth:`RowSteering.subset` for a sub-batch. Rows
    whose variant does not steer get exactly zero added. Yields a :class:`RowState`.
    """
    _check_positions(positions, prompt_length)
    blocks = get_blocks(model, block_path)
    state = RowState(
        positions=positions,
        prompt_length=prompt_length,
        explicit=prompt_length is not None,
        rows=torch.tensor(steering.variant_of, dtype=torch.long),
    )
    cast: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}

    def delta_for(layer: int, hidden: torch.Tensor) -> torch.Tensor:
        key = (layer, hidden.dtype, hidden.device)
        if key not in cast:
            cast[key] = steering.table[layer].to(device=hidden.device, dtype=hidden.dtype)
        rows = state.rows.to(hidden.device)  # type: ignore[union-attr]
        if rows.shape[0] != hidden.shape[0]:
            raise RuntimeError(f"Row steering covers {rows.shape[0]} rows but the batch has {hidden.shape[0]}.")
        return cast[key].index_select(0, rows)[:, None, :]

    with _hooked(blocks, list(steering.table), delta_for, state):
        yield state
