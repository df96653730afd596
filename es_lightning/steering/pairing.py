"""Step 2 of ExpertSteer, the rule: which (expert layer, target layer) pairs to intervene on.

Four rules (``PairingRule.rule``):

- ``highest``: highest held-out MI between mapped expert states and target states (ours, measured in the README);
- ``lowest``: lowest held-out MI (the paper's criterion as secondary sources report it);
- ``separability``: where the mapped expert direction best separates held-out rows by label, ROC AUC (ours);
- ``depth``: no statistics at all: expert layers spread evenly over ``depth_window`` (default the middle fifth,
  relative depth 0.4-0.6), each with the target layer at the same relative depth. The baseline of every comparison.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch

Rule = Literal["highest", "lowest", "separability", "depth"]
RULES: tuple[str, ...] = get_args(Rule)
DEFAULT_DEPTH_WINDOW = (0.4, 0.6)


@dataclass
class PairingRule:
    """How pairs are picked. ``top_k``: number of pairs. ``one_target_per_expert``: each expert layer is used at
    most once (each target layer always is). ``depth_window``: keep only target layers whose relative depth
    ``j / (depth - 1)`` lies in ``[low, high]`` (for ``depth``: where its expert layers are spread)."""

    rule: Rule
    top_k: int = 3
    one_target_per_expert: bool = True
    depth_window: tuple[float, float] | None = None

    def validate(self) -> None:
        """Refuse a bad rule before any work starts."""
        if self.rule not in RULES:
            raise ValueError(f"Unknown pairing rule {self.rule!r}: use one of {list(RULES)}.")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {self.top_k!r}.")
        if self.depth_window is not None:
            low, high = self.depth_window
            if not 0 <= low <= high <= 1:
                raise ValueError(
                    f"depth_window {tuple(self.depth_window)} must satisfy 0 <= low <= high <= 1 (relative depths)."
                )

    def check_fits(self, n_expert: int, n_target: int) -> None:
        """Refuse ``top_k`` larger than the number of pairs the captured layers allow."""
        possible = min(n_target, n_expert if self.one_target_per_expert else n_target)
        if self.top_k > possible:
            raise ValueError(
                f"top_k={self.top_k} but only {possible} distinct pairs exist with {n_expert} expert and "
                f"{n_target} target layers captured"
                f"{' (one target per expert layer)' if self.one_target_per_expert else ''}. Lower top_k or "
                "capture more layers."
            )


def relative_depth(layer: int, depth: int) -> float:
    """Position of a block in ``[0, 1]``."""
    return layer / max(depth - 1, 1)


def depth_partner(layer: int, expert_depth: int, target_layers: Sequence[int], target_depth: int) -> int:
    """The captured target layer nearest to the expert layer's relative depth."""
    wanted = relative_depth(layer, expert_depth) * (target_depth - 1)
    return min(target_layers, key=lambda t: (abs(t - wanted), t))


def depth_pairs(
    expert_layers: Sequence[int], target_layers: Sequence[int], expert_depth: int, target_depth: int, rule: PairingRule
) -> list[tuple[int, int]]:
    """The ``depth`` rule: ``top_k`` expert layers evenly over the window, each with its same-depth target layer."""
    low, high = rule.depth_window or DEFAULT_DEPTH_WINDOW
    k = rule.top_k
    wanted = [low + (high - low) * (n + 0.5) / k for n in range(k)] if k > 1 else [(low + high) / 2]
    chosen: list[int] = []
    for w in wanted:
        free = [e for e in expert_layers if e not in chosen] or list(expert_layers)
        chosen.append(min(free, key=lambda e: (abs(relative_depth(e, expert_depth) - w), e)))
    pairs, used = [], set()
    for e in chosen:
        options = [t for t in target_layers if t not in used] or list(target_layers)
        t = depth_partner(e, expert_depth, options, target_depth)
        used.add(t)
        pairs.append((e, t))
    return sorted(pairs, key=lambda p: p[1])


def select_pairs(
    scores: torch.Tensor,
    expert_layers: Sequence[int],
    target_layers: Sequence[int],
    target_depth: int,
    rule: PairingRule,
    highest: bool | None = None,
) -> list[tuple[int, int]]:
    """Pairs chosen greedily by ``scores`` [L_E, L_T], highest first (lowest first for the ``lowest`` rule, or as
    ``highest`` says); every target layer appears at most once."""
    rule.validate()
    highest = rule.rule != "lowest" if highest is None else highest
    if tuple(scores.shape) != (len(expert_layers), len(target_layers)):
        raise ValueError(
            f"Score matrix shape {tuple(scores.shape)} does not match "
            f"{len(expert_layers)} expert x {len(target_layers)} target layers."
        )
    allowed = list(range(len(target_layers)))
    if rule.depth_window is not None:
        low, high = rule.depth_window
        allowed = [k for k, layer in enumerate(target_layers) if low <= relative_depth(layer, target_depth) <= high]
        if not allowed:
            raise ValueError(
                f"No captured target layer lies in depth_window {rule.depth_window}; widen it or capture more layers."
            )
    candidates = [(float(scores[i, k]), i, k) for i in range(len(expert_layers)) for k in allowed]
    candidates.sort(key=lambda c: (-c[0] if highest else c[0], c[1], c[2]))
    used_experts, used_targets, pairs = set(), set(), []
    for _, i, k in candidates:
        if k in used_targets or (rule.one_target_per_expert and i in used_experts):
            continue
        pairs.append((expert_layers[i], target_layers[k]))
        used_experts.add(i)
        used_targets.add(k)
        if len(pairs) == rule.top_k:
            break
    return sorted(pairs, key=lambda p: p[1])


def choose_pairs(
    rule: PairingRule,
    expert_layers: Sequence[int],
    target_layers: Sequence[int],
    expert_depth: int,
    target_depth: int,
    mi: torch.Tensor | None = None,
    auc: torch.Tensor | None = None,
) -> list[tuple[int, int]]:
    """The one place a rule picks pairs, for the fit and every evaluation fold, either objective: ``depth`` from the
    layers alone, ``separability`` by held-out ROC AUC ``[L_E, L_T]``, ``highest``/``lowest`` by held-out MI."""
    if rule.rule == "depth":
        return depth_pairs(expert_layers, target_layers, expert_depth, target_depth, rule)
    scores = auc if rule.rule == "separability" else mi
    if scores is None and rule.rule == "separability":
        raise ValueError(
            "The separability rule needs 0/1 labels on the fit and held-out rows; use rule: highest for "
            "unlabelled data."
        )
    if scores is None:
        raise ValueError(f"The {rule.rule} rule needs held-out MI scores, and none were computed.")
    return select_pairs(scores, expert_layers, target_layers, target_depth, rule, highest=rule.rule != "lowest")
