"""SteeringVectorCallback: when fitting ends, compute steering vectors for the chosen pairs and write bundles."""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
import torch

from es_lightning.callbacks.common import WhenTrainingEnds, on_rank_zero, resave_last_checkpoint, run_dir
from es_lightning.steering.bundle import ModelIdentity, SteeringBundle, save_bundles
from es_lightning.steering.vectors import METHODS, VectorInputs, compute_vectors, layer_norms

log = logging.getLogger(__name__)


def bundles_for(pl_module, datamodule, methods, rfm_options, seed) -> list[SteeringBundle]:
    """One bundle per method for the pairs stored by :class:`LayerPairingCallback` in ``pl_module``."""
    pairing = pl_module.extra.get("pairing")
    if not pairing or not pairing.get("pairs"):
        raise RuntimeError(
            "No layer pairs found: add LayerPairingCallback before SteeringVectorCallback in trainer.callbacks."
        )
    pairs = [tuple(p) for p in pairing["pairs"]]
    layout = pl_module.layout
    for i, j in pairs:
        if i not in layout.expert_layers or j not in layout.target_layers:
            raise ValueError(f"Pair {(i, j)} is not among the cached layers; the pairing and the cache disagree.")
    states = datamodule.split("train")
    inputs = VectorInputs(
        expert=states["expert"], target=states["target"], labels=states["label"],
        expert_layers=layout.expert_layers, target_layers=layout.target_layers,
        encoder_linear=lambda i: pl_module.encoder_linear(i).cpu(), rfm_options=dict(rfm_options), seed=seed,
    )
    norms = layer_norms(states["target"], layout.target_layers, [j for _, j in pairs])
    target = ModelIdentity(layout.target.name, layout.target.fingerprint, layout.target.model_type)
    expert = ModelIdentity(layout.expert.name, layout.expert.fingerprint, layout.expert.model_type)
    bundles = []
    for method in methods:
        start = time.perf_counter()
        result = compute_vectors(method, pairs, inputs)
        bundles.append(SteeringBundle(
            method=method, vectors=result.vectors, norms=norms, target=target, expert=expert,
            layer_pairs=pairs if method == "expertsteer" else [], mi=torch.tensor(pairing["mi"]),
            mi_expert_layers=pairing["expert_layers"], mi_target_layers=pairing["target_layers"],
            data_key=pl_module.cache_keys.get("data", ""), cache_key=pl_module.cache_keys.get("alignment", pl_module.cache_keys.get("data", "")),
            extra={"diagnostics": {str(k): v for k, v in result.diagnostics.items()}, "objective": pl_module.objective,
                   "pairs": [list(p) for p in pairs], "split": "train", "seconds": round(time.perf_counter() - start, 3)},
        ))
        log.warning("Steering vectors: %s for target layers %s (%.1f s)", method, sorted(result.vectors), time.perf_counter() - start)
    return bundles


class SteeringVectorCallback(WhenTrainingEnds):
    """For every chosen pair (i, j), a unit vector for target layer j per method; bundles go to ``<run>/bundles/``.

    Methods: ``expertsteer`` (RFM on expert states, mapped by the encoder's linear part), ``rfm_self``,
    ``mean_difference`` and ``random``. Vectors are unit norm, stored with the mean hidden-state norm of
    their target layer. Runs on rank 0 when training ends; paths are recorded in ``last.ckpt``.
    """

    def __init__(self, methods: list[str] | None = None, rfm_options: dict[str, Any] | None = None, seed: int = 0):
        super().__init__()
        self.methods = list(methods or METHODS)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"Unknown steering-vector methods {unknown}: use some of {list(METHODS)}.")
        self.rfm_options = dict(rfm_options or {})
        self.seed = seed

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._ran = True
        def compute() -> dict[str, str]:
            bundles = bundles_for(pl_module, trainer.datamodule, self.methods, self.rfm_options, self.seed)
            saved = save_bundles(run_dir(trainer) / "bundles", bundles)
            log.warning("Steering bundles written to %s", run_dir(trainer) / "bundles")
            return {method: str(path.resolve()) for method, path in saved.items()}

        pl_module.extra["bundles"] = on_rank_zero(trainer, compute)
        resave_last_checkpoint(trainer)
