"""What the pairing and vector callbacks share: the run directory and re-saving the last checkpoint."""

from __future__ import annotations

from pathlib import Path

import lightning as L


def run_dir(trainer: L.Trainer) -> Path:
    """The folder of this run's checkpoints (``<output_dir>/<run_name>``)."""
    callback = trainer.checkpoint_callback
    if callback is not None and getattr(callback, "dirpath", None):
        return Path(callback.dirpath)
    return Path(trainer.default_root_dir)


def resave_last_checkpoint(trainer: L.Trainer) -> None:
    """Write the module's new results into the run's ``last.ckpt`` (all ranks call; rank 0 writes)."""
    callback = trainer.checkpoint_callback
    path = getattr(callback, "last_model_path", "") if callback is not None else ""
    if path:
        trainer.save_checkpoint(path)
