"""Dataset adapters and the paired hidden-state cache DataModule."""

from es_lightning.data.datamodule import DataSource, PairedHiddenStatesDataModule, SplitConfig
from es_lightning.data.examples import ExampleFormat
from es_lightning.data.prompts import PromptSource

__all__ = ["DataSource", "ExampleFormat", "PairedHiddenStatesDataModule", "PromptSource", "SplitConfig"]
