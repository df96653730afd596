"""benchmarks/gpu_check.py: the dry run (CPU, tiny widths) prints every stage's table, its probe reads the product's
memory announcements, and the paper-width plan it would run on a GPU has the sizes it claims and parses."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from es_lightning.cli import ESLightningCLI
from es_lightning.data import PairedHiddenStatesDataModule
from es_lightning.memory import StageEstimate, announce, read_shape
from es_lightning.module import ExpertSteer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
gpu_check = importlib.import_module("gpu_check")  # benchmarks/ is no package

ON_CPU = ["--trainer.accelerator", "cpu", "--trainer.devices", "1"]
# Parts each stage's table must show (the product's announcements, plus the probe's own marks), and its total.
PARTS = {
    "fit": {"setup", "capture expert", "capture target", "pair search", "auto-encoders", "rfm", "**whole stage**"},
    "test": {"setup", "evaluation", "pair search", "rfm", "test questions", "**whole stage**"},
    "predict": {"setup", "evaluation", "**whole stage**"},
}


class _Trainer:
    global_rank = 0


def test_probe_splits_at_the_products_announcements(tmp_path, monkeypatch):
    monkeypatch.setenv(gpu_check.PROBE_ENV, str(tmp_path))
    probe = gpu_check.MemoryProbe()
    announce(StageEstimate("capture expert", 3 * 2**30, 0, "weights", disk_bytes=2**30))
    announce(StageEstimate("rfm", 2**29, 0, "kernel"))
    probe.teardown(_Trainer(), None, "fit")
    parts = [json.loads(line) for line in (tmp_path / "rank0.jsonl").read_text().splitlines()]
    assert [p["part"] for p in parts] == ["setup", "capture expert", "rfm"]
    assert (parts[1]["host_estimate_gib"], parts[1]["device_estimate_gib"]) == (3.0, 0.0)
    assert parts[2]["host_estimate_gib"] == 0.5 and parts[2]["peak_rss"] > 0
    assert parts[0]["peak_device"] is None  # no CUDA here


def test_paper_plan_has_the_claimed_shapes_and_its_config_parses(tmp_path, monkeypatch):
    plan = gpu_check.PAPER
    # Gemma-2-9B and Llama-3.1-8B: width, MLP, query/KV heads and head width; a few blocks of each.
    assert plan.expert == gpu_check.Shape("gemma2", 3584, 14336, 16, 8, 256, 4)
    assert plan.target == gpu_check.Shape("llama", 4096, 14336, 32, 8, 128, 4)
    for side, shape, reverse in (("expert", plan.expert, True), ("target", plan.target, False)):
        config = shape.config(plan.vocab)
        config.save_pretrained(tmp_path / side)  # the config alone: no weights are built
        gpu_check.save_tokenizer(tmp_path / side, gpu_check.vocabulary(plan, reverse))
        read = read_shape(tmp_path / side)
        assert (read.hidden, read.layers, read.intermediate, read.vocab) == (
            shape.hidden,
            shape.blocks,
            shape.intermediate,
            plan.vocab,
        )
        parameters = sum(p.numel() for p in gpu_check._meta_model(shape, plan.vocab).parameters())
        assert abs(read.parameters - parameters) / parameters < 1e-3  # the estimator counts these models' weights
        assert 0.75e9 < parameters < 0.9e9  # 4 blocks of 0.2B each and embeddings: 1.5-1.7 GiB in bfloat16

    stage = gpu_check.stage_config(plan, tmp_path, "gpu")
    assert stage["trainer"]["accelerator"] == "gpu" and stage["model"]["target_dtype"] == "bfloat16"
    assert stage["data"]["expert"]["dtype"] == stage["data"]["target"]["dtype"] == "bfloat16"
    path = tmp_path / "config.json"
    path.write_text(json.dumps(stage))
    monkeypatch.setenv(gpu_check.PROBE_ENV, str(tmp_path / "probe"))
    cli = ESLightningCLI(
        ExpertSteer,
        PairedHiddenStatesDataModule,
        run=False,
        auto_configure_optimizers=False,
        args=["--config", str(path), *([] if torch.cuda.is_available() else ON_CPU)],
    )
    assert cli.datamodule.expert_spec.name == str(tmp_path / "expert")
    assert cli.model.evaluation.max_questions == plan.eval_questions and cli.model.evaluation.folds == 2
    probe = next(c for c in cli.trainer.callbacks if isinstance(c, gpu_check.MemoryProbe))
    probe.teardown(cli.trainer, cli.model, "fit")  # removes its log handler


def test_ddp_runs_only_where_asked_or_two_gpus_are_visible():
    assert gpu_check.ddp_skipped("auto", "cuda", 1) and gpu_check.ddp_skipped("auto", "cpu", 0)
    assert gpu_check.ddp_skipped("auto", "cuda", 2) is None and gpu_check.ddp_skipped("on", "cpu", 0) is None
    assert gpu_check.ddp_skipped("off", "cuda", 8) == "--ddp off"


def _parts(stdout: str, stage: str) -> set[str]:
    """The part names of ``stage``'s rows in the printed table, without their ``(xN)`` counts."""
    return {
        line.split("|")[2].split(" (x")[0].strip() for line in stdout.splitlines() if line.startswith(f"| {stage} |")
    }


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """The dry run, once: tiny models on CPU, every stage in one process, the work folder kept."""
    work = tmp_path_factory.mktemp("gpu-check")
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_check.py"),
            "--dry-run",
            "--work",
            str(work),
            "--out",
            str(work / "out"),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return done, work


def test_dry_run_prints_every_stage_part_and_throughput(dry_run):
    done, work = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for stage, parts in PARTS.items():
        assert parts <= _parts(out, stage), (stage, _parts(out, stage))
    batches = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ") and "[" in line]
    assert batches == [str(b) for b in gpu_check.TINY.throughput_batches]
    assert "2-process DDP fit skipped: a dry run" in out and "gpu_check: done" in out
    results = json.loads((work / "out" / "results.json").read_text())
    assert [s["stage"] for s in results["stages"]] == list(gpu_check.STAGES)
    assert all(r["steered_tokens_per_s"] > 0 for r in results["throughput"])
    assert (work / "runs" / gpu_check.RUN / "predictions.jsonl").is_file()


@pytest.mark.ddp
def test_dry_run_ddp_fit_reports_both_ranks(dry_run, tmp_path):
    _, work = dry_run
    result = gpu_check.run_process("fit-ddp", gpu_check.ddp_arguments(work / "config.json", work), work, tmp_path)
    assert sorted(result["ranks"]) == [0, 1]
    rows = gpu_check.stage_rows({**result, "stage": "fit, DDP rank 0"}, 0)
    assert any("| capture expert |" in row for row in rows) and "whole process" in rows[-1]
