"""Memory estimates: parameter counts from configs, how each stage scales, and the errors that name the fix."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from es_lightning.memory import (
    ModelShape,
    RunSettings,
    announce,
    autoencoder_estimate,
    available,
    cache_bytes,
    cache_estimate,
    capture_estimate,
    check,
    check_devices,
    check_fits,
    check_weights_fit,
    estimate_stages,
    evaluation_estimate,
    pair_search_estimate,
    read_shape,
    rfm_estimate,
    shape_from_config,
)

LLAMA_8B = ModelShape(
    "llama-8b", hidden=4096, layers=32, vocab=128256, intermediate=14336, heads=32, kv_heads=8, head_dim=128
)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_gpt2_dir", "tiny_gemma_dir"])
def test_parameter_count_from_the_config_matches_the_model(fixture, request):
    from transformers import AutoModelForCausalLM

    folder = request.getfixturevalue(fixture)
    exact = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(folder).parameters())
    assert read_shape(folder).parameters == pytest.approx(exact, rel=0.02)  # biases and q/k norms left out


def test_llama_8b_parameters_and_weight_bytes():
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=4096,
        num_hidden_layers=32,
        vocab_size=128256,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    )
    shape = shape_from_config(config, "llama")
    assert shape.parameters == 8_030_261_248  # Llama-3.1-8B's published count
    assert shape.weight_bytes("bfloat16") * 2 == shape.weight_bytes("float32")


def test_cache_bytes_double_with_rows_and_halve_in_bfloat16():
    base = cache_estimate(1000, 28, 3584, 32, 4096, "float32")
    assert base.disk_bytes == cache_bytes(1000, 28, 3584, 32, 4096) > 0 and base.device_bytes == 0
    assert cache_estimate(2000, 28, 3584, 32, 4096, "float32").disk_bytes == pytest.approx(
        2 * base.disk_bytes, rel=1e-6
    )
    assert cache_estimate(1000, 28, 3584, 32, 4096, "bfloat16").disk_bytes == pytest.approx(
        base.disk_bytes / 2, rel=1e-3
    )
    assert cache_bytes(1000, 14, 3584, 16, 4096) == pytest.approx(base.disk_bytes / 2, rel=1e-3)
    # writing holds one shard, whatever n: reads are memory-mapped
    assert cache_estimate(4000, 28, 3584, 32, 4096, shard_rows=256).host_bytes == base.host_bytes < base.disk_bytes / 3


def test_rfm_grows_as_n_squared_and_stops_at_the_row_cap():
    small, large = rfm_estimate(20_000, 64, max_rows=None), rfm_estimate(40_000, 64, max_rows=None)
    assert large.host_bytes / small.host_bytes == pytest.approx(4, rel=0.01)  # kernel-dominated at d=64
    assert "kernel n^2" in small.dominant
    assert rfm_estimate(40_000, 64, max_rows=10_000) == rfm_estimate(10_000, 64, max_rows=10_000)


PAPER_BASES = 256 * (28 * 3584 + 32 * 4096) * 8  # every layer's d x p float64 principal directions, p = 256
PAPER_MAPS = (3 * 4 + 8) * 3584 * 4096  # the 3 chosen pairs' float32 maps and one float64 product, at full width


def test_pair_search_is_linear_in_rows_above_its_kept_directions_up_to_its_cap():
    a = pair_search_estimate(1000, 300, 28, 3584, 32, 4096, max_rows=None)
    b = pair_search_estimate(2000, 600, 28, 3584, 32, 4096, max_rows=None)
    assert a.host_bytes > PAPER_BASES and "principal directions" in a.dominant
    fixed = PAPER_BASES + PAPER_MAPS
    assert 1.9 < (b.host_bytes - fixed) / (a.host_bytes - fixed) < 2.3  # linear terms plus the n_fit^2 Gram
    assert pair_search_estimate(8000, 300, 28, 3584, 32, 4096, max_rows=4000) == pair_search_estimate(
        4000, 300, 28, 3584, 32, 4096, max_rows=4000
    )


def test_a_reduced_layer_keeps_its_top_directions_not_a_view_of_every_eigenvector():
    from es_lightning.steering.pair_search import _reduce

    rng = np.random.default_rng(0)
    layer = _reduce(rng.standard_normal((120, 300)), rng.standard_normal((40, 300)), max_components=16)
    assert layer.basis.shape == (300, 16)
    assert layer.basis.base is None  # owns its 300 x 16 floats; a view would keep the 300 x 120 matrix alive


def test_the_rfm_counts_its_float64_d_by_d_matrices_on_the_host_and_the_states_it_holds():
    d = 4096
    gpu = rfm_estimate(500, d, device="cuda")
    assert gpu.host_bytes >= 5 * d * d * 8  # the AGOP rescaled and eigendecomposed in float64 on the host
    assert gpu.device_bytes >= 4 * d * d * 4  # the float32 Mahalanobis matrices and AGOP
    held = rfm_estimate(500, d, device="cuda", inputs_bytes=2**30)
    assert held.host_bytes - gpu.host_bytes == 2**30 and held.device_bytes == gpu.device_bytes


def test_the_closed_form_seed_is_float64_on_the_host_and_the_cpu_peak_is_its_larger_phase():
    gpu = autoencoder_estimate(3, 3584, 4096, 256, 350, "cuda")
    cpu = autoencoder_estimate(3, 3584, 4096, 256, 350, "cpu")
    assert gpu.host_bytes >= 4 * 4096**2 * 8  # Gram, identity, regularised copy and factor of the seed's solve
    assert cpu.host_bytes == max(gpu.host_bytes, gpu.device_bytes) < gpu.host_bytes + gpu.device_bytes


def test_the_run_plan_caches_every_split_and_bounds_a_capture_batch_by_its_rows():
    settings = RunSettings(700, 150, 28, 27, 32, 31, n_test=150, max_length=48)
    cache = next(s for s in estimate_stages(LLAMA_8B, LLAMA_8B, settings) if s.stage == "cache")
    assert cache.disk_bytes == cache_bytes(1000, 28, 4096, 32, 4096)
    by_tokens = next(s for s in estimate_stages(LLAMA_8B, LLAMA_8B, settings) if s.stage == "capture target")
    settings.extract_batch_size = 16  # 16 x 48 tokens, well under the 4096-token budget
    by_rows = next(s for s in estimate_stages(LLAMA_8B, LLAMA_8B, settings) if s.stage == "capture target")
    assert by_rows.host_bytes < by_tokens.host_bytes


def test_accelerator_moves_the_working_set_to_the_device():
    cpu = capture_estimate(LLAMA_8B, "bfloat16", 32, 31, 4096, 256, 256, "target", "cpu")
    gpu = capture_estimate(LLAMA_8B, "bfloat16", 32, 31, 4096, 256, 256, "target", "cuda")
    assert cpu.device_bytes == 0 and gpu.device_bytes > LLAMA_8B.weight_bytes("bfloat16")
    assert gpu.host_bytes >= LLAMA_8B.weight_bytes("bfloat16")  # loading passes the weights through host RAM
    assert "no logits" in cpu.dominant and "weights" in cpu.dominant
    ae = autoencoder_estimate(3, 3584, 4096, 64, 8000, "cuda")
    assert ae.device_bytes > 16 * 3 * 2 * 3584 * 4096  # weights, gradients and two AdamW moments, 4 bytes each


def test_evaluation_counts_the_logits():
    small = evaluation_estimate(LLAMA_8B, "bfloat16", 16, 64, 16, "cuda")
    large = evaluation_estimate(LLAMA_8B, "bfloat16", 32, 64, 16, "cuda")
    logits = 16 * 17 * LLAMA_8B.vocab * 4 * 2
    assert large.device_bytes - small.device_bytes >= logits


def test_evaluation_counts_the_damage_measurement_when_it_is_larger():
    scoring = evaluation_estimate(LLAMA_8B, "bfloat16", 16, 64, 16, "cuda")
    damage = evaluation_estimate(LLAMA_8B, "bfloat16", 16, 64, 16, "cuda", generation_rows=64, generation_tokens=32)
    assert (
        damage.device_bytes - scoring.device_bytes
        >= (32 + 3 * 64) * 33 * LLAMA_8B.vocab * 4 - 16 * 17 * LLAMA_8B.vocab * 8
    )
    assert any("generation.batch_size" in fix for fix in damage.fixes)
    tiny = evaluation_estimate(LLAMA_8B, "bfloat16", 16, 64, 16, "cuda", generation_rows=1, generation_tokens=1)
    assert tiny.device_bytes == scoring.device_bytes  # smaller than the scoring logits: the scoring peak stands


def test_run_plan_lists_every_stage():
    stages = estimate_stages(LLAMA_8B, LLAMA_8B, RunSettings(800, 200, 32, 31, 32, 31))
    assert [s.stage for s in stages] == [
        "capture expert",
        "capture target",
        "cache",
        "pair search",
        "auto-encoders",
        "rfm",
        "evaluation",
    ]
    assert all("GiB" in s.format() for s in stages)


def test_check_fits_names_the_fix_when_memory_is_short(monkeypatch, caplog):
    estimate = rfm_estimate(10_000, 4096)
    with pytest.raises(MemoryError, match=r"rfm stage will not fit.*model\.vectors\.rfm_options\.max_rows"):
        check_fits(estimate, "cpu", host_free=2**20)
    monkeypatch.setattr(check, "host_available_bytes", lambda: 2**20)
    with pytest.raises(MemoryError, match=r"data\.cache_dtype: bfloat16"):
        announce(cache_estimate(10_000, 28, 3584, 32, 4096))
    monkeypatch.setattr(check.shutil, "disk_usage", lambda path: SimpleNamespace(free=0))
    with pytest.raises(MemoryError, match=r"disk .* free under .*data\.cache_dtype: bfloat16"):
        check_fits(cache_estimate(10_000, 28, 3584, 32, 4096), host_free=2**50, disk_path="/nonexistent/cache")
    with pytest.raises(MemoryError, match=r"cuda memory .* free.*model\.target_dtype: bfloat16"):
        check_fits(
            evaluation_estimate(LLAMA_8B, "float32", 16, 64, 16, "cuda"), "cuda", host_free=2**50, device_free=2**30
        )
    monkeypatch.setattr(check, "host_available_bytes", lambda: 2**50)
    with caplog.at_level(logging.INFO, logger="es_lightning.memory.check"):
        assert announce(estimate) is estimate
    assert "Memory estimate, rfm: host" in caplog.text


def test_weights_that_do_not_fit_name_the_dtype_option():
    with pytest.raises(MemoryError, match=r"8\.03B parameters.*data\.target\.dtype: bfloat16"):
        check_weights_fit(LLAMA_8B, "float32", "cpu", "data.target.dtype", free=20 * 2**30)
    with pytest.raises(MemoryError, match="a smaller model") as error:
        check_weights_fit(LLAMA_8B, "bfloat16", "cpu", "data.target.dtype", free=10 * 2**30)
    assert "bfloat16 (half" not in str(error.value)
    check_weights_fit(LLAMA_8B, "bfloat16", "cpu", "data.target.dtype", free=20 * 2**30)


@pytest.mark.parametrize(
    ("devices", "found", "fails"),
    [
        (2, 1, True),
        (1, 1, False),
        ("auto", 0, True),
        ("auto", 2, False),
        ([0, 3], 2, True),
        ("0,1", 2, False),
        (-1, 0, True),
    ],
)
def test_devices_are_checked_against_the_visible_gpus(monkeypatch, devices, found, fails):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: found)
    if fails:
        with pytest.raises(ValueError, match=rf"but {found} are visible.*Fix: --trainer\.devices"):
            check_devices("gpu", devices)
    else:
        check_devices("gpu", devices)
    check_devices("cpu", 8)  # CPU processes are never refused


def test_host_memory_is_read_from_proc():
    free = available.host_available_bytes()
    assert 0 < free < 2**50
    assert available.device_available_bytes("cpu") == free


def _no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the pre-flight check")

    monkeypatch.setattr("es_lightning.models.loading.load_model", refuse)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", refuse)


def one_line_error(command: list[str], capsys) -> str:
    """What ``es-lightning`` prints for an input error: one line naming the problem and its fix, exit status 2."""
    from es_lightning.cli import main

    with pytest.raises(SystemExit) as ended:
        main(command)
    err = capsys.readouterr().err
    assert ended.value.code == 2 and "Traceback" not in err
    return err


def test_more_devices_than_gpus_fails_before_any_model_loads(monkeypatch, run_args, tmp_path, capsys):
    _no_model_loads(monkeypatch)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    err = one_line_error(["fit", *run_args, "--trainer.accelerator", "gpu", "--trainer.devices", "2"], capsys)
    assert "es-lightning: error: trainer.devices=2 asks for 2 gpu device(s), but 0 are visible" in err
    assert not (tmp_path / "cache").exists()


def test_a_model_too_large_for_free_memory_fails_before_loading(monkeypatch, run_args, tmp_path, capsys):
    _no_model_loads(monkeypatch)
    monkeypatch.setattr(check, "device_available_bytes", lambda device: 1000)
    err = one_line_error(["fit", *run_args], capsys)
    assert "in float32, but cpu has 0.00 GiB free. Fix: data.expert.dtype: bfloat16" in err
    assert not list((tmp_path / "cache").rglob("*.safetensors"))


def test_every_long_stage_announces_its_estimate_before_it_runs(run_args, tmp_path, caplog):
    from es_lightning.cli import build_cli

    caplog.set_level(logging.INFO, logger="es_lightning.memory.check")
    build_cli(["fit", *run_args])
    build_cli(["test", *run_args, "--ckpt_path", str(tmp_path / "runs" / "default" / "last.ckpt")])
    stages = [
        r.getMessage().split(",", 1)[1].split(":", 1)[0].strip()
        for r in caplog.records
        if r.getMessage().startswith("Memory estimate")
    ]
    for stage in ("cache", "capture expert", "capture target", "pair search", "auto-encoders", "rfm", "evaluation"):
        assert stage in stages, (stage, stages)
    assert (
        stages.index("capture expert")
        < stages.index("capture target")
        < stages.index("pair search")
        < stages.index("auto-encoders")
    )


def test_an_rfm_too_large_for_the_host_is_refused_naming_max_rows(run_args, tmp_path, monkeypatch):
    from es_lightning.cli import build_cli

    real = check.check_fits

    def small_host_for_rfm(estimate, device="cpu", **kwargs):
        if estimate.stage == "rfm":
            kwargs["host_free"] = 1024
        return real(estimate, device, **kwargs)

    monkeypatch.setattr(check, "check_fits", small_host_for_rfm)
    with pytest.raises(
        MemoryError, match=r"The rfm stage will not fit.*Fix: fewer rows \(model\.vectors\.rfm_options\.max_rows\)"
    ):
        build_cli(["fit", *run_args])


def test_rfm_max_rows_is_a_vectors_option_that_reaches_the_fit(run_args, caplog):
    from es_lightning.cli import build_cli

    caplog.set_level(logging.INFO, logger="es_lightning.steering.rfm")
    build_cli(["fit", *run_args, "--model.vectors.rfm_options", "{max_rows: 20}"])
    assert any("max_rows" in r.getMessage() or "subsampl" in r.getMessage() for r in caplog.records)


def test_the_rfm_runs_on_the_trainer_device_in_the_fit_and_in_every_evaluation_fold(run_args, tmp_path, monkeypatch):
    from es_lightning.cli import build_cli
    from es_lightning.steering import vectors

    devices, real = [], vectors.fit_rfm

    def spy(*args, device=None, **kwargs):
        devices.append(device)
        return real(*args, device=device, **kwargs)

    monkeypatch.setattr(vectors, "fit_rfm", spy)
    build_cli(["fit", *run_args])
    fitted = len(devices)
    build_cli(["test", *run_args, "--ckpt_path", str(tmp_path / "runs" / "default" / "last.ckpt")])
    assert fitted > 0 and len(devices) > fitted  # fit's bundles, then every fold's vectors
    assert all(torch.device(d) == torch.device("cpu") for d in devices), devices  # passed explicitly, never left to X
