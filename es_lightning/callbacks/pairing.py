"""LayerPairingCallback: when fitting ends, MI between encoded expert layers and target layers picks pairs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch

from es_lightning.callbacks.common import WhenTrainingEnds, on_rank_zero, resave_last_checkpoint, run_dir
from es_lightning.io import atomic_write_json, atomic_write_with
from es_lightning.steering.mi import mi_matrix
from es_lightning.steering.pairing import PairingRule, select_pairs

log = logging.getLogger(__name__)


def plot_mi_heatmap(mi: torch.Tensor, expert_layers, target_layers, pairs, path: Path, title: str) -> None:
    """Heatmap PNG of the MI matrix with the chosen pairs circled (atomic write)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4, 0.3 * len(target_layers) + 2), max(3, 0.3 * len(expert_layers) + 1.5)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(mi.numpy(), aspect="auto", cmap="viridis", origin="lower")
    fig.colorbar(image, ax=ax, label="MI (nats)")
    ax.set_xticks(range(len(target_layers)), [str(t) for t in target_layers], fontsize=6)
    ax.set_yticks(range(len(expert_layers)), [str(e) for e in expert_layers], fontsize=6)
    ax.set_xlabel("target layer")
    ax.set_ylabel("expert layer")
    for e, t in pairs:
        ax.scatter([list(target_layers).index(t)], [list(expert_layers).index(e)], s=80, facecolors="none", edgecolors="red", linewidths=1.5)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


class LayerPairingCallback(WhenTrainingEnds):
    """Compute the MI matrix [L_E, L_T] between f_i(h_E,i) and h_T,j on the train split and choose pairs.

    Runs on rank 0 when training ends and broadcasts the result. Stores the matrix and pairs in the
    module (hence in ``last.ckpt``), as ``pairing.json`` and as ``mi_heatmap.png`` in the run folder.
    ``max_samples`` caps the rows used (a seeded subsample) to bound the cost.
    """

    def __init__(
        self,
        method: Literal["gaussian", "ksg"] = "gaussian",
        rule: Literal["lowest", "highest"] = "highest",
        top_k: int = 3,
        one_target_per_expert: bool = True,
        depth_window: tuple[float, float] | None = None,
        mi_options: dict[str, Any] | None = None,
        max_samples: int | None = 4000,
        seed: int = 0,
    ):
        super().__init__()
        self.method = method
        self.rule = PairingRule(rule, top_k, one_target_per_expert, tuple(depth_window) if depth_window else None)
        self.mi_options = dict(mi_options or {})
        self.max_samples = max_samples
        self.seed = seed
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}.")

    @torch.no_grad()
    def compute(self, pl_module, datamodule) -> dict[str, Any]:
        """The MI matrix and pairs for the module's encoders on the DataModule's train split."""
        train = datamodule.split("train")
        n = train["expert"].shape[0]
        rows = torch.arange(n)
        if self.max_samples and n > self.max_samples:
            rows = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))[: self.max_samples]
        expert = train["expert"][rows].to(pl_module.device)
        target = train["target"][rows].to(pl_module.device)
        xs, ys = pl_module.standardise(expert, target)
        encoded = pl_module.encode(xs).cpu()
        layout = pl_module.layout
        mi = mi_matrix(encoded, ys.cpu(), method=self.method, **{"seed": self.seed, **self.mi_options}).float()
        pairs = select_pairs(mi, layout.expert_layers, layout.target_layers, layout.target.num_layers, self.rule)
        return {
            "mi": mi.tolist(), "expert_layers": layout.expert_layers, "target_layers": layout.target_layers,
            "pairs": [list(p) for p in pairs], "method": self.method, "rule": self.rule.rule, "top_k": self.rule.top_k,
            "n_samples": len(rows),
        }

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._ran = True
        log.warning("Pairing layers: %s MI between %d encoded expert and %d target layers ...",
                    self.method, len(pl_module.layout.expert_layers), len(pl_module.layout.target_layers))
        result = on_rank_zero(trainer, lambda: self.compute(pl_module, trainer.datamodule))
        pl_module.extra["pairing"] = result
        if trainer.is_global_zero:
            folder = run_dir(trainer)
            atomic_write_json(folder / "pairing.json", result)
            plot_mi_heatmap(torch.tensor(result["mi"]), result["expert_layers"], result["target_layers"], result["pairs"],
                            folder / "mi_heatmap.png", f"{self.method} MI, {self.rule.rule} top-{self.rule.top_k}: {result['pairs']}")
            log.warning("Layer pairs (expert, target): %s -> %s", result["pairs"], folder / "pairing.json")
        resave_last_checkpoint(trainer)
