"""The pair search's low-level algebra: layers standardised and reduced to principal components on the fit
rows, closed-form ridge maps between them, and ROC AUCs (used by :mod:`es_lightning.steering.pair_search`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import rankdata

from es_lightning.steering.mi import symmetric_eigh


@dataclass
class _Layer:
    """One layer standardised and reduced on the fit rows."""

    basis: np.ndarray  # [d, p] principal directions
    singular: np.ndarray  # [p]
    fit: np.ndarray  # [n_fit, p] scores
    heldout: np.ndarray  # [n_heldout, p] scores
    total_ss: float  # total sum of squares of the standardised fit rows (all directions)
    width: int


def _reduce(fit: np.ndarray, heldout: np.ndarray, max_components: int) -> _Layer:
    """Standardise and project one layer; only the top ``p`` directions are ever formed at full width (d x p)."""
    mean = fit.mean(0)
    centred = fit - mean
    scale = math.sqrt(float((centred**2).sum(1).mean()) / fit.shape[1]) or 1.0
    centred /= scale
    n, d = centred.shape
    # the d x d covariance, or the n x n Gram matrix when there are fewer rows than features
    values, vectors = symmetric_eigh(centred.T @ centred if d <= n else centred @ centred.T)
    order = np.argsort(values)[::-1]
    s = np.sqrt(np.clip(values[order], 0.0, None))
    keep = s > 1e-6 * max(float(s[0]), 1e-30)
    p = min(int(keep.sum()), max_components)
    top = vectors[:, order[:p]]  # a copy: the full eigenvector matrix is freed on return
    basis = top if d <= n else centred.T @ top / np.where(s[:p] > 0, s[:p], 1.0)  # Gram: directions X^T u / s
    held = ((heldout - mean) / scale) @ basis
    return _Layer(basis, s[:p].copy(), centred @ basis, held, float((centred**2).sum()), d)


def _ridge_scale(layer: _Layer, ridge: float) -> float:
    return ridge * layer.total_ss / layer.width  # ridge x mean Gram diagonal, as in the auto-encoder's seed


def _aucs(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC AUC of each column of ``scores`` [n, k] for 0/1 ``labels`` (Mann-Whitney U from average ranks)."""
    positive = labels == 1
    n1, n0 = int(positive.sum()), int((~positive).sum())
    if n1 == 0 or n0 == 0:
        return np.full(scores.shape[1], 0.5)
    ranks = rankdata(scores, axis=0)
    return (ranks[positive].sum(0) - n1 * (n1 + 1) / 2) / (n1 * n0)


def _full_width_map(expert: _Layer, target: _Layer, ridge: float | None, d_t: int) -> torch.Tensor:
    """The ``[d_T, d_E]`` linear part of a map (ridge for ``paired``; ``ridge=None``: the top-``d_T`` PCA code)."""
    if ridge is not None:
        lam = _ridge_scale(expert, ridge)
        w = ((expert.singular / (expert.singular**2 + lam))[:, None] * expert.fit.T) @ target.fit
        return torch.from_numpy(target.basis @ w.T @ expert.basis.T).float()
    basis = np.zeros((d_t, expert.basis.shape[0]))
    rows = min(d_t, expert.basis.shape[1])
    basis[:rows] = expert.basis[:, :rows].T
    return torch.from_numpy(basis).float()
