"""Dataset adapters and the paired hidden-state cache DataModule."""

from es_lightning.data.datamodule import DataSource, PairedHiddenStatesDataModule, SplitConfig
from es_lightning.data.examples import ExampleFormat

__all__ = ["DataSource", "ExampleFormat", "PairedHiddenStatesDataModule", "SplitConfig"]
