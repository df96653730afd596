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


def on_rank_zero(trainer: L.Trainer, compute):
    """``compute()`` on rank 0, its result broadcast to every rank; an error on rank 0 is raised on every rank
    (so the other ranks never hang in the broadcast)."""
    result, error = None, None
    if trainer.is_global_zero:
        try:
            result = compute()
        except Exception as err:  # noqa: BLE001 - re-raised below on every rank
            error = err
    result, error = trainer.strategy.broadcast((result, error), src=0)
    if error is not None:
        raise error
    return result
