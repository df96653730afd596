"""What the callbacks share: the run directory, re-saving the last checkpoint, rank-0 work, and stops between
batches."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import lightning as L

from es_lightning.callbacks.prediction_writer import find_prediction_writer
from es_lightning.stopping import check_stop, stage
from es_lightning.stopping import on_rank_zero as _on_rank_zero

T = TypeVar("T")
TEST_KEPT = "no results of this test (fold plans and scores are recomputed; the checkpoint and the cache are kept)"


def run_dir(trainer: L.Trainer) -> Path:
    """The folder of this run's checkpoints (``<output_dir>/<run_name>``)."""
    dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)  # a ModelCheckpoint's; not every Checkpoint has one
    if dirpath:
        return Path(dirpath)
    return Path(trainer.default_root_dir)


def resave_last_checkpoint(trainer: L.Trainer) -> None:
    """Write the module's new results into the run's ``last.ckpt`` (all ranks call; rank 0 writes)."""
    callback = trainer.checkpoint_callback
    path = getattr(callback, "last_model_path", "") if callback is not None else ""
    if path:
        trainer.save_checkpoint(path)


def on_rank_zero(trainer: L.Trainer, compute: Callable[[], T], what: str = "work on rank 0") -> T:
    """``compute()`` on rank 0, its result handed to every rank; an error or a stop on rank 0 is raised on every rank
    at once, and the other ranks wait outside any collective, so long work never meets the DDP timeout
    (:func:`es_lightning.stopping.on_rank_zero`)."""
    if trainer.world_size < 2:
        return compute()
    return _on_rank_zero(compute, what)


class StopAtBatchEnd(L.Callback):
    """Ends fit, validate, test and predict after the current batch once a stop signal arrived or another rank failed
    (:func:`es_lightning.stopping.check_stop`); Lightning's own loops react to SIGTERM alone, and not in every loop.
    The ESLightningCLI adds it to every trainer, after the other callbacks, so the prediction writer has saved the
    batch first."""

    def _check(self, step: str, kept: Callable[[], str] | None = None) -> None:
        with stage(step, kept=kept):
            check_stop()

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._check("training the auto-encoders")

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._check("validation")

    def on_test_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._check("scoring test questions", lambda: TEST_KEPT)

    def on_predict_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        writer = find_prediction_writer(trainer)
        kept = (
            None
            if writer is None
            else (lambda: f"the rows of every finished prompt in {writer.parts_dir} (not generated again)")
        )
        self._check("generating predictions", kept)


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
