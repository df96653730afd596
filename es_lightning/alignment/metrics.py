"""The auto-encoders' validation metrics, per trained expert layer."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn
from torchmetrics import CosineSimilarity, ExplainedVariance, MeanMetric, MeanSquaredError, Metric


class AlignmentMetrics(nn.Module):
    """Per trained layer: the reconstruction's MSE and explained variance and, for the paired objective, the cosine
    between the code and its target layer's (standardised) states; plus the mean validation loss."""

    def __init__(self, n_layers: int, paired: bool):
        super().__init__()
        self.paired = paired
        self.mse = nn.ModuleList(MeanSquaredError() for _ in range(n_layers))
        self.explained_variance = nn.ModuleList(
            ExplainedVariance(multioutput="variance_weighted") for _ in range(n_layers)
        )
        self.pair_cosine = nn.ModuleList(CosineSimilarity(reduction="mean") for _ in range(n_layers))
        self.loss = MeanMetric()

    def names(self) -> list[str]:
        """The per-layer metrics this objective reports."""
        return ["mse", "explained_variance"] + (["pair_cosine"] if self.paired else [])

    def _metric(self, name: str, layer: int) -> Metric:
        return cast(Metric, getattr(self, name)[layer])

    def update(self, out: dict[str, torch.Tensor], rows: int) -> None:
        """Add one batch's outputs of :meth:`AlignmentMaps.losses` (``rows`` rows)."""
        self.loss.update(out["total"], weight=rows)
        for k in range(out["xs"].shape[1]):
            recon, original = out["recon_x"][:, k].contiguous(), out["xs"][:, k].contiguous()
            self._metric("mse", k).update(recon, original)
            self._metric("explained_variance", k).update(recon, original)
            if self.paired:
                self._metric("pair_cosine", k).update(
                    out["code"][:, k].contiguous(), out["paired_target"][:, k].contiguous()
                )

    def compute(self) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """The mean loss and each metric per layer since the last call; every metric is reset."""
        loss = self.loss.compute()
        self.loss.reset()
        values: dict[str, list[torch.Tensor]] = {}
        for name in self.names():
            metrics = [self._metric(name, k) for k in range(len(self.mse))]
            values[name] = [metric.compute() for metric in metrics]
            for metric in metrics:
                metric.reset()
        return loss, values
