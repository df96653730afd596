"""Under 2-process DDP (gloo, CPU), a refusal on one rank stops both ranks within seconds with the same message,
whichever rank refuses and whatever the other is doing; and the capture hook checks only real tokens.

Each run goes through a runner script this test writes: it makes one rank's memory check refuse (the estimate
of that stage is made enormous) and records each rank's exit status, error and exit time in ``rank<r>.json``.
Lightning's launcher starts rank 1 with the same command line, so both ranks run the runner.
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
from conftest import tiny_cli_args, write_two_choice_jsonl

from es_lightning.models import capture_hidden_states, load_model

# A rank that did not stop with the other would wait for the collective timeout (30 min by default): ending within
# 30 s of the refusal tells the two apart even on a loaded 2-core machine (a 10 s bound failed there once).
PROMPT = 30

RUNNER = """
import json, os, sys, time
from dataclasses import replace
from pathlib import Path

refusing, out = sys.argv[1], Path(sys.argv[2])
rank = int(os.environ.get("LOCAL_RANK", "0"))  # Lightning's launcher sets it in the ranks it starts
import es_lightning.data.cache as cache
import es_lightning.data.extraction as extraction

def refuse(real):
    def enormous(*args, **kwargs):
        (out / f"refused-rank{rank}").write_text(str(time.time()))
        return replace(real(*args, **kwargs), host_bytes=2**60)
    return enormous

if refusing == "cache":  # rank 0 alone checks the whole cache before any extraction
    extraction.cache_estimate = refuse(extraction.cache_estimate)
elif rank == 1:  # rank 1 refuses to load its model for its shards ...
    extraction.capture_estimate = refuse(extraction.capture_estimate)
else:  # ... while rank 0 is busy with its own, 3 s per shard file
    write = cache.PairedCache.write_shard
    def slow(self, *args, **kwargs):
        write(self, *args, **kwargs)
        with open(out / "shards-rank0", "a") as handle:
            handle.write("1")
        time.sleep(3)
    cache.PairedCache.write_shard = slow

status = {"code": 0, "error": ""}
try:
    from es_lightning.cli import main
    main(sys.argv[3:])
except SystemExit as stop:
    status["code"] = stop.code
except BaseException as error:
    status.update(code=1, error=f"{type(error).__name__}: {error}")
    raise
finally:
    (out / f"rank{rank}.json").write_text(json.dumps({**status, "time": time.time()}))
"""


def run_refusing(tmp_path: Path, refusing: str, tiny_gpt2_dir: Path, tiny_llama_dir: Path) -> tuple[dict, float, str]:
    """A 2-process fit whose ``refusing`` check refuses; returns each rank's record, the refusal time, the output."""
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "runner.py").write_text(RUNNER)
    data = write_two_choice_jsonl(tmp_path / "two.jsonl", 20)
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH")]))
    # --verbose: each rank raises the error itself (without it, an input error ends the command with one line)
    args = [
        "--verbose",
        "fit",
        *tiny_cli_args(tiny_gpt2_dir, tiny_llama_dir, data, tmp_path / "runs", tmp_path / "cache"),
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
        "--trainer.accelerator",
        "cpu",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    result = subprocess.run(
        [sys.executable, str(tmp_path / "runner.py"), refusing, str(out), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode != 0
    deadline = time.monotonic() + 30  # rank 1 is not waited for by rank 0's process: give its record a moment
    while not (out / "rank1.json").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    ranks = {rank: json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)}
    refused = float(next(out.glob("refused-rank*")).read_text())
    return ranks, refused, result.stdout + result.stderr


@pytest.mark.ddp
def test_rank_zero_refusing_the_cache_stops_both_ranks_at_once_with_its_message(
    tmp_path, tiny_gpt2_dir, tiny_llama_dir
):
    start = time.time()
    ranks, refused, output = run_refusing(tmp_path, "cache", tiny_gpt2_dir, tiny_llama_dir)
    for rank, record in ranks.items():
        assert record["code"] != 0, (rank, output[-3000:])
        assert record["error"].startswith("MemoryError: The cache stage will not fit"), (rank, output[-3000:])
        assert record["time"] - refused < PROMPT, (
            f"rank {rank} ended {record['time'] - refused:.1f} s after the refusal"
        )
    assert ranks[0]["error"] == ranks[1]["error"]
    assert max(record["time"] for record in ranks.values()) - start < 2 * PROMPT  # start-up included
    assert "(raised on rank 0; rank 1 stops with it)" in output
    assert not (tmp_path / "out" / "refused-rank1").exists()  # only rank 0 checks the cache


@pytest.mark.ddp
def test_rank_one_refusing_stops_rank_zero_in_the_middle_of_its_own_extraction(tmp_path, tiny_gpt2_dir, tiny_llama_dir):
    ranks, refused, output = run_refusing(tmp_path, "capture", tiny_gpt2_dir, tiny_llama_dir)
    assert ranks[1]["error"].startswith("MemoryError: The capture expert stage will not fit"), output[-3000:]
    assert ranks[0]["error"] == ranks[1]["error"] and ranks[0]["code"] != 0 and ranks[1]["code"] != 0
    written = tmp_path / "out" / "shards-rank0"
    shards = len(written.read_text()) if written.exists() else 0
    assert shards < 4, f"rank 0 wrote all {shards} of its shard files instead of stopping"  # its share: 2 per model
    for rank, record in ranks.items():
        assert record["time"] - refused < PROMPT, (
            f"rank {rank} ended {record['time'] - refused:.1f} s after the refusal"
        )
    assert list((tmp_path / "cache").rglob("*.tmp")) == []


def poison(positions: torch.Tensor):
    """A forward hook that writes NaN into a block's output at ``positions`` ([B, T] booleans)."""

    def hook(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.masked_fill(positions.unsqueeze(-1), float("nan"))
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return hook


def test_capture_ignores_non_finite_values_at_padding_but_not_at_real_tokens(tiny_llama_dir):
    """Some models leave NaN or inf at padded positions (float16 overflow on pad tokens); those are never read."""
    loaded = load_model(str(tiny_llama_dir), dtype="float32")
    texts = ["what is the big cat ?", "the dog"]
    batch = loaded.tokenizer(texts, return_tensors="pt", padding=True, padding_side="right")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (mask == 0).any()
    clean = {pooling: capture_hidden_states(loaded.model, ids, mask, [0], pooling) for pooling in ("last", "mean")}
    block = loaded.model.model.layers[0]
    for where, positions in {"padding": mask == 0, "a real token": mask == 1}.items():
        handle = block.register_forward_hook(poison(positions))
        try:
            for pooling in ("last", "mean"):
                if where == "padding":
                    torch.testing.assert_close(
                        capture_hidden_states(loaded.model, ids, mask, [0], pooling), clean[pooling], rtol=0, atol=0
                    )
                else:
                    with pytest.raises(FloatingPointError, match="block 0"):
                        capture_hidden_states(loaded.model, ids, mask, [0], pooling)
        finally:
            handle.remove()
