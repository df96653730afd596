"""Faults and numbers: a run killed in the callbacks resumes, capture works in every dtype, files stay whole."""

import json

import pytest
import torch

from es_lightning.callbacks import vectors as vector_callback
from es_lightning.cli import build_cli
from es_lightning.models import capture_hidden_states, load_model
from es_lightning.steering import ModelIdentity, SteeringBundle, steer


def test_run_killed_while_computing_vectors_resumes_with_the_same_command(run_args, tmp_path, monkeypatch):
    straight = build_cli(["fit", *run_args, "--run_name", "straight"])
    real = vector_callback.bundles_for

    def dying(*args, **kwargs):
        raise RuntimeError("killed while computing vectors")

    monkeypatch.setattr(vector_callback, "bundles_for", dying)
    with pytest.raises(RuntimeError, match="killed"):
        build_cli(["fit", *run_args, "--run_name", "killed"])
    run_dir = tmp_path / "runs" / "killed"
    assert (run_dir / "pairing.json").exists() and not (run_dir / "bundles").exists()
    monkeypatch.setattr(vector_callback, "bundles_for", real)
    resumed = build_cli(["fit", *run_args, "--run_name", "killed", "--ckpt_path", "last"])
    assert resumed.trainer.global_step == straight.trainer.global_step  # no training step was repeated
    for method in ("expertsteer", "rfm_self", "mean_difference", "random"):
        a = SteeringBundle.load(tmp_path / "runs" / "straight" / "bundles" / f"{method}.safetensors")
        b = SteeringBundle.load(run_dir / "bundles" / f"{method}.safetensors")
        for layer in a.vectors:
            torch.testing.assert_close(a.vectors[layer], b.vectors[layer], rtol=1e-4, atol=1e-5)
    ckpt = torch.load(run_dir / "last.ckpt", weights_only=False)
    assert sorted(ckpt["es_lightning"]["bundles"]) == ["expertsteer", "mean_difference", "random", "rfm_self"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_capture_and_steering_in_half_precision_match_float32(tiny_llama_dir, dtype):
    full = load_model(str(tiny_llama_dir), dtype="float32")
    half = load_model(str(tiny_llama_dir), dtype=dtype)
    batch = full.tokenizer(["what is the big cat ?", "the dog is red and good"], return_tensors="pt", padding=True)
    a = capture_hidden_states(full.model, batch["input_ids"], batch["attention_mask"], [1, 3])
    b = capture_hidden_states(half.model, batch["input_ids"], batch["attention_mask"], [1, 3])
    assert b.dtype == torch.float32  # the cache always stores float32
    torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)
    vector = torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(0)), dim=0)
    with torch.no_grad():
        with steer(full.model, {2: vector}, 2.0):
            steered_full = full.model(**batch).logits
        with steer(half.model, {2: vector}, 2.0):
            steered_half = half.model(**batch).logits.float()
        plain = full.model(**batch).logits
    torch.testing.assert_close(steered_full, steered_half, rtol=0.05, atol=0.05)
    assert (steered_full - plain).abs().max() > 0.05  # the steering itself is far above the dtype noise


def test_written_json_is_never_half_written(tmp_path, monkeypatch):
    from es_lightning import io

    path = tmp_path / "report.json"
    io.atomic_write_json(path, {"a": 1})

    def broken(tmp):
        tmp.write_text('{"a": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        io.atomic_write_with(path, broken)
    assert json.loads(path.read_text()) == {"a": 1} and not list(tmp_path.glob(".*.tmp"))


def test_prediction_memory_does_not_grow_with_the_number_of_prompts(run_args, tmp_path):
    import tracemalloc

    build_cli(["fit", *run_args, "--run_name", "load"])
    ckpt = str(tmp_path / "runs" / "load" / "last.ckpt")
    filler = " ".join(["the big old tree is green and the small dog is red"] * 8)

    def peak(n: int) -> int:
        # Parquet: read by Arrow without a Python-side copy of the file (the JSON loader's read buffer would
        # itself grow with the file up to its 10 MB chunk, which is input loading, not prediction).
        import pyarrow as pa
        import pyarrow.parquet as pq

        prompts = tmp_path / f"prompts-{n}.parquet"
        pq.write_table(
            pa.table({"id": [f"p{i}" for i in range(n)], "prompt": [f"{filler} {i} ?" for i in range(n)]}), prompts
        )
        tracemalloc.start()
        build_cli(
            [
                "predict",
                *run_args,
                "--run_name",
                "load",
                "--data.predict_data.path",
                str(prompts),
                "--data.batch_size",
                "50",
                "--model.predict.methods",
                "[expertsteer]",
                "--model.generation.max_new_tokens",
                "2",
                "--trainer.callbacks.output_dir",
                str(tmp_path / f"out-{n}"),
                "--ckpt_path",
                ckpt,
            ]
        )
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert sum(1 for _ in open(tmp_path / f"out-{n}" / "predictions.jsonl")) == 2 * n
        return top

    small, large = peak(200), peak(2000)
    print(f"peak traced memory: 200 prompts {small}, 2000 prompts {large}")
    held_rows = 1800 * 2 * len(filler)  # what keeping the extra 1800 prompts' rows in memory would cost at least
    assert large - small < held_rows / 2, (small, large)


def test_truncated_bundle_is_reported_not_used(tmp_path):
    bundle = SteeringBundle(
        "mean_difference", {1: torch.nn.functional.normalize(torch.ones(8), dim=0)}, {1: 2.0}, ModelIdentity("tiny")
    )
    path = bundle.save(tmp_path / "mean_difference.safetensors")
    path.write_bytes(path.read_bytes()[:-20])  # what a crash mid-copy would leave
    with pytest.raises(ValueError):
        SteeringBundle.load(path)
