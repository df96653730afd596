"""Step 2 of ExpertSteer: choose (expert layer, target layer) intervention pairs from an MI matrix."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

Rule = Literal["lowest", "highest"]


@dataclass
class PairingRule:
    """How pairs are picked from the MI matrix.

    ``rule``: ``lowest`` MI (the paper's criterion as secondary sources report it: intervene where the
    representations differ most) or ``highest`` (ours, the default: with the default models the lowest-MI
    pairs join extreme layers, e.g. expert 17 -> target 0, whose mapped directions separate correct from wrong
    answers at chance, held-out AUC 0.55; the highest-MI pairs join middle layers, AUC 0.81; see
    ``benchmarks/measure_defaults.py``). ``top_k``: number of pairs. ``one_target_per_expert``:
    each expert layer is used at most once (each target layer always is). ``depth_window``: keep only
    target layers whose relative depth ``j / (depth - 1)`` lies in ``[low, high]``.
    """

    rule: Rule = "highest"
    top_k: int = 3
    one_target_per_expert: bool = True
    depth_window: tuple[float, float] | None = None


def select_pairs(
    mi: torch.Tensor, expert_layers: Sequence[int], target_layers: Sequence[int], target_depth: int, rule: PairingRule
) -> list[tuple[int, int]]:
    """Pairs ``(expert_layer, target_layer)`` chosen greedily by MI; every target layer appears at most once."""
    if rule.rule not in ("lowest", "highest"):
        raise ValueError(f"Unknown pairing rule {rule.rule!r}: use 'lowest' or 'highest'.")
    if rule.top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {rule.top_k}.")
    if tuple(mi.shape) != (len(expert_layers), len(target_layers)):
        raise ValueError(f"MI matrix shape {tuple(mi.shape)} does not match {len(expert_layers)} expert x {len(target_layers)} target layers.")
    allowed = list(range(len(target_layers)))
    if rule.depth_window is not None:
        low, high = rule.depth_window
        if not 0 <= low <= high <= 1:
            raise ValueError(f"depth_window {rule.depth_window} must satisfy 0 <= low <= high <= 1 (relative depths).")
        allowed = [k for k, layer in enumerate(target_layers) if low <= layer / max(target_depth - 1, 1) <= high]
        if not allowed:
            raise ValueError(f"No captured target layer lies in depth_window {rule.depth_window}; widen it or capture more layers.")
    candidates = [(float(mi[i, k]), i, k) for i in range(len(expert_layers)) for k in allowed]
    candidates.sort(key=lambda c: (c[0] if rule.rule == "lowest" else -c[0], c[1], c[2]))
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
