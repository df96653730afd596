"""The pair search's numbers (used by :mod:`es_lightning.steering.pair_search`): the ridge chosen by grouped
cross-validation on the fit rows, and the held-out MI and ROC AUC of every (expert layer, target layer) pair."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from es_lightning.alignment.maps import Objective
from es_lightning.steering.mi import MIOptions, mi_of_components, symmetric_eigh, whitened
from es_lightning.steering.pair_layers import _aucs, _Layer, _ridge_scale
from es_lightning.steering.rows import PairedRows
from es_lightning.stopping import check_stop

if TYPE_CHECKING:
    from es_lightning.steering.pair_search import PairSearchConfig


def _choose_ridge(
    experts: list[_Layer], targets_for: list[_Layer], groups: Sequence[Hashable], config: PairSearchConfig
) -> tuple[float, dict[str, float]]:
    """The ridge with the lowest grouped-CV squared error of the same-depth maps, averaged over expert layers."""
    if len(config.ridges) == 1:
        return float(config.ridges[0]), {}
    unique = list(dict.fromkeys(groups))
    folds = min(config.ridge_folds, len(unique))
    order = np.random.default_rng(config.seed + 1).permutation(len(unique))
    fold_of = {unique[k]: n % folds for n, k in enumerate(order)}
    row_fold = np.array([fold_of[g] for g in groups])
    errors = {float(r): 0.0 for r in config.ridges}
    for expert, target in zip(experts, targets_for):
        for f in range(folds):
            train, test = row_fold != f, row_fold == f
            x, y = expert.fit[train], target.fit[train]
            xm, ym = x.mean(0), y.mean(0)
            xc, yc = x - xm, y - ym
            # [p, p]: ridge solutions for every lambda from one factorisation
            values, vectors = symmetric_eigh(xc.T @ xc)
            projected = vectors.T @ (xc.T @ yc)
            for r in config.ridges:
                lam = r * float((xc**2).sum()) / expert.width
                w = vectors @ (projected / (np.clip(values, 0.0, None) + lam)[:, None])
                residual = (expert.fit[test] - xm) @ w + ym - target.fit[test]
                errors[float(r)] += float((residual**2).sum())
    best = min(errors, key=lambda r: (errors[r], r))
    n = len(experts) * len(groups)
    return best, {f"{r:g}": e / n for r, e in errors.items()}


@dataclass
class _TargetSide:
    """Every target layer's reduced scores side by side: the fit rows concatenated ``[n_fit, sum p_T]`` with each
    layer's column ``bounds``, the held-out rows per layer, and (for the MI rules) their whitened components."""

    fit: np.ndarray
    bounds: np.ndarray
    heldout: list[np.ndarray]
    components: list[np.ndarray]


def _target_side(targets: list[_Layer], target_layers: Sequence[int], opts: MIOptions, need_mi: bool) -> _TargetSide:
    """The target layers gathered for scoring every expert layer against all of them at once."""
    components = (
        [whitened(t.heldout, opts, 1, f"target layer {j}") for t, j in zip(targets, target_layers)] if need_mi else []
    )
    widths = [t.fit.shape[1] for t in targets]
    bounds = np.cumsum([0] + widths)
    fit = np.concatenate([t.fit for t in targets], axis=1)  # [n_fit, sum p_T]
    return _TargetSide(fit, bounds, [t.heldout for t in targets], components)


def _paired_row(
    expert: _Layer,
    ridge: float,
    direction: np.ndarray | None,
    side: _TargetSide,
    labels_held: np.ndarray | None,
    opts: MIOptions | None,
    name: str,
    mi_row: np.ndarray,
) -> np.ndarray | None:
    """One expert layer's ridge maps onto every target layer at once, scored on the held-out rows: fills ``mi_row``
    (when ``opts`` is given, for the MI rules) and returns the AUC row (when ``direction`` is given)."""
    lam = _ridge_scale(expert, ridge)
    weights = (expert.singular / (expert.singular**2 + lam))[:, None]
    maps = (weights * expert.fit.T) @ side.fit  # [p_E, sum p_T]
    mapped_all = expert.heldout @ maps
    bounds, count = side.bounds, len(side.heldout)
    auc_row = None
    if direction is not None:
        mapped_direction = direction @ maps
        scores = np.stack([side.heldout[b] @ mapped_direction[bounds[b] : bounds[b + 1]] for b in range(count)], 1)
        auc_row = _aucs(labels_held, scores)  # type: ignore[arg-type]  # a direction comes with held-out labels
    if opts is not None:
        for b in range(count):
            mi_row[b] = mi_of_components(
                whitened(mapped_all[:, bounds[b] : bounds[b + 1]], opts, 0, name), side.components[b], opts
            )
    return auc_row


def _score_matrices(
    experts: list[_Layer],
    targets: list[_Layer],
    fit: PairedRows,
    heldout: PairedRows,
    expert_layers: Sequence[int],
    target_layers: Sequence[int],
    config: PairSearchConfig,
    objective: Objective,
    ridge: float | None,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Held-out MI ``[L_E, L_T]`` (None for the depth rule) and ROC AUC (None without two classes) of every pair."""
    labels_fit = None if fit.labels is None else fit.labels.numpy()
    labels_held = None if heldout.labels is None else heldout.labels.numpy()
    with_auc = labels_fit is not None and labels_held is not None and len(np.unique(labels_fit)) == 2
    opts = config.mi_estimator()
    need_mi = config.rule != "depth"
    side = _target_side(targets, target_layers, opts, need_mi)
    mi = np.zeros((len(experts), len(targets)))
    auc = np.full((len(experts), len(targets)), 0.5)
    d_t = fit.target.width
    raw_directions = np.zeros((d_t, len(experts)))  # reconstruction: each expert's direction, on raw target states
    for a, expert in enumerate(experts):
        check_stop()
        direction = None
        if with_auc:
            direction = expert.fit[labels_fit == 1].mean(0) - expert.fit[labels_fit == 0].mean(0)  # [p_E]
        if objective == "paired":
            assert ridge is not None  # chosen before for the paired objective
            name = f"mapped expert layer {expert_layers[a]}"
            auc_row = _paired_row(expert, ridge, direction, side, labels_held, opts if need_mi else None, name, mi[a])
            if auc_row is not None:
                auc[a] = auc_row
        else:
            code = expert.heldout[:, :d_t]
            if need_mi:
                mapped = whitened(code, opts, 0, f"encoded expert layer {expert_layers[a]}")
                for b in range(len(targets)):
                    mi[a, b] = mi_of_components(mapped, side.components[b], opts)
            if direction is not None:
                raw_directions[: min(d_t, len(direction)), a] = direction[:d_t]
    if objective == "reconstruction" and with_auc:
        for b in range(len(targets)):  # one raw held-out target layer at a time
            raw = heldout.target.layer(b).double().numpy()
            auc[:, b] = _aucs(labels_held, raw @ raw_directions)  # type: ignore[arg-type]  # with_auc: labels set
    return (mi if need_mi else None), (auc if with_auc else None)
