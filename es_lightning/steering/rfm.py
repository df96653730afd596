"""Recursive Feature Machine (RFM) concept directions, built on ``xrfm``'s ``RFM`` class.

The predictor is kernel ridge regression with the Laplace kernel in a learned Mahalanobis metric,
``K(x, z) = exp(-||x - z||_M / L)``, ``α = (K + λI)⁻¹ y``. Starting from ``M = I``, each of ``iters``
rounds refits the predictor and replaces ``M`` by its average gradient outer product (AGOP) over the
training points, scaled so its largest entry is 1. The concept direction is the top eigenvector of the
AGOP of the final predictor.

What comes from xrfm 0.4.5 (``xrfm.rfm_src.RFM``): the kernel ``"l2_high_dim"`` (``LightLaplaceKernel``:
the Laplace kernel with a full Mahalanobis matrix ``M``, computed as ``x'Mx - 2x'Mz + z'Mz``; the
``"l2"`` kernel is the same function but needs a matrix square root of ``M`` every round, about 3x
slower at d=896), the RFM loop (``RFM.fit``), the AGOP (``RFM.fit_M(..., inplace=False)``) and
``bandwidth_mode="adaptive"``, which sets ``L = bandwidth * median pairwise ||x - z||_M`` on the
training points each round, so a single bandwidth grid works for every width and every round.

What this module adds: input checks, optional per-feature standardisation, the train/validation split
(by whole groups, e.g. questions, when ``groups`` is given; else stratified by label), the (bandwidth,
ridge) grid search (on a training subsample when the data are
large, then one refit on the whole training part), the mapping of the AGOP back to the original
coordinates, the direction and its sign, and a ridge solve that warns. The one xrfm method replaced is
``fit_predictor_lstsq``: xrfm retries a failed solve silently (only a ``print`` when verbose), and never
checks conditioning; here a Cholesky solve that fails or is ill-conditioned raises a ``RuntimeWarning``
and is retried with a 10x larger ridge.

Standardisation (``standardize=True``): the kernel sees ``s = (x - μ) / σ`` per feature. By the chain
rule ``∇_x f = D⁻¹ ∇_s f`` with ``D = diag(σ)``, so the AGOP in the original coordinates is
``D⁻¹ M_s D⁻¹``; ``RFMResult.agop`` and ``RFMResult.direction`` are always in the original coordinates
of ``X`` (a feature with tiny σ gets a large weight there, because a unit step along it is many
standard deviations).

Memory and device: the kernel matrix of the final refit is n_train x n_train float32 (n_train^2 x 4 bytes, about
three such matrices alive at once: distances, kernel, gradient weights), so rows beyond ``max_rows`` (default
10,000: 8,000 training rows, 0.24 GiB per matrix) are dropped first by a seeded subsample of whole groups. The fit
runs on ``device`` (callers pass the trainer's root device; default: the device of ``X``) in float32 whatever the
model dtype: a Cholesky solve of the kernel in half precision is unsound. The d x d matrices do not shrink with the
rows: about four float32 ones on ``device`` (the Mahalanobis matrices of two live models, the AGOP being summed, its
scaled copy), and at the end, on the host in float64, the AGOP mapped back to the original coordinates, its rescaled
copy and its eigendecomposition (about five d x d float64 matrices with eigh's workspace: 0.6 GiB at d = 4096), all
counted by :func:`es_lightning.memory.rfm_estimate`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from xrfm.rfm_src import RFM

from es_lightning.steering.rfm_kernel import _RFM, KERNEL, kernel_bytes
from es_lightning.steering.rfm_kernel import _ridge_solve as _ridge_solve  # re-exported: tests import it from here
from es_lightning.steering.rfm_rows import _check_class_counts, _check_labels, _Labels, _Split, _split_rows, cap_rows

log = logging.getLogger(__name__)


@dataclass
class RFMResult:
    """A fitted RFM: its AGOP and top direction (original coordinates of X) and how it was chosen."""

    agop: torch.Tensor  # [d, d], float32, largest entry 1
    direction: torch.Tensor  # [d], unit norm, X @ direction correlates positively with the positive class
    bandwidth: float  # absolute kernel bandwidth L of the final predictor (in the standardised space if standardize)
    bandwidth_scale: float  # the grid value: L as a multiple of the median pairwise Mahalanobis distance
    reg: float  # ridge λ actually used (larger than the grid value if the solve had to be regularised)
    val_score: float  # held-out AUC (binary) or accuracy (one-hot) of the final predictor; the same held-out part
    # picked the grid point, so this is slightly optimistic (random labels: about 0.55 AUC at n=600)
    metric: str  # "auc" or "accuracy"
    grid_scores: list[tuple[float, float, float]] = field(default_factory=list)  # (bandwidth_scale, reg, score)
    iters: int = 0  # AGOP updates of M, starting from M = I
    top_fraction: float = 0.0  # top AGOP eigenvalue / AGOP trace: how one-dimensional the learned feature is
    n_train: int = 0
    n_val: int = 0
    n_grid_train: int = 0  # training points used in the grid search
    n_input: int = 0  # rows given; more than n_train + n_val when max_rows subsampled them
    fit_seconds: float = 0.0  # wall time of the whole fit_rfm call


def _score(model: RFM, x_val: torch.Tensor, labels: _Labels, val_idx: np.ndarray) -> float:
    pred = model.predict(x_val).detach().cpu().double().numpy()
    if labels.metric == "auc":
        return float(roc_auc_score(labels.classes[val_idx], pred[:, 0]))
    return float((pred.argmax(axis=1) == labels.classes[val_idx]).mean())


def _fit_one(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    bandwidth_scale: float,
    reg: float,
    iters: int,
    device: torch.device,
) -> _RFM:
    model = _RFM(
        kernel=KERNEL, bandwidth=bandwidth_scale, bandwidth_mode="adaptive", device=device, verbose=False, diag=False
    )
    model.fit(
        (x_train, y_train),
        (x_val, y_val),
        iters=iters,
        method="lstsq",
        reg=reg,
        verbose=False,
        early_stop_rfm=False,
        return_best_params=False,
        tuning_metric="mse",
    )
    return model


def _check_options(
    x_shape: tuple[int, ...],
    iters: int,
    bandwidths: Sequence[float],
    regs: Sequence[float],
    val_fraction: float,
    grid_max_train: int,
) -> None:
    if len(x_shape) != 2 or x_shape[0] < 1 or x_shape[1] < 1:
        raise ValueError(f"X must have shape [n, d] with n, d >= 1, got {x_shape}; stack the examples as rows.")
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be a positive integer, got {iters!r}; pass e.g. iters=3.")
    if not bandwidths or any(not b > 0 for b in bandwidths):
        raise ValueError(f"bandwidths must be a non-empty list of positive numbers, got {bandwidths!r}.")
    if not regs or any(not r >= 0 for r in regs):
        raise ValueError(f"regs must be a non-empty list of non-negative numbers, got {regs!r}.")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction!r}; pass e.g. val_fraction=0.2.")
    if grid_max_train < 2:
        raise ValueError(f"grid_max_train must be at least 2, got {grid_max_train!r}.")


def fit_rfm(
    X: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    *,
    iters: int = 3,
    bandwidths: Sequence[float] = (1.0, 4.0),
    regs: Sequence[float] = (1e-3, 1e-1, 1.0),
    val_fraction: float = 0.2,
    grid_max_train: int = 1000,
    standardize: bool = True,
    positive_class: int = 1,
    seed: int = 0,
    device: str | torch.device | None = None,
    groups: Sequence | None = None,
    max_rows: int | None = 10_000,
) -> RFMResult:
    """Fit an RFM classifier on ``X`` [n, d] and labels ``y`` ([n] 0/1 or [n, c] one-hot): its AGOP and direction.

    ``bandwidths`` are multiples of the median pairwise Mahalanobis distance of the training points
    (re-measured each round); ``regs`` are ridges λ (the Laplace kernel matrix has unit diagonal). Every
    (bandwidth, reg) pair is fitted on at most ``grid_max_train`` stratified training points and scored
    on the held-out ``val_fraction`` of the data (AUC for binary y, accuracy for one-hot y); the best
    pair is refitted on the whole training part when the grid used a subsample. ``iters`` is the number
    of AGOP updates of M from M = I.

    Sign: the direction is flipped so that ``X @ direction`` correlates positively with membership of the
    positive class: label 1 for binary y, column ``positive_class`` (default 1) for one-hot y.
    ``seed`` fixes the split, the subsample and xrfm's internal sampling; the global torch RNG is untouched.
    ``groups`` (one key per row, e.g. the question): the validation split takes whole groups, so rows of one
    question never fall on both sides; without groups it is stratified by label over rows.

    ``max_rows`` (default 10,000; None: no cap): above it, a seeded subsample of whole groups (of rows without
    ``groups``) is fitted, and an INFO line says so. The kernel takes n_train^2 x 4 bytes per matrix, about three
    at once. ``device``: where the kernels are computed, in float32; pass the trainer's root device
    (``trainer.strategy.root_device``); None: the device of ``X`` (cpu for arrays).
    """
    start = time.perf_counter()
    if device is None:
        device = X.device if isinstance(X, torch.Tensor) else "cpu"
    x_np = X.detach().cpu().double().numpy() if isinstance(X, torch.Tensor) else np.asarray(X, dtype=np.float64)
    _check_options(x_np.shape, iters, bandwidths, regs, val_fraction, grid_max_train)
    n_input = x_np.shape[0]
    x_np, labels, groups = _checked_rows(x_np, y, positive_class, groups, max_rows, val_fraction, seed)
    x_all, std = _standardised(x_np, standardize)
    split = _split_rows(labels.classes, groups, val_fraction, grid_max_train, seed)
    x_val = x_all[split.val]
    fitted = _fit_best(x_all, labels, split, bandwidths, regs, iters, torch.device(device), seed)
    return _result(fitted, std, x_np, labels, split, x_val, iters, n_input, start)


def _result(
    fitted: _GridFit,
    std: np.ndarray,
    x_np: np.ndarray,
    labels: _Labels,
    split: _Split,
    x_val: torch.Tensor,
    iters: int,
    n_input: int,
    start: float,
) -> RFMResult:
    """The chosen model's AGOP and direction in the original coordinates of ``x_np``, its held-out score, how it
    was chosen, and the time since ``start``."""
    agop, eigenvalues, direction = _agop_direction(fitted.agop_std, std, x_np, labels.positive)
    return RFMResult(
        agop=agop.float(),
        direction=direction.float(),
        bandwidth=float(fitted.model.kernel_obj.bandwidth),
        bandwidth_scale=fitted.best[0],
        reg=float(fitted.model.reg),
        val_score=_score(fitted.model, x_val, labels, split.val),
        metric=labels.metric,
        grid_scores=fitted.scores,
        iters=iters,
        top_fraction=float(eigenvalues[-1] / eigenvalues.clamp(min=0).sum()),
        n_train=len(split.train),
        n_val=len(split.val),
        n_grid_train=len(split.grid),
        n_input=n_input,
        fit_seconds=time.perf_counter() - start,
    )


def _checked_rows(
    x_np: np.ndarray,
    y: torch.Tensor | np.ndarray,
    positive_class: int,
    groups: Sequence | None,
    max_rows: int | None,
    val_fraction: float,
    seed: int,
) -> tuple[np.ndarray, _Labels, Sequence | None]:
    """The checked rows, labels and groups, capped at ``max_rows`` (see :func:`_capped`); clear errors for bad input."""
    if max_rows is not None and max_rows < 10:
        raise ValueError(f"max_rows must be at least 10 or None (no cap), got {max_rows!r}; the default is 10000.")
    n_input = x_np.shape[0]
    if not np.isfinite(x_np).all():
        raise ValueError("X contains NaN or Inf values; drop or impute those rows before fitting the RFM.")
    labels = _check_labels(y, n_input, positive_class)
    if groups is not None and len(groups) != n_input:
        raise ValueError(f"groups must hold one key per row of X ({n_input}), got {len(groups)}.")
    if max_rows is not None and n_input > max_rows:
        x_np, labels, groups = _capped(x_np, labels, groups, max_rows, val_fraction, seed)
    _check_class_counts(labels.classes, labels.targets.shape[1] if labels.metric == "accuracy" else 2)
    return x_np, labels, groups


def _capped(
    x_np: np.ndarray, labels: _Labels, groups: Sequence | None, max_rows: int, val_fraction: float, seed: int
) -> tuple[np.ndarray, _Labels, list | None]:
    """The rows of :func:`cap_rows`'s seeded subsample of whole groups (of rows without ``groups``), said at INFO."""
    n_input = len(x_np)
    kept = cap_rows(list(groups) if groups is not None else range(n_input), max_rows, seed)
    if not len(kept):
        raise ValueError(f"Every group has more than max_rows={max_rows} rows; raise max_rows.")
    n_train = len(kept) - round(val_fraction * len(kept))
    log.info(
        "RFM on a seeded %d of %d rows (whole %s; max_rows=%d): its n_train^2 float32 kernel takes %.2f GiB "
        "per matrix at n_train~%d, about 3 alive at once.",
        len(kept),
        n_input,
        "questions" if groups is not None else "rows",
        max_rows,
        kernel_bytes(n_train) / 2**30,
        n_train,
    )
    return x_np[kept], labels.take(kept), [groups[r] for r in kept] if groups is not None else None


def _standardised(x_np: np.ndarray, standardize: bool) -> tuple[torch.Tensor, np.ndarray]:
    """``(x - mean) / std`` per feature as float32 (std 1 without ``standardize``, and for constant features), and
    the std."""
    mean = x_np.mean(axis=0)
    std = x_np.std(axis=0) if standardize else np.ones(x_np.shape[1])
    std = np.where(std > 0, std, 1.0)
    return torch.from_numpy((x_np - mean) / std).float(), std


class _GridFit(NamedTuple):
    """What the grid search chose: every grid point's (bandwidth, reg, score), the best of them, its model, and
    that model's AGOP in the standardised coordinates."""

    scores: list[tuple[float, float, float]]
    best: tuple[float, float, float]
    model: _RFM
    agop_std: torch.Tensor


def _fit_best(
    x_all: torch.Tensor,
    labels: _Labels,
    split: _Split,
    bandwidths: Sequence[float],
    regs: Sequence[float],
    iters: int,
    device: torch.device,
    seed: int,
) -> _GridFit:
    """The grid's scores, its best (bandwidth, reg, score), that model (refitted on the whole training part when the
    grid used a subsample) and its AGOP in the standardised coordinates; seeded, the global torch RNG untouched."""
    x_val, y_val = x_all[split.val], labels.targets[split.val]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        grid_scores: list[tuple[float, float, float]] = []
        best, best_model = None, None
        for bandwidth_scale in bandwidths:
            for reg in regs:
                model = _fit_one(
                    x_all[split.grid], labels.targets[split.grid], x_val, y_val, bandwidth_scale, reg, iters, device
                )
                score = _score(model, x_val, labels, split.val)
                grid_scores.append((float(bandwidth_scale), float(reg), score))
                if best is None or score > best[2]:
                    best, best_model = grid_scores[-1], model
        assert best is not None and best_model is not None  # _check_options: bandwidths and regs are non-empty
        if len(split.grid) < len(split.train):
            best_model = _fit_one(
                x_all[split.train], labels.targets[split.train], x_val, y_val, best[0], best[1], iters, device
            )
        x_train = x_all[split.train].to(device)
        agop_std = best_model.fit_M(x_train, best_model.n_classes, inplace=False).detach().cpu().double()
    return _GridFit(grid_scores, best, best_model, agop_std)


def _agop_direction(
    agop_std: torch.Tensor, std: np.ndarray, x_np: np.ndarray, positive: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The AGOP mapped back to the original coordinates and scaled to a largest entry of 1, its eigenvalues, and its
    top eigenvector, signed so that ``x_np @ direction`` correlates positively with ``positive``."""
    inv_std = torch.from_numpy(1.0 / std)
    agop = agop_std * inv_std[:, None] * inv_std[None, :]
    agop = agop / agop.abs().max()
    eigenvalues, eigenvectors = torch.linalg.eigh(agop)
    direction = eigenvectors[:, -1]
    projection = x_np @ direction.numpy()
    if np.corrcoef(projection, positive)[0, 1] < 0:
        direction = -direction
    return agop, eigenvalues, direction
