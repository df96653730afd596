"""Multiple-choice scoring by log-likelihood, with the prompt run once and its KV cache shared by its choices.

Tokenization: the prompt is tokenized on its own with the tokenizer's special tokens (so a BOS token is
added exactly when the tokenizer adds one), each choice on its own without special tokens, and the two
id lists are concatenated. The prompt/choice boundary is therefore exact, and whatever separates them
(usually a leading space in the choice, or a trailing newline in the prompt) is the caller's formatting.
A choice's score is the sum of the log-probabilities of its tokens given the prompt and the tokens of
the choice before them; the length-normalised score is that sum divided by the number of choice tokens.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torchmetrics.functional.classification import multiclass_accuracy
from tqdm.auto import tqdm

from es_lightning.steering.hooks import Positions, RowState, RowSteering, steer_rows
from es_lightning.stopping import check_stop

ContextFactory = Callable[[], AbstractContextManager]


@dataclass(frozen=True)
class ChoiceScores:
    """Log-likelihood scores of one question's choices."""

    logprob_sum: tuple[float, ...]  # summed log-prob of each choice's tokens given the prompt
    num_tokens: tuple[int, ...]  # number of tokens of each choice

    @property
    def logprob_mean(self) -> tuple[float, ...]:
        """Length-normalised scores: mean log-prob per choice token."""
        return tuple(total / count for total, count in zip(self.logprob_sum, self.num_tokens))

    def best(self, normalise: bool) -> int:
        """Index of the highest-scoring choice (the first one on ties)."""
        values = self.logprob_mean if normalise else self.logprob_sum
        return max(range(len(values)), key=values.__getitem__)


def _encode(
    tokenizer, prompts: Sequence[str], choices: Sequence[Sequence[str]], add_special_tokens: bool = True
) -> tuple[list[list[int]], list[list[list[int]]]]:
    prompt_ids = [list(tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]) for prompt in prompts]
    choice_ids = [[list(tokenizer(choice, add_special_tokens=False)["input_ids"]) for choice in row] for row in choices]
    for q, (prompt, ids) in enumerate(zip(prompts, prompt_ids)):
        if not ids:
            raise ValueError(
                f"Prompt {q} ({prompt!r}) tokenizes to no tokens, so its first choice token has nothing to be "
                f"predicted from. Give every question a non-empty prompt or use a tokenizer that adds a BOS token."
            )
    for q, row in enumerate(choice_ids):
        for c, ids in enumerate(row):
            if not ids:
                raise ValueError(
                    f"Choice {c} of question {q} ({choices[q][c]!r}) tokenizes to no tokens; drop or fix it."
                )
    return prompt_ids, choice_ids


def _batches(order: list[int], choice_counts: list[int], batch_size: int) -> list[list[int]]:
    """Group questions (in ``order``) so each group has at most ``batch_size`` choices; never split a question."""
    groups: list[list[int]] = []
    rows = 0
    for q in order:
        if groups and rows + choice_counts[q] <= batch_size:
            groups[-1].append(q)
            rows += choice_counts[q]
        else:
            groups.append([q])
            rows = choice_counts[q]
    return groups


def _cache_argument(model: torch.nn.Module) -> str:
    """Name of the forward argument taking a KV cache: ``cache`` in recent transformers, else ``past_key_values``."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) for each position, in float32, without materialising a full log-softmax copy."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def _left_padded_prompts(
    prompt_ids: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The prompts left-padded to one width: (tokens, attention mask, each prompt's length), on ``device``."""
    n_questions = len(prompt_ids)
    prompt_len = torch.tensor([len(ids) for ids in prompt_ids], device=device)
    width = int(prompt_len.max())
    tokens = torch.full((n_questions, width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((n_questions, width), dtype=torch.long, device=device)
    for q, ids in enumerate(prompt_ids):
        tokens[q, width - len(ids) :] = torch.tensor(ids, device=device)
        mask[q, width - len(ids) :] = 1
    return tokens, mask, prompt_len


def _right_padded_choices(
    flat: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """All choices' token ids right-padded to the longest: (targets, boolean mask of real tokens), on ``device``."""
    length = max(len(ids) for ids in flat)
    targets = torch.full((len(flat), length), pad_id, dtype=torch.long, device=device)
    target_mask = torch.zeros((len(flat), length), dtype=torch.bool, device=device)
    for r, ids in enumerate(flat):
        targets[r, : len(ids)] = torch.tensor(ids, device=device)
        target_mask[r, : len(ids)] = True
    return targets, target_mask


def _per_question(sums: list[float], choice_ids: list[list[list[int]]]) -> list[tuple[list[float], list[int]]]:
    """The flat per-choice sums regrouped by question, each with its choices' token counts."""
    results: list[tuple[list[float], list[int]]] = []
    start = 0
    for row in choice_ids:
        results.append((sums[start : start + len(row)], [len(ids) for ids in row]))
        start += len(row)
    return results


def _score_group(
    model: torch.nn.Module,
    pad_id: int,
    prompt_ids: list[list[int]],
    choice_ids: list[list[list[int]]],
    rows: RowState | None = None,
) -> list[tuple[list[float], list[int]]]:
    """Score a group of questions: one left-padded prompt pass, then all choices (right-padded) on the shared cache.
    With per-row steering (``rows``), each choice row keeps its question's steering."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    tokens, mask, prompt_len = _left_padded_prompts(prompt_ids, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)  # type: ignore[arg-type]  # nn.Module types .config as Tensor | Module
    cache_arg = _cache_argument(model)
    out = model(
        input_ids=tokens,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        **{cache_arg: cache},
    )
    last_logits = out.logits[:, -1]  # (questions, vocab): predicts every choice's first token

    flat = [ids for row in choice_ids for ids in row]
    row_question = torch.tensor([q for q, row in enumerate(choice_ids) for _ in row], device=device)
    targets, target_mask = _right_padded_choices(flat, pad_id, device)
    length = targets.shape[1]
    logprobs = torch.zeros((len(flat), length), device=device)
    logprobs[:, 0] = _token_logprobs(last_logits[row_question], targets[:, 0])
    if length > 1:
        # Feed every choice token but the last (its prediction is never needed) on top of the prompt's cache.
        cache.batch_select_indices(row_question)
        if rows is not None:
            rows.select(row_question)
        inputs = targets[:, :-1]
        attention = torch.cat([mask[row_question], target_mask[:, :-1].long()], dim=1)
        choice_positions = prompt_len[row_question, None] + torch.arange(length - 1, device=device)
        out = model(
            input_ids=inputs,
            attention_mask=attention,
            position_ids=choice_positions,
            use_cache=True,
            **{cache_arg: cache},
        )
        logprobs[:, 1:] = _token_logprobs(out.logits, targets[:, 1:])
    sums = logprobs.masked_fill(~target_mask, 0.0).sum(-1).tolist()
    return _per_question(sums, choice_ids)


def _group_context(
    model: torch.nn.Module,
    context: ContextFactory | None,
    steering: RowSteering | None,
    group: list[int],
    positions: Positions,
    block_path: str | None,
) -> AbstractContextManager:
    """The context a group's passes run in: the caller's factory, per-row steering of the group, or nothing."""
    if steering is not None:
        return steer_rows(model, steering.subset(group), positions=positions, block_path=block_path)
    return context() if context is not None else contextlib.nullcontext()


def score_choices(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    choices: Sequence[Sequence[str]],
    context: ContextFactory | None = None,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "scoring",
    add_special_tokens: bool = True,
    steering: RowSteering | None = None,
    positions: Positions = "all",
    block_path: str | None = None,
) -> list[ChoiceScores]:
    """Score every choice of every question by its log-likelihood given the question's prompt.

    Each prompt runs through the model once; its KV cache is then shared by all of its choices. Questions
    are grouped so that a forward pass holds at most ``batch_size`` choices (a question with more choices
    runs alone); prompts are left-padded and choices right-padded, with explicit position ids, so padding
    never changes a score. ``context``, if given, is a zero-argument factory of a context manager entered
    around each group's model calls (e.g. one that installs steering hooks). Inside it the first pass starts a
    fresh cache and covers the (padded) prompts, the second holds the choice tokens, so hooks that tell prompt
    from generated positions by the cache length see the prompt/choice boundary. Results keep the input order.
    """
    if len(prompts) != len(choices):
        raise ValueError(
            f"Got {len(prompts)} prompts but {len(choices)} choice lists; pass one choice list per prompt."
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    if steering is not None and (context is not None or len(steering.variant_of) != len(prompts)):
        raise ValueError(
            f"Per-row steering needs one variant per prompt ({len(prompts)}), got {len(steering.variant_of)}, and "
            f"no steering context besides it."
        )
    if model.training:
        raise ValueError("The model is in training mode, so dropout would make scores random; call model.eval() first.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("The tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token before scoring.")
    prompt_ids, choice_ids = _encode(tokenizer, prompts, choices, add_special_tokens)
    # Longest prompts first: similar lengths share a group (less padding) and memory peaks show up at once.
    order = sorted(range(len(prompts)), key=lambda q: -len(prompt_ids[q]))
    groups = _batches(order, [len(row) for row in choice_ids], batch_size)
    results: list[ChoiceScores | None] = [None] * len(prompts)
    with tqdm(total=len(prompts), desc=desc, unit="q", disable=not progress) as bar, torch.inference_mode():
        for group in groups:
            check_stop()
            with _group_context(model, context, steering, group, positions, block_path) as rows:
                scored = _score_group(
                    model,
                    pad_id,
                    [prompt_ids[q] for q in group],
                    [choice_ids[q] for q in group],
                    rows if isinstance(rows, RowState) else None,
                )
            for q, (sums, counts) in zip(group, scored):
                results[q] = ChoiceScores(logprob_sum=tuple(sums), num_tokens=tuple(counts))
            bar.update(len(group))
    return results  # type: ignore[return-value]  # every slot was filled above


def predictions(scores: Sequence[ChoiceScores], normalise: bool) -> list[int]:
    """Predicted choice index per question: argmax of the summed (or, with ``normalise``, the mean) log-prob."""
    return [row.best(normalise) for row in scores]


def correctness(scores: Sequence[ChoiceScores], answers: Sequence[int], normalise: bool) -> torch.Tensor:
    """Boolean tensor: whether each question's prediction equals its answer (for paired tests)."""
    if len(scores) != len(answers):
        raise ValueError(f"Got scores for {len(scores)} questions but {len(answers)} answers.")
    return torch.tensor(predictions(scores, normalise)) == torch.tensor(list(answers), dtype=torch.long)


def accuracy(scores: Sequence[ChoiceScores], answers: Sequence[int], normalise: bool) -> float:
    """Fraction of questions whose predicted choice is the answer.

    Uses torchmetrics' multiclass accuracy with micro averaging, which is exactly correct/total even though
    questions have different numbers of choices (classes are the choice indices, up to the largest count).
    """
    if not scores:
        raise ValueError("Cannot compute the accuracy of zero questions.")
    if len(scores) != len(answers):
        raise ValueError(f"Got scores for {len(scores)} questions but {len(answers)} answers.")
    for q, (row, answer) in enumerate(zip(scores, answers)):
        if not 0 <= answer < len(row.logprob_sum):
            raise ValueError(f"Answer {answer} of question {q} is out of range for its {len(row.logprob_sum)} choices.")
    num_classes = max(2, max(len(row.logprob_sum) for row in scores))
    preds = torch.tensor(predictions(scores, normalise))
    target = torch.tensor(list(answers), dtype=torch.long)
    return float(multiclass_accuracy(preds, target, num_classes=num_classes, average="micro"))
