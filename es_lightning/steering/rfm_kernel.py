"""The RFM's kernel ridge solve: xrfm's ``RFM`` with a Cholesky solve that warns and raises the ridge instead of
retrying silently (see :mod:`es_lightning.steering.rfm`), and the size of one kernel matrix."""

from __future__ import annotations

import warnings

import torch
from xrfm.rfm_src import RFM

KERNEL = "l2_high_dim"
_MAX_RIDGE_RAISES = 6
_RIDGE_FACTOR = 10.0


def _ridge_solve(kernel: torch.Tensor, targets: torch.Tensor, reg: float) -> tuple[torch.Tensor, float]:
    """``(K + reg·I)⁻¹ targets`` by Cholesky, raising the ridge (with a warning) until the solve is sound.

    ``kernel`` is overwritten. Returns the solution and the ridge actually used.
    """
    eps = torch.finfo(kernel.dtype).eps
    scale = float(kernel.diagonal().abs().mean())
    kernel.diagonal().add_(reg)
    current = reg
    for _ in range(_MAX_RIDGE_RAISES + 1):
        factor, info = torch.linalg.cholesky_ex(kernel)
        if int(info) == 0:
            pivots = factor.diagonal()
            if float((pivots.min() / pivots.max()) ** 2) > 100 * eps:
                alpha = torch.cholesky_solve(targets, factor)
                if torch.isfinite(alpha).all():
                    return alpha, current
        raised = max(current * _RIDGE_FACTOR, 1e-4 * scale)
        warnings.warn(
            f"Kernel ridge solve with reg={current:.3g} is ill-conditioned or failed (duplicate or near-duplicate "
            f"rows in X?); retrying with reg={raised:.3g}. Pass larger values in regs to avoid this.",
            RuntimeWarning,
            stacklevel=2,
        )
        kernel.diagonal().add_(raised - current)
        current = raised
    raise RuntimeError(
        f"Kernel ridge solve still fails with reg={current:.3g}; check X for NaN-like or constant rows, "
        "or pass larger values in regs."
    )


class _RFM(RFM):
    """xrfm's RFM whose direct solver is :func:`_ridge_solve` (warns and raises the ridge, never silent)."""

    reg: float  # set by xrfm's __init__

    def fit_predictor_lstsq(self, centers: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        centers, targets = centers.to(self.device), targets.to(self.device)
        alpha, self.reg = _ridge_solve(self.kernel(centers, centers), targets, self.reg)
        return alpha


def kernel_bytes(n_train: int) -> int:
    """Bytes of one n_train x n_train float32 kernel matrix."""
    return 4 * n_train * n_train
