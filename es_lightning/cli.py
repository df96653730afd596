"""``es-lightning``: LightningCLI over the alignment auto-encoder and the paired cache DataModule."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from es_lightning.module import ExpertSteer
from es_lightning.data import PairedHiddenStatesDataModule
from es_lightning.io import atomic_checkpoint_io, ensure_writable_dir


MIN_FREE_BYTES = 200 * 2**20  # checkpoints, bundles and reports of the default run need well under this


class ESLightningCLI(LightningCLI):
    """Adds ``--run_name`` and ``--output_dir``: logs and checkpoints (last + best by val/loss) go to
    ``<output_dir>/<run_name>/``, so ``--ckpt_path last`` finds the run's last checkpoint."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_name", type=str, default="default", help="Name of the run folder under output_dir.")
        parser.add_argument("--output_dir", type=str, default="checkpoints", help="Where run folders are created.")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/loss", "checkpoint.mode": "min", "checkpoint.save_last": True,
            "checkpoint.save_top_k": 1, "checkpoint.filename": "best-{epoch}-{step}",
        })

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        run_dir = Path(config.output_dir) / config.run_name
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = str(run_dir)
        if config.trainer.default_root_dir is None:
            config.trainer.default_root_dir = str(run_dir)
        ensure_writable_dir(run_dir, min_free_bytes=MIN_FREE_BYTES, what="run output")
        if self.subcommand == "fit" and not config.get("ckpt_path") and (Path(config.checkpoint.dirpath) / "last.ckpt").exists():
            raise FileExistsError(
                f"The run folder {config.checkpoint.dirpath} already holds last.ckpt. Resume it with --ckpt_path last, "
                f"or start a new run with another --run_name (or delete the folder)."
            )
        if self.subcommand == "predict" and config.get("return_predictions") is None:
            config.return_predictions = False  # rows are streamed to disk by SteeredPredictionWriter


    def instantiate_trainer(self, **kwargs):
        """The configured Trainer, with atomic checkpoint writes unless a CheckpointIO plugin was given."""
        trainer = super().instantiate_trainer(**kwargs)
        connector = trainer._accelerator_connector
        if type(trainer.strategy.checkpoint_io).__name__ == "TorchCheckpointIO" and connector.checkpoint_io is None:
            trainer.strategy.checkpoint_io = atomic_checkpoint_io()
        return trainer


def build_cli(args: list[str] | None = None) -> ESLightningCLI:
    """Parse ``args`` (default: ``sys.argv``) and run the chosen subcommand; returns the CLI object."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return ESLightningCLI(
        ExpertSteer,
        PairedHiddenStatesDataModule,
        args=args,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``es-lightning`` console script (``args`` for in-process use, e.g. tests)."""
    build_cli(args)


if __name__ == "__main__":
    main(sys.argv[1:])
