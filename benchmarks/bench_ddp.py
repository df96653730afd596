"""Benchmark: auto-encoder training throughput (examples/s), 1 process vs 2-process DDP (gloo) on this machine.

Both runs train the same alignment auto-encoders on the same paired cache (built once beforehand, so
extraction is excluded) with the same global batch, through the real `es-lightning fit` CLI. Timing is
taken by a callback from the first to the last training batch of rank 0.

    python benchmarks/bench_ddp.py --rows 4000 --epochs 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class Throughput(Callback):
    """Writes examples/s of the training loop (rank 0) to ``path`` as JSON."""

    def __init__(self, path: str):
        self.path = path
        self.examples = 0
        self.start = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.start is None:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.examples += batch["expert"].shape[0] * trainer.world_size

    def on_train_end(self, trainer, pl_module):
        if trainer.global_rank == 0:
            seconds = time.perf_counter() - self.start
            Path(self.path).write_text(
                json.dumps({"examples": self.examples, "seconds": seconds, "world_size": trainer.world_size})
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=3000, help="multiple-choice questions (2 choices each)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=256, help="global batch size")
    parser.add_argument("--hidden", type=int, default=256, help="width of the tiny expert/target models")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import make_tiny_gpt2, make_tiny_llama, write_two_choice_jsonl

    work = Path(tempfile.mkdtemp(prefix="es-bench-ddp-"))
    expert = make_tiny_gpt2(work / "expert", hidden=args.hidden + 64, layers=6)
    target = make_tiny_llama(work / "target", hidden=args.hidden, layers=8)
    data = write_two_choice_jsonl(work / "data.jsonl", args.rows)
    base = [
        sys.executable,
        "-m",
        "es_lightning.cli",
        "fit",
        "--config",
        str(Path(__file__).resolve().parents[1] / "tests" / "conf" / "tiny.yaml"),
        "--data.expert.name",
        str(expert),
        "--data.target.name",
        str(target),
        "--data.target.layers",
        "null",
        "--data.data.path",
        str(data),
        "--data.cache_dir",
        str(work / "cache"),
        "--output_dir",
        str(work / "runs"),
        "--trainer.max_epochs",
        str(args.epochs),
        "--trainer.callbacks+=bench_ddp.Throughput",
    ]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent))
    results = {}
    for name, extra in (
        ("prepare cache", ["--trainer.max_epochs", "1", "--data.batch_size", str(args.batch)]),
        ("1 process", ["--data.batch_size", str(args.batch)]),
        (
            "2-process DDP",
            ["--data.batch_size", str(args.batch // 2), "--trainer.strategy", "ddp", "--trainer.devices", "2"],
        ),
    ):
        out = work / f"{name.replace(' ', '_')}.json"
        proc = subprocess.run(
            [*base, *extra, "--trainer.callbacks.path", str(out), "--run_name", name.replace(" ", "_")],
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            sys.exit(f"{name} failed:\n{proc.stderr[-4000:]}")
        results[name] = json.loads(out.read_text())
    print(
        f"rows={args.rows * 2} epochs={args.epochs} global batch={args.batch} expert d={args.hidden + 64} "
        f"target d={args.hidden} cpus={os.cpu_count()}"
    )
    print("| run | examples/s |")
    print("|---|---|")
    rate = {}
    for name in ("1 process", "2-process DDP"):
        r = results[name]
        rate[name] = r["examples"] / r["seconds"]
        print(f"| {name} | {rate[name]:.0f} |")
    print(f"DDP / 1 process: {rate['2-process DDP'] / rate['1 process']:.2f}x")


if __name__ == "__main__":
    main()
