"""The auto-encoders' closed-form seed: standardisation statistics, then weights that already solve the objective
(ridge least squares toward the paired target layer, or PCA for reconstruction), before any gradient step."""

from __future__ import annotations

import torch


def ridge_solve(x: torch.Tensor, y: torch.Tensor, ridge: float) -> torch.Tensor:
    """Least-squares ``W`` with ``x @ W ≈ y`` (centred inputs), Tikhonov-regularised relative to the trace."""
    gram = x.T @ x
    scale = ridge * gram.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + scale * eye, x.T @ y)


def statistics(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and one scalar scale (root mean squared centred norm / sqrt(d)) of ``[n, d]`` states."""
    mean = states.mean(0)
    return mean, (states - mean).pow(2).sum(-1).mean().sqrt().clamp_min(1e-6) / states.shape[-1] ** 0.5


def seed_weights(
    x: torch.Tensor, target: torch.Tensor | None, target_width: int, ridge: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encoder ``[d_T, d_E]`` and bias ``[d_T]``, decoder ``[d_E, d_T]`` and bias ``[d_E]`` for standardised expert
    states ``x`` ``[n, d_E]``: the encoder maps onto the standardised ``target`` states ``[n, d_T]`` by ridge least
    squares (paired), or onto the top principal directions when ``target`` is None (reconstruction); the decoder
    is the ridge least-squares inverse of the codes."""
    x_mean = x.mean(0)
    xc = x - x_mean
    if target is not None:
        w = ridge_solve(xc, target - target.mean(0), ridge)  # [d_E, d_T]
        enc_w, enc_b = w.T, target.mean(0) - x_mean @ w
    else:
        _, _, vh = torch.linalg.svd(xc, full_matrices=False)
        enc_w = torch.zeros(target_width, x.shape[-1], dtype=x.dtype, device=x.device)
        rank = min(target_width, vh.shape[0])
        enc_w[:rank] = vh[:rank]
        enc_b = -(enc_w @ x_mean)
    code = x @ enc_w.T + enc_b
    code_mean = code.mean(0)
    dec = ridge_solve(code - code_mean, xc, ridge)  # [d_T, d_E]
    return enc_w, enc_b, dec.T, x_mean - code_mean @ dec
