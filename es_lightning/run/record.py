"""What a fit's checkpoint says about how it was made: the options its key was computed from, the key, and whether
the fit ran to the end (layer pairs and bundles recorded). Written by :class:`FitRecorder` into every checkpoint of
a fit, read by the pipeline (reuse or refit) and by ``fit --ckpt_path`` (refuse to resume under other options)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback

from es_lightning.run.keys import changed_options, stage_key

RECORD_KEY = "es_lightning_fit_record"  # the checkpoint entry
MODULE_KEY = "es_lightning"  # the module's own entry (layout, pairs, bundles), see alignment.autoencoder


@dataclass(frozen=True)
class FitRecord:
    """A checkpoint's fit: ``options`` (:func:`~es_lightning.run.keys.stage_options` of ``fit``) and their ``key``;
    ``complete`` when its pairs and bundles are recorded (the fit ran to the end)."""

    options: dict[str, Any]
    key: str
    complete: bool

    def changes_to(self, options: dict[str, Any]) -> list[str]:
        """How ``options`` differ from the ones this checkpoint was fitted with (empty: the same fit)."""
        return changed_options(self.options, options) if stage_key(options) != self.key else []


class FitRecorder(Callback):
    """Saves the fit's options and key into every checkpoint the fit writes."""

    def __init__(self, options: dict[str, Any]):
        self.options = dict(options)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint[RECORD_KEY] = {"options": self.options, "key": stage_key(self.options)}


def read_fit_record(ckpt: str | Path) -> FitRecord | None:
    """The record of the checkpoint at ``ckpt``; None if there is no file. A checkpoint written before records
    existed gets an empty record that matches no options (so it is refitted, never silently reused)."""
    path = Path(ckpt)
    if not path.is_file():
        return None
    import torch

    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    meta = checkpoint.get(MODULE_KEY) or {}
    saved = checkpoint.get(RECORD_KEY) or {"options": {}, "key": ""}
    return FitRecord(dict(saved["options"]), str(saved["key"]), bool(meta.get("pairing")) and bool(meta.get("bundles")))
