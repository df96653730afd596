"""What the fit's callbacks (steps 2 and 3) use of the LightningModule and of the data module, as typed
interfaces: :class:`StepsModule` (met by :class:`es_lightning.module.ExpertSteer`) and the paired data module."""

from __future__ import annotations

from typing import Protocol, cast

import lightning as L
import torch

from es_lightning.alignment.maps import AlignmentMaps
from es_lightning.data import PairedHiddenStatesDataModule
from es_lightning.steering.pair_search import PairSearch, PairSearchConfig
from es_lightning.steering.vectors import VectorConfig


class StepsModule(Protocol):
    """The module's side of steps 2 and 3: its settings, the auto-encoders it holds (:attr:`alignment`), what is
    recorded so far, and where results go (:meth:`record_pairing`, :meth:`record_bundles`; callbacks never set its
    attributes)."""

    pairing: PairSearchConfig
    vectors: VectorConfig
    declared_layer_map: dict[int, int] | None
    ridge: float | None
    alignment: AlignmentMaps

    @property
    def objective(self) -> str: ...

    @property
    def pairing_result(self) -> PairSearch | None: ...

    @property
    def cache_keys(self) -> dict[str, str]: ...

    @property
    def device(self) -> torch.device: ...

    def record_pairing(self, result: PairSearch) -> None: ...

    def record_bundles(self, paths: dict[str, str]) -> None: ...


def steps_module(pl_module: L.LightningModule) -> StepsModule:
    """``pl_module`` as a :class:`StepsModule`, or a clear error for another LightningModule."""
    if not all(callable(getattr(type(pl_module), name, None)) for name in ("record_pairing", "record_bundles")):
        raise TypeError(
            f"LayerPairingCallback and SteeringVectorCallback need es_lightning.module.ExpertSteer as the "
            f"model, not {type(pl_module).__name__}."
        )
    return cast(StepsModule, pl_module)


def paired_data(trainer: L.Trainer) -> PairedHiddenStatesDataModule:
    """The trainer's data module, which the fit's callbacks need to be the paired cache's."""
    datamodule = getattr(trainer, "datamodule", None)
    if not isinstance(datamodule, PairedHiddenStatesDataModule):
        raise TypeError(
            "LayerPairingCallback and SteeringVectorCallback need es_lightning.data."
            "PairedHiddenStatesDataModule as the data module (the es-lightning CLI sets it)."
        )
    return datamodule
