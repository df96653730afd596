"""The main job: fit -> test -> predict with one config, in one process, printing where everything is.

    es-lightning-pipeline --config configs/default.yaml [--quiet | --verbose]

Each stage is the ordinary ``es-lightning`` subcommand (same config, same run folder), so any stage can
be re-run on its own. Started again, the job reuses only what was made from the same inputs: each stage's
content key (:mod:`es_lightning.run.keys`) hashes the options it depends on, the files they name and its input
artifacts. A fit is kept if ``last.ckpt`` records the same fit key (an unfinished one resumes; one fitted under
other options is moved to ``<run>/superseded/`` and the fit starts again, saying which options changed); a report
is kept if this pipeline made it under the same report key (``<report_dir>/pipeline.json``); prediction rows
already written under the same key are reused by the prediction writer. The predictions are also written side by
side to ``<run>/predictions.md``.
SIGTERM or SIGINT stops it within seconds with one line saying what was kept and the command that resumes (the
same one); see :mod:`es_lightning.stopping`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from es_lightning.callbacks.prediction_writer import find_prediction_writer
from es_lightning.cli import ESLightningCLI, build_cli, kept_in_run_folder
from es_lightning.console import configure, verbosity_from_flags
from es_lightning.io import atomic_write_json, atomic_write_text, sha256_file
from es_lightning.models.loading import default_cache_dir, fingerprint_model_dir, resolve_model_dir
from es_lightning.run.keys import stage_key, stage_options
from es_lightning.run.record import RunRecord, read_run_record
from es_lightning.stopping import run_stoppable
from es_lightning.stopping import stage as stopping_stage

log = logging.getLogger("es_lightning.pipeline")

REPORT_KEY_FILE = "pipeline.json"


def _label(row: dict) -> str:
    return "unsteered" if row["method"] == "none" else f"{row['method']} x{row['coefficient']:g}"


def _by_prompt(predictions: Path) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    with open(predictions, encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            rows.setdefault(row["id"], []).append(row)
    return rows


def side_by_side(predictions: Path, limit_chars: int = 160) -> str:
    """Unsteered and steered outputs of each prompt next to each other, as text."""
    lines = []
    for prompt_id, variants in _by_prompt(predictions).items():
        lines.append(f"[{prompt_id}] {variants[0]['prompt'].strip()}")
        for row in variants:
            text = " ".join(row["output"].split())[:limit_chars]
            lines.append(f"    {_label(row):>24}: {text}")
    return "\n".join(lines)


def predictions_markdown(predictions: Path) -> str:
    """The predictions as Markdown: per prompt, a table of each variant's full answer (empty ones marked)."""
    out = [f"# Predictions\n\nFrom `{predictions}`: each prompt's unsteered answer and its steered answers.\n"]
    for prompt_id, variants in _by_prompt(predictions).items():
        prompt = " ".join(variants[0]["prompt"].split())
        out.append(f"## {prompt_id}\n\n> {prompt}\n\n| variant | answer |\n|---|---|")
        for row in variants:
            answer = " ".join(row["output"].split()).replace("|", "\\|") or "*(empty)*"
            out.append(f"| {_label(row)} | {answer} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    """Run fit, test and predict for ``--config``; extra arguments go to every stage."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ESLightningCLI.run_dir = None
    run_stoppable(
        lambda: _run(argv),
        "es-lightning-pipeline",
        lambda: ["es-lightning-pipeline", *argv],
        lambda: kept_in_run_folder(ESLightningCLI.run_dir),
        traceback="--verbose" in argv,
    )


def _arguments(argv: list[str]) -> tuple[argparse.Namespace, list[str], list[str], list[str]]:
    """The pipeline's own flags, the loudness flags for every stage, the options every stage gets (``--config``
    and the rest), and the options only the stages' Trainers get (progress bar, model summary)."""
    parser = argparse.ArgumentParser(description="ExpertSteer end to end: fit -> test -> predict.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--prompts", default=None, help="JSONL prompts for the predict stage (default: the config's)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["fit", "test", "predict"])
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument("--quiet", action="store_true", help="print only warnings, errors and results")
    loudness.add_argument(
        "--verbose", action="store_true", help="also print debug lines, Lightning's notes and every notice"
    )
    args, extra = parser.parse_known_args(argv)
    verbosity = verbosity_from_flags(args.quiet, args.verbose)
    configure(verbosity)
    flags = {"quiet": ["--quiet"], "verbose": ["--verbose"], "default": []}[verbosity]
    stage_extra = ["--trainer.enable_progress_bar", "false", "--data.progress", "false"] if args.quiet else []
    if not args.verbose:  # Lightning's parameter table says nothing about the run (the checkpoint records the sizes)
        stage_extra += ["--trainer.enable_model_summary", "false"]
    return args, flags, ["--config", args.config, *extra], stage_extra


def _fit_is_current(ckpt: Path, config) -> bool:
    """True if ``ckpt`` holds a finished fit under this configuration's fit key and of the same models' weights. A
    checkpoint fitted under other options or weights is moved aside first (see :func:`_supersede`); an unfinished one
    under the same key is resumed."""
    options = stage_options(config, "fit")
    record = read_run_record(ckpt)
    if record is None:
        return False
    if record.fit is None:
        changes = ["it was written before checkpoints recorded their options"]
    else:
        changes = record.fit.changes_to(options) + _changed_models(record, config)
    if changes:
        _supersede(ckpt, record, changes)
        return False
    return record.complete


def _changed_models(record: RunRecord, config) -> list[str]:
    """The models whose weights are not the ones ``record`` was fitted on: the same ``data.expert.name`` or
    ``data.target.name`` can name other weights (an overwritten local folder, a new revision of a Hub id)."""
    cache_dir = config.data.cache_dir or default_cache_dir()
    changed = []
    for side in ("expert", "target"):
        fitted = getattr(record.layout, side)
        now = fingerprint_model_dir(resolve_model_dir(getattr(config.data, side).name, cache_dir))
        if now != fitted.fingerprint:
            changed.append(f"data.{side}: the weights of {fitted.name} (fingerprint {fitted.fingerprint} -> {now})")
    return changed


@dataclass(frozen=True)
class _Stages:
    """How the pipeline calls each stage's CLI: the loudness flags, the options every stage gets (``--config`` and
    the rest), and the options only the stages' Trainers get."""

    flags: list[str]
    common: list[str]
    extra: list[str]

    def run(self, title: str, subcommand: str, *more: str) -> ESLightningCLI:
        """Run ``subcommand`` with ``more`` options under a ``=== title ===`` heading, saying how long it took."""
        log.info("\n=== %s ===", title)
        began = time.time()
        with stopping_stage(subcommand):
            cli = build_cli([*self.flags, subcommand, *self.common, *self.extra, *more])
        log.info("%s: done in %.1f s", subcommand, time.time() - began)
        return cli


def _fit(stages: _Stages, ckpt: Path, config) -> None:
    """Stage 1, unless ``ckpt`` already holds a finished fit under this configuration (an unfinished one resumes)."""
    if _fit_is_current(ckpt, config):
        log.info("\n=== 1/3 fit ===\nfit already complete with these options: %s holds pairs and bundles", ckpt)
    else:
        stages.run(
            "1/3 fit: paired cache -> auto-encoders -> layer pairs -> steering vectors",
            "fit",
            *(["--ckpt_path", "last"] if ckpt.exists() else []),
        )


def _test(stages: _Stages, ckpt: Path, config, report_dir: Path) -> None:
    """Stage 2, unless this pipeline already made the report from ``ckpt`` under the same evaluation options;
    prints the report either way."""
    key = stage_key(stage_options(config, "report"), {"checkpoint": sha256_file(ckpt)})
    if _report_matches(report_dir, key):
        log.info(
            "\n=== 2/3 test ===\nreport already made from this checkpoint with these evaluation options: %s "
            "(delete it to re-evaluate)",
            report_dir / "report.json",
        )
    else:
        stages.run(
            "2/3 test: cross-validated evaluation (multiple choice, generated answers, damage)",
            "test",
            "--ckpt_path",
            str(ckpt),
            "--verbose",
            "false",
        )
        atomic_write_json(
            report_dir / REPORT_KEY_FILE, {"key": key, "report_sha256": sha256_file(report_dir / "report.json")}
        )
    print((report_dir / "report.md").read_text(), flush=True)


def _predict(stages: _Stages, ckpt: Path, run_dir: Path, prompts: str | None) -> list[Path]:
    """Stage 3: writes ``<run>/predictions.md`` and prints the outputs side by side; returns the files written."""
    predict_args = ["--data.predict_data.path", prompts] if prompts else []
    cli = stages.run(
        "3/3 predict: unsteered vs steered generations", "predict", *predict_args, "--ckpt_path", str(ckpt)
    )
    writer = find_prediction_writer(cli.trainer)
    if writer is None:
        raise ValueError(
            "The pipeline's predict stage needs es_lightning.callbacks.SteeredPredictionWriter in "
            "trainer.callbacks (see configs/default.yaml)."
        )
    markdown = run_dir / "predictions.md"
    atomic_write_text(markdown, predictions_markdown(writer.output_path))
    print(side_by_side(writer.output_path), flush=True)
    return [writer.output_path, markdown]


def _print_outputs(start: float, run_dir: Path, report_dir: Path, outputs: list[Path]) -> None:
    """The closing lines: the time taken and every file the stages left that exists."""
    print(f"\ndone in {(time.time() - start) / 60:.1f} min\nrun folder: {run_dir}")
    for path in (
        [run_dir / name for name in ("last.ckpt", "pairing.json", "mi_heatmap.png", "bundles")]
        + [report_dir / name for name in ("report.md", "report.json", "coefficient_sweep.png")]
        + outputs
    ):
        if path.exists():
            print(f"  {path}")


def _run(argv: list[str]) -> None:
    """The three stages (see :func:`main`)."""
    args, flags, common, stage_extra = _arguments(argv)
    start = time.time()
    config = _parsed_config([*flags, *common])
    run_dir = Path(config.trainer.default_root_dir)
    report_dir = Path(config.model.report_dir) if config.model.report_dir else run_dir / "report"
    ckpt = run_dir / "last.ckpt"
    stages = _Stages(flags, common, stage_extra)
    outputs: list[Path] = []
    if "fit" not in args.skip:
        _fit(stages, ckpt, config)
    if not ckpt.exists():
        raise FileNotFoundError(f"No checkpoint at {ckpt}: run the fit stage first.")
    if "test" not in args.skip:
        _test(stages, ckpt, config, report_dir)
    if "predict" not in args.skip:
        outputs += _predict(stages, ckpt, run_dir, args.prompts)
    _print_outputs(start, run_dir, report_dir, outputs)


def _supersede(ckpt: Path, record: RunRecord, changes: list[str]) -> None:
    """Move a checkpoint fitted under other options or models out of the way (to ``<run>/superseded/``), saying what
    changed; the fit then starts afresh."""
    key = record.fit.key[:12] if record.fit else "unrecorded"
    models = (
        "".join(info.fingerprint[:6] for info in (record.layout.expert, record.layout.target)) if record.layout else ""
    )
    kept = ckpt.parent / "superseded" / f"last-{key}-{models}.ckpt"
    kept.parent.mkdir(parents=True, exist_ok=True)
    ckpt.replace(kept)
    shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
    log.info("\n%s was fitted with other options or weights (%s): moved to %s, fitting again.", ckpt, shown, kept)


def _report_matches(report_dir: Path, key: str) -> bool:
    """True if the pipeline made ``report_dir/report.json`` under ``key`` and the report is unchanged since."""
    report = report_dir / "report.json"
    try:
        recorded = json.loads((report_dir / REPORT_KEY_FILE).read_text())
    except (OSError, ValueError):
        return False
    return report.exists() and recorded.get("key") == key and recorded.get("report_sha256") == sha256_file(report)


def _parsed_config(args: list[str]):
    """The stage configuration the CLI builds from ``args`` (run folder, report folder, options), nothing run."""
    from es_lightning.data import PairedHiddenStatesDataModule
    from es_lightning.module import ExpertSteer

    cli = ESLightningCLI(
        ExpertSteer, PairedHiddenStatesDataModule, run=False, args=args, auto_configure_optimizers=False
    )
    config = cli.config
    config.trainer.default_root_dir = cli.trainer.default_root_dir
    return config


if __name__ == "__main__":
    main()
