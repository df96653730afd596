"""The main job: fit -> test -> predict with one config, in one process, printing where everything is.

    es-lightning-pipeline --config configs/default.yaml

Each stage is the ordinary ``es-lightning`` subcommand (same config, same run folder), so any stage can
be re-run on its own. Started again with the same command, the job continues where it stopped: a finished
fit is kept (an unfinished one resumes from ``last.ckpt``), a report made from the same checkpoint is kept,
and prediction rows already written are reused by the prediction writer.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from es_lightning.cli import build_cli


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def side_by_side(predictions: Path, limit_chars: int = 160) -> str:
    """Unsteered and steered outputs of each prompt next to each other, as text."""
    rows: dict[str, list[dict]] = {}
    with open(predictions) as handle:
        for line in handle:
            row = json.loads(line)
            rows.setdefault(row["id"], []).append(row)
    lines = []
    for prompt_id, variants in rows.items():
        lines.append(f"[{prompt_id}] {variants[0]['prompt'].strip()}")
        for row in variants:
            label = "unsteered" if row["method"] == "none" else f"{row['method']} x{row['coefficient']:g}"
            text = " ".join(row["output"].split())[:limit_chars]
            lines.append(f"    {label:>24}: {text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run fit, test and predict for ``--config``; extra arguments go to every stage."""
    parser = argparse.ArgumentParser(description="ExpertSteer end to end: fit -> test -> predict.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--prompts", default=None, help="JSONL prompts for the predict stage (default: the config's)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["fit", "test", "predict"])
    args, extra = parser.parse_known_args(argv)
    common = ["--config", args.config, *extra]
    start = time.time()

    outputs: list[Path] = []
    run_dir = _run_dir(common)
    ckpt = run_dir / "last.ckpt"
    if "fit" not in args.skip:
        _banner("1/3 fit: paired cache -> auto-encoders -> layer pairs -> steering vectors")
        if _fit_complete(ckpt):
            print(f"fit already complete: {ckpt} holds pairs and bundles (delete the run folder to refit)")
        else:
            build_cli(["fit", *common, *(["--ckpt_path", "last"] if ckpt.exists() else [])])
    if not ckpt.exists():
        raise FileNotFoundError(f"No checkpoint at {ckpt}: run the fit stage first.")

    if "test" not in args.skip:
        _banner("2/3 test: cross-validated multiple-choice evaluation")
        report = run_dir / "report" / "report.json"
        if _report_matches(report, ckpt):
            print(f"report already made from this checkpoint: {report} (delete it to re-evaluate)")
        else:
            build_cli(["test", *common, "--ckpt_path", str(ckpt)])
        print((run_dir / "report" / "report.md").read_text())

    if "predict" not in args.skip:
        _banner("3/3 predict: unsteered vs steered generations")
        predict_args = ["--data.predict_data.path", args.prompts] if args.prompts else []
        cli = build_cli(["predict", *common, *predict_args, "--ckpt_path", str(ckpt)])
        writer = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "SteeredPredictionWriter")
        print(side_by_side(writer.output_path))
        outputs.append(writer.output_path)

    _banner(f"done in {(time.time() - start) / 60:.1f} min")
    print(f"run folder: {run_dir}")
    for name in ("last.ckpt", "pairing.json", "mi_heatmap.png", "bundles", "report/report.md", "report/report.json",
                 "report/coefficient_sweep.png"):
        if (run_dir / name).exists():
            print(f"  {run_dir / name}")
    for path in outputs:
        print(f"  {path}")


def _fit_complete(ckpt: Path) -> bool:
    """True if ``ckpt`` exists and its fit ran to the end (pairs and bundles recorded)."""
    if not ckpt.exists():
        return False
    import torch

    meta = torch.load(ckpt, map_location="cpu", weights_only=False).get("es_lightning", {})
    return bool(meta.get("pairing")) and bool(meta.get("bundles"))


def _report_matches(report: Path, ckpt: Path) -> bool:
    """True if ``report`` exists and was made from exactly this checkpoint."""
    if not report.exists():
        return False
    from es_lightning.io import sha256_file

    recorded = (json.loads(report.read_text()).get("meta") or {}).get("checkpoint") or {}
    return recorded.get("sha256") == sha256_file(ckpt)


def _run_dir(common: list[str]) -> Path:
    from es_lightning.cli import ESLightningCLI
    from es_lightning.data import PairedHiddenStatesDataModule
    from es_lightning.module import ExpertSteer

    cli = ESLightningCLI(ExpertSteer, PairedHiddenStatesDataModule, run=False, args=common, auto_configure_optimizers=False)
    return Path(cli.trainer.default_root_dir)


if __name__ == "__main__":
    main()
