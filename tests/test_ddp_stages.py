"""Every stage under 2-process DDP (gloo, CPU) against 1 process: fit, test and predict give the same results.

fit: extraction split across ranks (each shard extracted once), auto-encoders trained with DDP, pair search and
vectors on rank 0. test: fold plans spread over the ranks, test questions scored on both ranks, results gathered.
predict: prompts split across ranks, one merged file. The 1-process and 2-process runs use separate caches, so the
2-process run extracts its own cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_cli_args

from es_lightning.steering.bundle import SteeringBundle

N_QUESTIONS = 24  # 48 rows, two choices each; the train split holds TRAIN_ROWS of them
TRAIN_ROWS = 32
METHODS = ["expertsteer", "mean_difference", "random", "rfm_self"]
# Fields of report.json that name paths, checkpoints, bundle files (sha256 of files with their own creation time)
# or times: they differ between runs by construction.
VOLATILE = {"checkpoint", "bundles", "seconds", "created", "path", "paths", "version", "duration_s"}


def bundles_in(folder: Path) -> dict[str, SteeringBundle]:
    """Every ``<method>.safetensors`` bundle of a run's ``bundles/`` folder, keyed by the file's method name."""
    return {path.stem: SteeringBundle.load(path) for path in sorted(folder.glob("*.safetensors"))}


def write_data(path: Path, n_questions: int) -> Path:
    """Two choices per question, the correct one unrelated to the words the tiny random model prefers, so accuracies
    sit near 0.5 with wins and losses (a report of all-correct ties would hide a lost or misplaced result)."""
    subjects = ["cat", "dog", "fish", "bird", "tree", "sun", "moon", "star", "sky", "water"]
    words = ["red", "blue", "green", "big", "small", "old", "new", "good", "bad"]
    with open(path, "w") as handle:
        for q in range(n_questions):
            subject, first, second = subjects[q % 10], words[q % 9], words[(q * 4 + 3) % 9]
            if first == second:
                second = words[(q + 1) % 9]
            row = {
                "id": f"q{q}",
                "question": f"what is the {subject} ?",
                "choices": [f"the {subject} is {first}", f"the {subject} is {second}"],
                "answer": (q * 7 // 3) % 2,
            }
            handle.write(json.dumps(row) + "\n")
    return path


def run_stage(args: list[str], env: dict, label: str) -> float:
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "es_lightning.cli", *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{label} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return time.perf_counter() - start


def strip_volatile(value):
    if isinstance(value, dict):
        return {k: strip_volatile(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [strip_volatile(v) for v in value]
    return value


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.ddp
def test_fit_test_predict_under_two_process_ddp_match_one_process(tmp_path, tiny_gpt2_dir, tiny_llama_dir):
    data = write_data(tmp_path / "two.jsonl", N_QUESTIONS)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"id": f"p{i}", "prompt": f"what is the {w} ?"}) + "\n"
            for i, w in enumerate(["cat", "dog", "sun", "moon", "tree"])
        )
    )
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")
    base = [
        *tiny_cli_args(tiny_gpt2_dir, tiny_llama_dir, data, tmp_path / "runs"),
        "--data.predict_data.path",
        str(prompts),
    ]
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    # SGD: Adam's m/sqrt(v) turns float-rounding noise in near-zero gradients into lr-sized steps. One full batch on
    # one process equals two half batches under DDP (same global batch), so the weights agree to rounding.
    fit = ["--trainer.max_epochs", "2", "--model.optimizer", "torch.optim.SGD", "--model.optimizer.lr", "0.05"]
    runs = {"one": ["--data.batch_size", str(TRAIN_ROWS)], "two": ["--data.batch_size", str(TRAIN_ROWS // 2), *ddp]}
    seconds = {}
    for name, extra in runs.items():
        common = [*base, "--run_name", name, "--data.cache_dir", str(tmp_path / f"cache-{name}"), *extra]
        ckpt = str(tmp_path / "runs" / name / "last.ckpt")
        seconds[f"fit/{name}"] = run_stage(["fit", *common, *fit], env, f"fit ({name})")
        seconds[f"test/{name}"] = run_stage(["test", *common, "--ckpt_path", ckpt], env, f"test ({name})")
        # every method at predict.coefficients: the tiny report's constrained choices may all lie outside the budget
        predict = ["predict", *common, "--ckpt_path", ckpt, "--model.predict.coefficients_from_report", "false"]
        seconds[f"predict/{name}"] = run_stage(predict, env, f"predict ({name})")
    print("stage seconds:", seconds)
    one, two = tmp_path / "runs" / "one", tmp_path / "runs" / "two"

    # fit: the batch size really is the whole train split (else the weight comparison below is meaningless) ...
    ckpt_one = torch.load(one / "last.ckpt", map_location="cpu", weights_only=False)
    ckpt_two = torch.load(two / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt_one["global_step"] == ckpt_two["global_step"] == 2  # one optimiser step per epoch in both runs
    # ... every shard of the 2-process cache was extracted once, by both ranks between them
    log = [
        json.loads(line)
        for key_dir in (tmp_path / "cache-two" / "paired").iterdir()
        for line in (key_dir / "build-log.jsonl").read_text().splitlines()
    ]
    shards = [(entry["shard"], entry.get("side")) for entry in log]  # cache format 2: one file per shard and model
    assert shards and len(shards) == len(set(shards)) and {entry["rank"] for entry in log} == {0, 1}
    # identical pairs (and the MI they were chosen by, to rounding)
    pairing_one, pairing_two = (json.loads((run / "pairing.json").read_text()) for run in (one, two))
    assert pairing_one["pairs"] == pairing_two["pairs"] and len(pairing_one["pairs"]) == 2
    torch.testing.assert_close(torch.tensor(pairing_one["mi"]), torch.tensor(pairing_two["mi"]), rtol=1e-4, atol=1e-5)
    for key in ("alignment.enc_weight", "alignment.enc_bias", "alignment.dec_weight", "alignment.dec_bias"):
        torch.testing.assert_close(ckpt_one["state_dict"][key], ckpt_two["state_dict"][key], rtol=1e-5, atol=1e-6)
    # vectors within tolerance, every method, same layers
    bundles_one, bundles_two = bundles_in(one / "bundles"), bundles_in(two / "bundles")
    assert sorted(bundles_one) == sorted(bundles_two) == METHODS
    for method in METHODS:
        a, b = bundles_one[method], bundles_two[method]
        assert sorted(a.vectors) == sorted(b.vectors) and a.layer_pairs == b.layer_pairs
        for layer in a.vectors:
            torch.testing.assert_close(
                a.vectors[layer], b.vectors[layer], rtol=1e-4, atol=1e-4, msg=f"{method} layer {layer}"
            )
            assert a.norms[layer] == pytest.approx(b.norms[layer], rel=1e-5)

    # test: the same report (accuracies, chosen coefficients, fold plans, tests and p-values), paths and times aside
    report_one, report_two = (json.loads((run / "report" / "report.json").read_text()) for run in (one, two))
    assert report_one["meta"]["fold_plans"] and report_one["datasets"][0]["n_questions"] == N_QUESTIONS
    accuracy = {m["method"]: m["accuracy_mean"]["mean"] for m in report_one["datasets"][0]["methods"]}
    assert 0 < accuracy["none"] < 1, accuracy  # per-question results matter: a lost or misplaced one would show
    assert strip_volatile(report_one) == strip_volatile(report_two)

    # predict: the same rows in the same order (greedy decoding, same bundles and chosen coefficients)
    rows_one, rows_two = read_jsonl(one / "predictions.jsonl"), read_jsonl(two / "predictions.jsonl")
    assert len(rows_one) == 5 * 3 and [r["id"] for r in rows_one][::3] == [f"p{i}" for i in range(5)]
    assert rows_one == rows_two
    assert not (two / "parts").exists()

    # fewer prompts than processes: a clear error on every rank, not Lightning's bare AssertionError or a hang
    single = tmp_path / "single.jsonl"
    single.write_text('{"id": "s0", "prompt": "what is the cat ?"}\n')
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "es_lightning.cli",
            "predict",
            *base,
            "--run_name",
            "two",
            "--data.cache_dir",
            str(tmp_path / "cache-two"),
            *runs["two"],
            "--data.predict_data.path",
            str(single),
            "--trainer.callbacks.output_dir",
            str(tmp_path / "single-out"),
            "--ckpt_path",
            str(two / "last.ckpt"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0 and "Fix: --trainer.devices 1" in result.stderr, result.stderr[-3000:]
