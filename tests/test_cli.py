"""The es-lightning CLI in-process: fit writes checkpoints, resumption and DDP reproduce a plain run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from es_lightning.cli import build_cli
from es_lightning.steering import SteeringBundle


def load_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_fit_writes_last_checkpoint_with_everything_later_steps_need(run_args, tmp_path):
    build_cli(["fit", *run_args, "--run_name", "r1"])
    run_dir = tmp_path / "runs" / "r1"
    assert (run_dir / "last.ckpt").exists() and (run_dir / "config.yaml").exists()
    assert not list(run_dir.glob("best-*.ckpt"))  # a mid-training checkpoint would carry no pairs or bundles
    ckpt = load_ckpt(run_dir / "last.ckpt")
    meta = ckpt["es_lightning"]
    assert list(meta["layout"]["target"]["layers"]) == [1, 3] and meta["layout"]["expert"]["hidden_size"] == 48
    assert meta["cache_keys"]["data"] and meta["layer_map"]
    assert ckpt["hyper_parameters"]["objective"] == "paired"
    # the pair search ran before training (3 expert x 2 target layers scored) and only its 2 pairs were trained
    pairing = meta["pairing"]
    assert len(pairing["pairs"]) == 2 and len(pairing["mi"]) == 3 and len(pairing["mi"][0]) == 2
    assert ckpt["state_dict"]["alignment.expert_mean"].shape == (2, 48)
    assert {int(i): j for i, j in meta["layer_map"].items()} == {i: j for i, j in pairing["pairs"]}
    assert json.loads((run_dir / "pairing.json").read_text())["pairs"] == pairing["pairs"]
    assert (run_dir / "mi_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(meta["bundles"]) == ["expertsteer", "mean_difference", "random", "rfm_self"]
    bundle = SteeringBundle.load(meta["bundles"]["expertsteer"])
    assert sorted(bundle.vectors) == sorted(j for _, j in pairing["pairs"]) and bundle.layer_pairs == [
        tuple(p) for p in pairing["pairs"]
    ]


def test_fit_with_the_depth_rule_trains_the_same_relative_depth_pairs(run_args, tmp_path):
    build_cli(["fit", *run_args, "--run_name", "depth", "--model.pairing.rule", "depth"])
    run_dir = tmp_path / "runs" / "depth"
    pairing = load_ckpt(run_dir / "last.ckpt")["es_lightning"]["pairing"]
    assert pairing["rule"] == "depth" and pairing["mi"] is None and pairing["pairs"] == pairing["depth_pairs"]
    assert len(pairing["pairs"]) == 2 and pairing["auc"] is not None  # held-out separability is still reported
    assert (run_dir / "mi_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bundle = SteeringBundle.load(load_ckpt(run_dir / "last.ckpt")["es_lightning"]["bundles"]["expertsteer"])
    assert bundle.layer_pairs == [tuple(p) for p in pairing["pairs"]]
    provenance = bundle.provenance
    assert provenance is not None and provenance.pairs == bundle.layer_pairs and provenance.split == "train"
    assert set(provenance.diagnostics) == {str(j) for _, j in bundle.layer_pairs}  # one entry per steered layer


def test_validate_reports_metrics(run_args, tmp_path):
    build_cli(["fit", *run_args, "--run_name", "r2"])
    cli = build_cli(
        ["validate", *run_args, "--run_name", "r2", "--ckpt_path", str(tmp_path / "runs" / "r2" / "last.ckpt")]
    )
    metrics = cli.trainer.callback_metrics
    trained = sorted(cli.model.alignment.layer_map)
    for name in ("val/loss", "val/mse", "val/explained_variance", "val/pair_cosine", f"val/mse/layer{trained[0]}"):
        assert name in metrics
    assert metrics["val/explained_variance"] > 0.5


def test_interrupted_run_resumes_to_the_same_weights_and_step(run_args, tmp_path):
    args = [*run_args, "--trainer.max_epochs", "4", "--data.batch_size", "8"]
    straight = build_cli(["fit", *args, "--run_name", "straight"])
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_cli(
            [
                "fit",
                *args,
                "--run_name",
                "crashed",
                "--trainer.callbacks+=conftest.DieAtStep",
                "--trainer.callbacks.step=7",
            ]
        )
    resumed = build_cli(["fit", *args, "--run_name", "crashed", "--ckpt_path", "last"])
    assert resumed.trainer.global_step == straight.trainer.global_step
    a, b = (
        load_ckpt(tmp_path / "runs" / "straight" / "last.ckpt"),
        load_ckpt(tmp_path / "runs" / "crashed" / "last.ckpt"),
    )
    assert a["optimizer_states"][0]["state"][0]["step"] == b["optimizer_states"][0]["state"][0]["step"]
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=1e-5, atol=1e-6)


def test_resume_with_a_different_cache_is_refused(run_args, tmp_path):
    build_cli(["fit", *run_args, "--run_name", "r3"])
    changed = ["--data.target.layers", "[0, 3]", "--ckpt_path", "last", "--trainer.max_epochs", "5"]
    with pytest.raises(
        ValueError,
        match=r"fitted with other options \(data\.target\.layers: \[1, 3\] -> \[0, 3\]; "
        r"trainer\.max_epochs: 3 -> 5\)",
    ):
        build_cli(["fit", *run_args, "--run_name", "r3", *changed])
    ckpt = str(tmp_path / "runs" / "r3" / "last.ckpt")
    with pytest.raises(ValueError, match="layers \\[0, 3\\]"):  # a stage that reads the checkpoint refuses it too
        build_cli(["validate", *run_args, "--run_name", "r3", "--data.target.layers", "[0, 3]", "--ckpt_path", ckpt])


def test_bad_config_values_are_refused(run_args):
    with pytest.raises(SystemExit):
        build_cli(["fit", *run_args, "--model.objective", "contrastive"])
    with pytest.raises(ValueError, match="layer_map"):
        build_cli(["fit", *run_args, "--model.layer_map", "{0: 1, 1: 1, 2: 7}"])


@pytest.mark.ddp
def test_two_process_ddp_matches_one_process_and_extracts_once(run_args, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent))
    # SGD: Adam's update m/sqrt(v) turns float-rounding noise in near-zero gradients into lr-sized steps.
    common = [
        sys.executable,
        "-m",
        "es_lightning.cli",
        "fit",
        *run_args,
        "--trainer.max_epochs",
        "3",
        "--model.optimizer",
        "torch.optim.SGD",
        "--model.optimizer.lr",
        "0.05",
    ]
    # The train split holds 28 rows: one full batch on one process equals two half batches under DDP.
    one = subprocess.run(
        [*common, "--run_name", "one", "--data.batch_size", "28"], env=env, capture_output=True, text=True
    )
    assert one.returncode == 0, one.stderr[-3000:]
    cache = tmp_path / "cache" / "paired"
    for key_dir in cache.iterdir():
        for shard in key_dir.glob("shard-*.safetensors"):
            shard.unlink()  # force a fresh, distributed extraction with the same key
        (key_dir / "build-log.jsonl").unlink()
    two = subprocess.run(
        [
            *common,
            "--run_name",
            "two",
            "--data.batch_size",
            "14",
            "--trainer.strategy",
            "ddp",
            "--trainer.devices",
            "2",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    log = [
        json.loads(line)
        for key_dir in cache.iterdir()
        for line in (key_dir / "build-log.jsonl").read_text().splitlines()
    ]
    shards = [
        (entry["shard"], entry["side"]) for entry in log
    ]  # each side of each shard built once, by one of the ranks
    assert sorted(shards) == sorted(set(shards)) and {entry["rank"] for entry in log} == {0, 1}
    a, b = load_ckpt(tmp_path / "runs" / "one" / "last.ckpt"), load_ckpt(tmp_path / "runs" / "two" / "last.ckpt")
    assert a["global_step"] == b["global_step"]
    for key in ("alignment.enc_weight", "alignment.enc_bias", "alignment.dec_weight", "alignment.dec_bias"):
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=1e-5, atol=1e-6)


def test_unwritable_or_full_output_fails_before_any_work(run_args, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(PermissionError, match="not writable"):
        build_cli(["fit", *run_args, "--output_dir", str(blocker / "runs")])
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1024, 1024))
    with pytest.raises(OSError, match="MiB free"):
        build_cli(["fit", *run_args, "--run_name", "full"])
    assert not (tmp_path / "cache").exists()  # failed before extracting anything


def test_checkpoints_are_written_atomically(run_args, tmp_path):
    cli = build_cli(["fit", *run_args, "--run_name", "atomic"])
    assert type(cli.trainer.strategy.checkpoint_io).__name__ == "AtomicCheckpointIO"
    assert not list((tmp_path / "runs" / "atomic").glob(".*.tmp"))


def test_fit_into_a_finished_run_folder_is_refused(run_args, tmp_path):
    build_cli(["fit", *run_args, "--run_name", "once"])
    with pytest.raises(FileExistsError, match="--ckpt_path last"):
        build_cli(["fit", *run_args, "--run_name", "once"])


def test_optimizer_and_scheduler_come_from_the_config(run_args, tmp_path):
    cli = build_cli(
        [
            "fit",
            *run_args,
            "--run_name",
            "sched",
            "--model.optimizer",
            "torch.optim.SGD",
            "--model.optimizer.lr",
            "0.01",
            "--model.scheduler",
            "torch.optim.lr_scheduler.CosineAnnealingLR",
            "--model.scheduler.T_max",
            "12",
        ]
    )
    optimizer = cli.trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD)
    scheduler = cli.trainer.lr_scheduler_configs[0].scheduler
    assert isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR) and scheduler.T_max == 12
    assert optimizer.param_groups[0]["lr"] < 0.01  # stepped along the cosine


def test_quiet_and_verbose_go_before_the_subcommand(run_args, tmp_path, capsys):
    build_cli(["--quiet", "fit", *run_args, "--run_name", "q"])
    out = capsys.readouterr().out
    assert (tmp_path / "runs" / "q" / "last.ckpt").exists()
    assert "Steering bundles written" not in out and "WARNING" not in out  # progress hidden, nothing wrong
    build_cli(["fit", *run_args, "--run_name", "d"])
    assert "Steering bundles written" in capsys.readouterr().out  # progress shown by default
    with pytest.raises(ValueError, match="--quiet and --verbose exclude each other"):
        build_cli(["--quiet", "--verbose", "fit", *run_args, "--run_name", "x"])
    build_cli(
        [
            "--verbose",
            "test",
            *run_args,
            "--run_name",
            "d",
            "--ckpt_path",
            str(tmp_path / "runs" / "d" / "last.ckpt"),
            "--verbose",
            "false",
        ]
    )  # the subcommand's own --verbose (Lightning's results table) is untouched
    assert "Test metric" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("program", "change", "expected"),
    [
        ("pipeline", ["--data.data.path", "no/such/file.jsonl"], "No data file 'file.jsonl' found"),
        ("cli", ["--data.target.name", "no-such-model-xyz"], "no-such-model-xyz"),
    ],
)
def test_input_errors_are_one_line_without_a_traceback(run_args, capsys, program, change, expected):
    from es_lightning import cli, pipeline

    main = pipeline.main if program == "pipeline" else cli.main
    command = [*run_args, *change] if program == "pipeline" else ["fit", *run_args, *change]
    with pytest.raises(SystemExit) as ended:
        main(command)
    err = capsys.readouterr().err
    assert ended.value.code == 2 and "Traceback" not in err
    assert any(
        line.startswith(("es-lightning: error: ", "es-lightning-pipeline: error: ")) for line in err.splitlines()
    )
    assert expected in err and "(run again with --verbose for the traceback)" in err
