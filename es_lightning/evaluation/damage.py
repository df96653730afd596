"""How much steering damages the target: divergence from the unsteered model on neutral text, and answer health.

Neutral text (our default, see README): the target's own *unsteered* greedy continuations of the prompts. On
them we measure, per steering variant, the mean over continuation tokens of

* ``kl``: KL(unsteered || steered) of the next-token distributions, in nats (ITI's "KL" column);
* ``ce_increase``: the continuation tokens' cross-entropy under the steered model minus under the unsteered one,
  in nats per token (ITI's "CE" column, on the model's own text instead of OpenWebText, so it runs offline).

Both are 0 for an unsteered variant and grow with the strength of the push. :func:`answer_nll` gives the
unsteered model's negative log-likelihood of (steered) answers, the perplexity part of generation health.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from es_lightning.steering.hooks import Positions, RowSteering, SteeringVariant, row_steering, steer_rows


@dataclass(frozen=True)
class Damage:
    """Token-weighted sums of a variant's divergence from the unsteered model; add them over rows, then read means."""

    kl_sum: float = 0.0
    ce_increase_sum: float = 0.0
    tokens: int = 0

    def __add__(self, other: Damage) -> Damage:
        return Damage(
            self.kl_sum + other.kl_sum, self.ce_increase_sum + other.ce_increase_sum, self.tokens + other.tokens
        )

    @property
    def kl(self) -> float | None:
        """Mean KL(unsteered || steered) per continuation token (nats); None without tokens."""
        return self.kl_sum / self.tokens if self.tokens else None

    @property
    def ce_increase(self) -> float | None:
        """Mean cross-entropy increase per continuation token (nats); None without tokens."""
        return self.ce_increase_sum / self.tokens if self.tokens else None

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)


def _layout(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, device: torch.device):
    """Left-padded prompts, then right-padded continuations: ids, mask, positions, the prompt width and the
    continuation width (the prompt/continuation boundary is the same slot in every row, as in ``generate``)."""
    width = max(len(p) for p, _ in pairs)
    length = max(len(c) for _, c in pairs)
    ids = torch.full((len(pairs), width + length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (prompt, continuation) in enumerate(pairs):
        ids[row, width - len(prompt) : width] = torch.tensor(list(prompt), dtype=torch.long)
        ids[row, width : width + len(continuation)] = torch.tensor(list(continuation), dtype=torch.long)
        mask[row, width - len(prompt) : width + len(continuation)] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device), width, length


def _continuation_logits(model: torch.nn.Module, pairs, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 logits at every slot that predicts a continuation token ``[rows, length, vocab]``, the continuation
    tokens ``[rows, length]`` and their mask."""
    device = next(model.parameters()).device
    ids, mask, positions, width, length = _layout(pairs, pad_id, device)
    logits = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=length + 1
    ).logits[:, :length]
    return logits.float(), ids[:, width : width + length], mask[:, width : width + length].bool()


def _continuation_logprobs(
    model: torch.nn.Module, pairs, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Like :func:`_continuation_logits`, as log-softmax over the vocabulary."""
    logits, targets, mask = _continuation_logits(model, pairs, pad_id)
    return logits.log_softmax(-1), targets, mask


def continuation_damage(
    model: torch.nn.Module,
    pad_id: int,
    continuations: Sequence[tuple[Sequence[int], Sequence[int]]],
    variants: Sequence[SteeringVariant],
    positions: Positions = "all",
    block_path: str | None = None,
    batch_size: int = 32,
) -> list[list[Damage]]:
    """The :class:`Damage` of every variant on each unsteered continuation: ``[variant][continuation]``.

    ``continuations`` are (prompt ids, the unsteered model's continuation ids) pairs; empty continuations are
    skipped. The unsteered reference runs once per chunk of continuations, then every variant over the same chunk
    (``batch_size`` rows per forward pass). With ``positions`` other than ``all`` the prompt is the padded prompt
    width, as in generation.
    """
    totals = [[Damage() for _ in continuations] for _ in variants]
    present = sorted(
        (k for k, (_, c) in enumerate(continuations) if len(c)),  # similar lengths share a pass
        key=lambda k: -(len(continuations[k][0]) + len(continuations[k][1])),
    )
    if not present or not any(v.steers for v in variants):
        return totals  # nothing pushes the model: every divergence is exactly zero
    table = row_steering(model, variants, [], block_path).table
    per_chunk = max(1, batch_size // 2)
    with torch.inference_mode():
        for start in range(0, len(present), per_chunk):
            index = present[start : start + per_chunk]
            chunk = [continuations[k] for k in index]
            base, targets, mask = _continuation_logprobs(model, chunk, pad_id)
            base_nll = -base.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            base_probs = base.exp()  # once per chunk, shared by every variant
            per_pass = max(1, batch_size // len(chunk))
            prompt_width = None if positions == "all" else max(len(p) for p, _ in chunk)  # _layout's boundary
            for first in range(0, len(variants), per_pass):
                group = list(range(first, min(len(variants), first + per_pass)))
                rows = RowSteering(table, tuple(v for v in group for _ in chunk))
                with steer_rows(model, rows, positions=positions, prompt_length=prompt_width, block_path=block_path):
                    steered, _, _ = _continuation_logprobs(model, chunk * len(group), pad_id)
                steered = steered.view(len(group), len(chunk), *steered.shape[1:])
                for k, variant in enumerate(group):
                    kl = (base_probs * (base - steered[k])).sum(-1).masked_fill(~mask, 0.0)
                    increase = (-steered[k].gather(-1, targets.unsqueeze(-1)).squeeze(-1) - base_nll).masked_fill(
                        ~mask, 0.0
                    )
                    for row, k_pair in enumerate(index):
                        totals[variant][k_pair] = Damage(
                            float(kl[row].sum()), float(increase[row].sum()), int(mask[row].sum())
                        )
    return totals


def answer_nll(
    model: torch.nn.Module, pad_id: int, answers: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 32
) -> list[tuple[float, int]]:
    """Per (prompt ids, answer ids) pair: the unsteered model's summed negative log-likelihood of the answer tokens
    given the prompt, and the number of answer tokens ((0.0, 0) for an empty answer)."""
    out: list[tuple[float, int]] = [(0.0, 0)] * len(answers)
    present = sorted(
        (k for k, (_, answer) in enumerate(answers) if len(answer)),  # similar lengths share a pass
        key=lambda k: -(len(answers[k][0]) + len(answers[k][1])),
    )
    with torch.inference_mode():
        for start in range(0, len(present), batch_size):
            index = present[start : start + batch_size]
            logits, targets, mask = _continuation_logits(model, [answers[k] for k in index], pad_id)
            nll = (logits.logsumexp(-1) - logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)).masked_fill(~mask, 0.0)
            for row, k in enumerate(index):
                out[k] = (float(nll[row].sum()), int(mask[row].sum()))
    return out


@dataclass(frozen=True)
class AnswerHealth:
    """Sums over generated answers of what makes text unusable; add them over answers, then read the shares.

    ``empty``: answers with no words; ``repetition_sum``: each answer's share of repeated word 3-grams;
    ``nll_sum``/``tokens``: the unsteered model's negative log-likelihood of the answer tokens (perplexity)."""

    answers: int = 0
    empty: int = 0
    repetition_sum: float = 0.0
    nll_sum: float = 0.0
    tokens: int = 0

    def __add__(self, other: AnswerHealth) -> AnswerHealth:
        return AnswerHealth(
            self.answers + other.answers,
            self.empty + other.empty,
            self.repetition_sum + other.repetition_sum,
            self.nll_sum + other.nll_sum,
            self.tokens + other.tokens,
        )

    @property
    def empty_share(self) -> float:
        """Share of empty answers (0 without answers)."""
        return self.empty / self.answers if self.answers else 0.0

    @property
    def repetition(self) -> float:
        """Mean share of repeated word 3-grams per answer."""
        return self.repetition_sum / self.answers if self.answers else 0.0

    @property
    def perplexity(self) -> float | None:
        """The unsteered model's perplexity of the answers' tokens (None without tokens)."""
        return math.exp(self.nll_sum / self.tokens) if self.tokens else None

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)
