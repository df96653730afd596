"""SteeringVectorCallback: when fitting ends, compute steering vectors for the chosen pairs and write bundles."""

from __future__ import annotations

import logging

import lightning as L
import torch

from es_lightning.callbacks.common import WhenTrainingEnds, on_rank_zero, resave_last_checkpoint, run_dir
from es_lightning.callbacks.steps import StepsModule, paired_data, steps_module
from es_lightning.data import PairedHiddenStatesDataModule
from es_lightning.steering.bundle import ModelIdentity, SteeringBundle, VectorProvenance, save_bundles
from es_lightning.steering.pair_search import PairSearch
from es_lightning.steering.vectors import VectorConfig, VectorInputs, compute_vector_set

log = logging.getLogger(__name__)


def _recorded_pairing(module: StepsModule) -> tuple[PairSearch, list[tuple[int, int]]]:
    """The pairing :class:`LayerPairingCallback` recorded in ``module`` and its (expert, target) pairs, checked
    against the cached layers."""
    pairing = module.pairing_result
    if pairing is None or not pairing.pairs:
        raise RuntimeError(
            "No layer pairs found: add LayerPairingCallback before SteeringVectorCallback in trainer.callbacks."
        )
    pairs = [(int(i), int(j)) for i, j in pairing.pairs]
    layout = module.alignment.built_layout
    for i, j in pairs:
        if i not in layout.expert_layers or j not in layout.target_layers:
            raise ValueError(f"Pair {(i, j)} is not among the cached layers; the pairing and the cache disagree.")
    return pairing, pairs


def _vector_inputs(
    module: StepsModule, datamodule: PairedHiddenStatesDataModule, config: VectorConfig, pairs: list[tuple[int, int]]
) -> VectorInputs:
    """The training split's states for only the layers in ``pairs``, with the encoder and the RFM settings."""
    expert_layers, target_layers = list(dict.fromkeys(i for i, _ in pairs)), list(dict.fromkeys(j for _, j in pairs))
    states = datamodule.states("train", expert_layers, target_layers)  # only the chosen pairs' layers
    return VectorInputs(
        expert=states["expert"],
        target=states["target"],
        labels=states["label"],
        expert_layers=expert_layers,
        target_layers=target_layers,
        encoder_linear=lambda i: module.alignment.encoder_linear(i).cpu(),
        rfm_options=config.rfm_options,
        seed=config.seed,
        groups=datamodule.split_groups("train"),
        device=module.device,
    )


def _mi_table(pairing: PairSearch) -> torch.Tensor:
    """The pairing's mutual-information table, or zeros of its shape when none was recorded."""
    return (
        torch.tensor(pairing.mi)
        if pairing.mi is not None
        else torch.zeros(len(pairing.expert_layers), len(pairing.target_layers))
    )


def bundles_for(
    module: StepsModule, datamodule: PairedHiddenStatesDataModule, config: VectorConfig
) -> list[SteeringBundle]:
    """One bundle per method of ``config`` for the pairs :class:`LayerPairingCallback` recorded in ``module``."""
    pairing, pairs = _recorded_pairing(module)
    computed = compute_vector_set(config.methods, pairs, _vector_inputs(module, datamodule, config, pairs))
    for method in config.methods:
        log.info(
            "Steering vectors: %s for target layers %s (%.1f s)",
            method,
            sorted(computed.vectors[method]),
            computed.seconds[method],
        )
    layout = module.alignment.built_layout
    target = ModelIdentity(layout.target.name, layout.target.fingerprint, layout.target.model_type)
    expert = ModelIdentity(layout.expert.name, layout.expert.fingerprint, layout.expert.model_type)
    mi = _mi_table(pairing)
    return [
        SteeringBundle(
            method=method,
            vectors=computed.vectors[method],
            norms=computed.norms,
            target=target,
            expert=expert,
            layer_pairs=pairs if method == "expertsteer" else [],
            mi=mi,
            mi_expert_layers=pairing.expert_layers,
            mi_target_layers=pairing.target_layers,
            data_key=module.cache_keys.get("data", ""),
            cache_key=module.cache_keys.get("alignment", module.cache_keys.get("data", "")),
            provenance=VectorProvenance(
                objective=module.objective,
                pairs=list(pairs),
                split="train",
                seconds=round(computed.seconds[method], 3),
                diagnostics=computed.diagnostics[method],
            ),
        )
        for method in config.methods
    ]


class SteeringVectorCallback(WhenTrainingEnds):
    """For every chosen pair (i, j), a unit vector for target layer j per method; bundles go to ``<run>/bundles/``.

    Methods, RFM options and seed come from the module's ``vectors`` settings (``model.vectors``), the same ones
    the evaluation uses: ``expertsteer`` (RFM on expert states, mapped by the encoder's linear part), ``rfm_self``,
    ``mean_difference`` and ``random``. Vectors are unit norm, stored with the mean hidden-state norm of their
    target layer. Runs on rank 0 when training ends; paths are recorded in ``last.ckpt``.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._ran = True
        module, datamodule = steps_module(pl_module), paired_data(trainer)

        def compute() -> dict[str, str]:
            bundles = bundles_for(module, datamodule, module.vectors)
            saved = save_bundles(run_dir(trainer) / "bundles", bundles)
            log.info("Steering bundles written to %s", run_dir(trainer) / "bundles")
            return {method: str(path.resolve()) for method, path in saved.items()}

        module.record_bundles(on_rank_zero(trainer, compute))
        resave_last_checkpoint(trainer)
