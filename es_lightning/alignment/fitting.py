"""Step 1 of ExpertSteer, the training around :class:`~es_lightning.alignment.maps.AlignmentMaps`: which layers get an
auto-encoder, building and seeding them from the paired cache, and what the training and validation steps log."""

from __future__ import annotations

import torch

from es_lightning.alignment.layer_map import proportional_layer_map, validate_layer_map
from es_lightning.alignment.maps import DEFAULT_RIDGE, AlignmentMaps
from es_lightning.data import PairedHiddenStatesDataModule
from es_lightning.data.cache import PairedLayout
from es_lightning.memory import announce, autoencoder_estimate


def choose_layer_map(
    layout: PairedLayout, declared: dict[int, int] | None, planned: dict[int, int] | None
) -> dict[int, int]:
    """Which expert layers are trained, toward which target block: ``declared`` (``model.layer_map``) when set; else
    ``planned`` (the layer-pair search's pairs, given before the fit builds the maps); else every captured expert
    layer toward the captured target layer at the same relative depth."""
    if declared is not None:
        return validate_layer_map(declared, layout.expert_layers, layout.target_layers)
    if planned is not None:
        return validate_layer_map(planned, layout.expert_layers, layout.target_layers)
    return proportional_layer_map(
        layout.expert_layers, layout.target_layers, layout.expert.num_layers, layout.target.num_layers
    )


def build_and_seed(
    maps: AlignmentMaps,
    datamodule: PairedHiddenStatesDataModule,
    layer_map: dict[int, int],
    ridge: float | None,
    closed_form: bool,
    device: torch.device,
) -> None:
    """Build ``maps`` for the data module's layout and ``layer_map``, announce the training's memory on ``device``,
    then set the statistics and the seed from the alignment split, one cached layer at a time (``ridge`` None: 0.01)."""
    layout = datamodule.built_layout
    maps.build(layout, layer_map)
    announce(
        autoencoder_estimate(
            len(layer_map),
            layout.expert.hidden_size,
            layout.target.hidden_size,
            datamodule.batch_size,
            len(datamodule.alignment_groups()),
            device,
        ),
        device,
    )
    maps.init_from_layers(
        lambda i: datamodule.states("alignment", expert_layers=[i])["expert"][:, 0],
        lambda j: datamodule.states("alignment", target_layers=[j])["target"][:, 0],
        DEFAULT_RIDGE if ridge is None else ridge,
        closed_form,
    )


def training_logs(losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a training step logs from :meth:`AlignmentMaps.losses`: the total, and each objective's mean."""
    logs = {"train/loss": losses["total"], "train/recon_mse": losses["recon"].mean()}
    if "pair" in losses:
        logs["train/pair_mse"] = losses["pair"].mean()
    return logs


def validation_logs(maps: AlignmentMaps) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The validation epoch's loss and, per metric, its value per trained layer (``val/<metric>/layer<i>``) and its
    mean (``val/<metric>``), from the metrics the validation steps updated."""
    loss, values = maps.metrics.compute()
    logs: dict[str, torch.Tensor] = {}
    for name, per_layer in values.items():
        for layer, value in zip(maps.trained_layers, per_layer):
            logs[f"val/{name}/layer{layer}"] = value
        logs[f"val/{name}"] = torch.stack(per_layer).mean()
    return loss, logs
