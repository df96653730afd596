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


class WhenTrainingEnds(L.Callback):
    """A callback whose work runs in ``on_train_end``, also for a run resumed after training had finished.

    Such a run (e.g. one killed while this callback ran, started again with ``--ckpt_path last``) skips the
    training loop and with it ``on_train_end``; ``on_fit_end`` then runs the work instead. Subclasses set
    ``self._ran = True`` first thing in ``on_train_end``.
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._ran = False

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not getattr(self, "_ran", True):
            self.on_train_end(trainer, pl_module)
