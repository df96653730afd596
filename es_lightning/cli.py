"""``es-lightning``: LightningCLI over the alignment auto-encoder and the paired cache DataModule.

``es-lightning [--quiet | --verbose] {fit,validate,test,predict} ...``: the two flags go before the subcommand
(``test --verbose`` is Lightning's own switch for its metrics table); see :mod:`es_lightning.console`.

SIGTERM or SIGINT stops any stage within seconds with one line saying what was kept and the command that resumes
(exit status 143 or 130); see :mod:`es_lightning.stopping`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import cast

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from es_lightning.callbacks.common import StopAtBatchEnd
from es_lightning.console import configure, verbosity_from_flags
from es_lightning.data import PairedHiddenStatesDataModule
from es_lightning.io import atomic_checkpoint_io, ensure_writable_dir
from es_lightning.memory import check_devices
from es_lightning.module import ExpertSteer
from es_lightning.run.keys import stage_options
from es_lightning.run.record import FitRecorder, read_run_record
from es_lightning.stopping import run_stoppable, stage

SUBCOMMANDS = ("fit", "validate", "test", "predict")
MIN_FREE_BYTES = 200 * 2**20  # checkpoints, bundles and reports of the default run need well under this


class ESLightningCLI(LightningCLI):
    """Adds ``--run_name`` and ``--output_dir``: logs and ``last.ckpt`` go to ``<output_dir>/<run_name>/``, so
    ``--ckpt_path last`` finds the run's last checkpoint; and ``--quiet`` / ``--verbose`` before the subcommand.

    Only ``last.ckpt`` is written by default: layer pairs and steering bundles are computed when fitting ends
    and recorded in it, so a mid-training "best" checkpoint could not be tested or used for prediction
    (``--checkpoint.save_top_k`` and ``--checkpoint.monitor`` still make one, for the auto-encoders alone).
    """

    run_dir: Path | None = None  # the run folder of the latest subcommand parsed in this process (for a stop's message)

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        self.parser.add_argument("--quiet", action="store_true", help="Print only warnings, errors and results.")
        self.parser.add_argument(
            "--verbose", action="store_true", help="Also print debug lines, Lightning's notes and every notice."
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse ``args`` (``build_cli`` always passes them, from ``sys.argv`` or the pipeline), then set up the
        console."""
        self.config = parser.parse_object(args) if isinstance(args, dict) else parser.parse_args(cast(list[str], args))
        configure(verbosity_from_flags(bool(self.config.get("quiet")), bool(self.config.get("verbose"))))

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_name", type=str, default="default", help="Name of the run folder under output_dir.")
        parser.add_argument("--output_dir", type=str, default="checkpoints", help="Where run folders are created.")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": None,
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 0,
                "checkpoint.filename": "best-{epoch}-{step}",
                "checkpoint.mode": "min",
            }
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_devices(config.trainer.accelerator, config.trainer.devices)  # before Lightning's own, less clear error
        run_dir = Path(config.output_dir) / config.run_name
        ESLightningCLI.run_dir = run_dir
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = str(run_dir)
        if config.trainer.default_root_dir is None:
            config.trainer.default_root_dir = str(run_dir)
        ensure_writable_dir(run_dir, min_free_bytes=MIN_FREE_BYTES, what="run output")
        if (
            self.subcommand == "fit"
            and not config.get("ckpt_path")
            and (Path(config.checkpoint.dirpath) / "last.ckpt").exists()
        ):
            raise FileExistsError(
                f"The run folder {config.checkpoint.dirpath} already holds last.ckpt. Resume it with --ckpt_path last, "
                f"or start a new run with another --run_name (or delete the folder)."
            )
        self.fit_options = stage_options(config, "fit") if self.subcommand == "fit" else None
        if self.fit_options is not None and config.get("ckpt_path"):
            check_resumable(Path(config.checkpoint.dirpath), str(config.ckpt_path), self.fit_options)
        if self.subcommand == "predict" and config.get("return_predictions") is None:
            config.return_predictions = False  # rows are streamed to disk by SteeredPredictionWriter

    def instantiate_trainer(self, **kwargs):
        """The configured Trainer, with atomic checkpoint writes unless a CheckpointIO plugin was given, and
        :class:`StopAtBatchEnd` after its callbacks."""
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.append(StopAtBatchEnd())
        if getattr(self, "fit_options", None) is not None:
            trainer.callbacks.append(FitRecorder(self.fit_options))
        connector = trainer._accelerator_connector
        if type(trainer.strategy.checkpoint_io).__name__ == "TorchCheckpointIO" and connector.checkpoint_io is None:
            trainer.strategy.checkpoint_io = atomic_checkpoint_io()
        return trainer


def check_resumable(run_dir: Path, ckpt_path: str, options: dict) -> None:
    """Refuse to resume a fit from a checkpoint made under other fit options (``--ckpt_path last`` or a path)."""
    path = run_dir / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    record = read_run_record(path)
    if record is None or record.fit is None:  # no file (Lightning says so), or a checkpoint older than fit records
        return
    changes = record.fit.changes_to(options)
    if changes:
        raise ValueError(
            f"{path} was fitted with other options ({'; '.join(changes[:6])}), so resuming it would mix two "
            f"configurations. Fix: resume with the options it was fitted with, or start a new run with another "
            f"--run_name (es-lightning-pipeline moves such a checkpoint aside and fits again)."
        )


def build_cli(args: list[str] | None = None) -> ESLightningCLI:
    """Parse ``args`` (default: ``sys.argv[1:]``) and run the chosen subcommand; returns the CLI object."""
    return ESLightningCLI(
        ExpertSteer,
        PairedHiddenStatesDataModule,
        args=list(sys.argv[1:] if args is None else args),
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def kept_in_run_folder(run_dir: Path | None) -> str:
    """What a stopped run's folder holds, e.g. ``in checkpoints/default: last.ckpt, pairing.json, bundles``."""
    if run_dir is None:
        return ""
    names = [
        name
        for name in ("last.ckpt", "pairing.json", "bundles", "report/report.json", "predictions.jsonl")
        if (run_dir / name).exists()
    ]
    parts = sorted((run_dir / "parts").glob("rank*.jsonl"))
    if parts:
        prompts = sum(part.read_bytes().count(b"\n") for part in parts)  # one line per finished prompt
        names.append(f"parts/ ({prompts} finished prompts)")
    return f"in {run_dir}: {', '.join(names)}" if names else f"nothing in {run_dir} yet"


def resume_command(argv: list[str], run_dir: Path | None) -> list[str]:
    """The command that continues a stopped ``es-lightning`` run: the same one, plus ``--ckpt_path last`` for a fit
    that has written ``last.ckpt`` (the same command would be refused)."""
    subcommand = next((arg for arg in argv if arg in SUBCOMMANDS), None)
    given = any(arg == "--ckpt_path" or arg.startswith("--ckpt_path=") for arg in argv)
    resumable = subcommand == "fit" and not given and run_dir is not None and (run_dir / "last.ckpt").exists()
    return ["es-lightning", *argv, *(["--ckpt_path", "last"] if resumable else [])]


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``es-lightning`` console script (``args`` for in-process use, e.g. tests)."""
    argv = list(sys.argv[1:] if args is None else args)
    ESLightningCLI.run_dir = None

    def run() -> None:
        with stage(next((arg for arg in argv if arg in SUBCOMMANDS), "es-lightning")):
            build_cli(argv)

    before_subcommand = argv[: next((k for k, arg in enumerate(argv) if arg in SUBCOMMANDS), len(argv))]
    run_stoppable(
        run,
        "es-lightning",
        lambda: resume_command(argv, ESLightningCLI.run_dir),
        lambda: kept_in_run_folder(ESLightningCLI.run_dir),
        traceback="--verbose" in before_subcommand,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
