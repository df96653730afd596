"""Batched, optionally steered text generation with reproducible, batch-invariant sampling.

:func:`generate` renders each prompt (with the model's chat template when it has one, unless configured
otherwise: see :func:`uses_chat_template`), left-pads a batch, runs
``model.generate`` with a KV cache and decodes only the new tokens. With a steering bundle and a nonzero
coefficient the whole call runs inside :func:`es_lightning.steering.hooks.steer`.

Sampling never touches the global RNG and does not depend on batching: transformers always decodes greedily
here, and when ``do_sample`` is set a logits processor (:class:`SeededSampler`) applies temperature and top-p
and then adds Gumbel noise drawn from a private ``torch.Generator`` per row, seeded from ``(seed, prompt
text)``. ``argmax(logits / T + Gumbel)`` over the top-p set is an exact sample from the top-p softmax, and each
row's noise depends only on its own prompt and the step, so a prompt gets the same sample alone or in any
batch (up to float rounding differences between padded and unpadded forward passes, the same caveat as for
greedy decoding). Consequences: the same prompt twice gets the same sample, and different coefficients or
methods for one prompt share their random numbers (common random numbers, which makes their comparison
less noisy). Sampling uses exactly ``temperature`` and ``top_p``: top-k, min-p and the like from the model's
``generation_config`` are not applied.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import numbers
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import cast

import torch

from es_lightning.models.layers import hidden_size
from es_lightning.models.prompting import render_prompt
from es_lightning.steering.bundle import SteeringBundle
from es_lightning.steering.hooks import POSITIONS, RowSteering, steer, steer_rows
from es_lightning.stopping import check_stop


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass
class GenerationSettings:
    """How to generate (``model.generation``): length, greedy or sampled, chat template, batch size."""

    max_new_tokens: int = 48
    """New tokens per answer at most."""
    do_sample: bool = False
    """Sample (with ``temperature``, ``top_p`` and ``seed``) instead of greedy decoding."""
    temperature: float = 1.0
    """Sampling temperature (> 0; greedy: ``do_sample: false``)."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    seed: int = 0
    """Seed of the sampling."""
    chat_template: bool | None = None
    """null: wrap each prompt in the tokenizer's chat template when it has one (an instruct model answers in its own
    turn format; without it SmolLM2-Instruct often ends at once); true: require it; false: plain text."""
    batch_size: int = 8
    """Prompts per generate call."""

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}.")
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be true or false, got {self.do_sample!r}.")
        if self.chat_template is not None and not isinstance(self.chat_template, bool):
            raise ValueError(
                f"chat_template must be true, false or null (when the model has one), got {self.chat_template!r}."
            )
        temperature = self.temperature
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, numbers.Real)
            or not math.isfinite(temperature)
            or temperature <= 0
        ):
            raise ValueError(
                f"temperature must be a finite number > 0, got {temperature!r}. For greedy decoding set do_sample: "
                f"false instead of temperature 0."
            )
        top_p = self.top_p
        if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1] (1 keeps every token), got {top_p!r}.")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {self.seed!r}.")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}.")
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.max_new_tokens, self.seed, self.batch_size = int(self.max_new_tokens), int(self.seed), int(self.batch_size)


def uses_chat_template(settings: GenerationSettings, tokenizer) -> bool:
    """Whether :func:`generate` wraps prompts in the chat template: as configured, or (``None``) if there is one."""
    if settings.chat_template is None:
        return bool(getattr(tokenizer, "chat_template", None))
    return settings.chat_template


def row_seed(seed: int, prompt: str) -> int:
    """The private RNG seed of one prompt: a hash of ``(seed, prompt)``, so it does not depend on batching."""
    digest = hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class SeededSampler:
    """A logits processor that turns greedy decoding into sampling with one private generator per row.

    Scores become ``logits / temperature + Gumbel noise`` on the top-p nucleus and ``-inf`` elsewhere, so
    greedy ``argmax`` draws a sample. The noise is drawn on the CPU (identical on every device).
    """

    def __init__(self, seeds: Sequence[int], temperature: float = 1.0, top_p: float = 1.0):
        self.generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        self.temperature = float(temperature)
        self.top_p = float(top_p)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[0] != len(self.generators):
            raise RuntimeError(f"SeededSampler has {len(self.generators)} rows but got scores for {scores.shape[0]}.")
        logits = scores.float() / self.temperature
        if self.top_p < 1.0:
            ordered, order = torch.sort(logits, dim=-1, descending=True)
            probs = ordered.softmax(dim=-1)
            before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
            drop_sorted = before >= self.top_p
            drop_sorted[..., 0] = False  # always keep the most likely token
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        vocab = logits.shape[-1]
        uniform = torch.stack([torch.rand(vocab, generator=generator) for generator in self.generators])
        uniform = uniform.clamp_(min=torch.finfo(torch.float32).tiny, max=1.0 - torch.finfo(torch.float32).eps)
        gumbel = -torch.log(-torch.log(uniform))
        return cast(torch.FloatTensor, logits + gumbel.to(logits.device))


def _check_bundle(model: torch.nn.Module, steering: SteeringBundle) -> None:
    width = hidden_size(model)
    vector_width = next(iter(steering.vectors.values())).shape[0]
    if vector_width != width:
        raise ValueError(
            f"The steering bundle {steering.method!r} has vectors of width {vector_width}, but this model's hidden "
            f"size is {width}. The bundle was made for another model (target {steering.target.describe()}): "
            f"load the model it was made for or recompute the bundle for this one."
        )


def _model_device(model: torch.nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}.")
    for number, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"Prompt {number} is a {type(prompt).__name__}, not a string.")
        if not prompt.strip():
            raise ValueError(f"Prompt {number} is empty; every prompt must contain text.")
    return list(prompts)


@dataclass(frozen=True)
class Generated:
    """One generated completion: the prompt's token ids, the new token ids (up to the first end-of-sequence or pad
    token) and the decoded text (special tokens skipped, whitespace stripped)."""

    prompt_ids: tuple[int, ...]
    new_ids: tuple[int, ...]
    text: str


def _stop_ids(model: torch.nn.Module, tokenizer, pad_id: int) -> set[int]:
    """Token ids that end a completion: the tokenizer's and the generation config's EOS ids, and the pad id."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, (list, tuple)) else [configured]
    return {int(i) for i in [tokenizer.eos_token_id, pad_id, *configured] if i is not None}


def generate_rendered(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    settings: GenerationSettings,
    add_special_tokens: bool,
    steering: RowSteering | None = None,
    positions: str = "all",
    block_path: str | None = None,
    seed_keys: Sequence[str] | None = None,
    context: Callable[[], AbstractContextManager] | None = None,
) -> list[Generated]:
    """Generate from already rendered prompt ``texts``, batched by ``settings.batch_size``, keeping token ids.

    ``steering`` steers each prompt by its own row (:func:`es_lightning.steering.hooks.steer_rows`), so one batch
    can carry many vectors and coefficients; ``context`` instead wraps every batch (e.g. :func:`steer`).
    ``seed_keys`` (default: the texts) seed each row's sampler when ``settings.do_sample``.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("The tokenizer has neither a pad nor an eos token, so prompts cannot be batched.")
    if steering is not None and len(steering.variant_of) != len(texts):
        raise ValueError(f"Per-row steering covers {len(steering.variant_of)} prompts but {len(texts)} were given.")
    seed_keys = list(texts) if seed_keys is None else list(seed_keys)
    stop = _stop_ids(model, tokenizer, pad_id)
    device = _model_device(model)
    # Longest prompts first, so rows of similar length share a batch (less padding; left padding keeps every row's
    # result the same in any batch) and a memory peak shows at once; outputs come back in the input order.
    lengths = [len(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]) for text in texts]
    order = sorted(range(len(texts)), key=lambda k: -lengths[k])
    outputs: list[Generated | None] = [None] * len(texts)
    with torch.inference_mode():
        for start in range(0, len(texts), settings.batch_size):
            check_stop()
            rows = order[start : start + settings.batch_size]
            encoded = _encode_batch(tokenizer, [texts[k] for k in rows], rows, add_special_tokens)
            kwargs = _sampling_kwargs(settings, [seed_keys[k] for k in rows])
            with _batch_scope(model, rows, steering, positions, block_path, context):
                sequences = model.generate(  # type: ignore[operator]  # nn.Module.__getattr__ hides generate()
                    input_ids=encoded["input_ids"].to(device),
                    attention_mask=encoded["attention_mask"].to(device),
                    max_new_tokens=settings.max_new_tokens,
                    do_sample=False,  # sampling, if any, is done by SeededSampler (batch-invariant, private RNG)
                    num_beams=1,
                    use_cache=True,
                    pad_token_id=pad_id,
                    **kwargs,
                )
            for row, k in enumerate(rows):
                outputs[k] = _completion(tokenizer, encoded, sequences, row, stop)
    return outputs  # type: ignore[return-value]  # every slot was filled above


def _encode_batch(tokenizer, chunk: list[str], rows: list[int], add_special_tokens: bool):
    """Tokenize one batch of prompts, left-padded; a prompt (numbered by ``rows``) with no tokens is an error."""
    encoded = tokenizer(
        chunk, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=add_special_tokens
    )
    lengths_in = encoded["attention_mask"].sum(dim=1) if encoded["input_ids"].shape[1] else torch.zeros(len(chunk))
    if (lengths_in == 0).any():
        empty = rows[int((lengths_in == 0).nonzero()[0, 0])]
        raise ValueError(f"Prompt {empty} tokenizes to no tokens; give it text the tokenizer knows.")
    return encoded


def _sampling_kwargs(settings: GenerationSettings, seed_keys: list[str]) -> dict:
    """``model.generate`` keyword arguments for sampling: a :class:`SeededSampler` per batch when ``do_sample``."""
    from transformers import LogitsProcessorList

    kwargs = {}
    if settings.do_sample:
        seeds = [row_seed(settings.seed, key) for key in seed_keys]
        kwargs["logits_processor"] = LogitsProcessorList([SeededSampler(seeds, settings.temperature, settings.top_p)])
    return kwargs


def _batch_scope(
    model: torch.nn.Module,
    rows: list[int],
    steering: RowSteering | None,
    positions: str,
    block_path: str | None,
    context: Callable[[], AbstractContextManager] | None,
) -> AbstractContextManager:
    """The context one batch generates in: per-row steering of ``rows``, else ``context()``, else nothing."""
    if steering is not None:
        return steer_rows(
            model,
            steering.subset(rows),
            positions=positions,  # type: ignore[arg-type]
            block_path=block_path,
        )
    return context() if context is not None else contextlib.nullcontext()


def _completion(tokenizer, encoded, sequences: torch.Tensor, row: int, stop: set[int]) -> Generated:
    """Batch row ``row``'s completion: its prompt ids and new ids up to the first ``stop`` token, decoded."""
    width = encoded["input_ids"].shape[1]
    new = sequences[row, width:].tolist()
    end = next((i for i, token in enumerate(new) if token in stop), len(new))
    prompt = encoded["input_ids"][row][encoded["attention_mask"][row].bool()].tolist()
    text = tokenizer.decode(new[:end], skip_special_tokens=True).strip()
    return Generated(tuple(prompt), tuple(new[:end]), text)


def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[str],
    settings: GenerationSettings | None = None,
    steering: SteeringBundle | None = None,
    coefficient: float = 0.0,
    positions: str = "all",
    block_path: str | None = None,
) -> list[str]:
    """Generate one completion per prompt, in order, batched by ``settings.batch_size``.

    Each prompt is rendered with the chat template if :func:`uses_chat_template`, left-padded, and extended by
    up to ``settings.max_new_tokens`` tokens (``use_cache=True``); only the new tokens are decoded (special
    tokens skipped, whitespace stripped). With ``steering`` and a nonzero ``coefficient`` the model is steered
    by ``coefficient * norm_j * v_j`` at ``positions`` (see :func:`es_lightning.steering.hooks.steer`). The
    model and tokenizer are not modified; the global torch RNG is not used.
    """
    settings = settings if settings is not None else GenerationSettings()
    if not isinstance(settings, GenerationSettings):
        raise TypeError(f"settings must be a GenerationSettings, got {type(settings).__name__}.")
    prompts = _check_prompts(prompts)
    if positions not in POSITIONS:
        raise ValueError(f"Unknown positions {positions!r}: use one of {list(POSITIONS)}.")
    if isinstance(coefficient, bool) or not isinstance(coefficient, numbers.Real) or not math.isfinite(coefficient):
        raise ValueError(f"The steering coefficient must be a finite number, got {coefficient!r}.")
    if steering is None and coefficient != 0:
        raise ValueError(
            f"A steering coefficient of {coefficient} was given without a steering bundle: pass steering=<bundle> "
            f"or use coefficient 0 for the unsteered model."
        )
    if steering is not None:
        _check_bundle(model, steering)
    if not prompts:
        return []
    chat = uses_chat_template(settings, tokenizer)
    texts = [render_prompt(tokenizer, prompt, chat) for prompt in prompts]
    context = None
    if steering is not None and coefficient != 0:

        def context() -> AbstractContextManager:
            return steer(
                model, **steering.steering_kwargs(float(coefficient)), positions=positions, block_path=block_path
            )

    generated = generate_rendered(
        model,
        tokenizer,
        texts,
        settings,
        add_special_tokens=not chat,  # a chat template writes BOS
        positions=positions,
        block_path=block_path,
        seed_keys=prompts,
        context=context,
    )
    return [g.text for g in generated]
