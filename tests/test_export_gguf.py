"""The gguf export through es-lightning-export: the control vector holds what the hooks add, per block."""

from __future__ import annotations

import torch

from es_lightning.export.cli import main as export_main
from es_lightning.export.source import steering_deltas
from es_lightning.models.loading import fingerprint_model_dir
from es_lightning.steering.bundle import ModelIdentity, SteeringBundle, load_control_vector_gguf


def _run(folder, model_dir, layers):
    generator = torch.Generator().manual_seed(3)
    target = ModelIdentity(str(model_dir), fingerprint_model_dir(model_dir), "llama")
    bundle = SteeringBundle.from_directions(
        "mean_difference",
        {j: torch.randn(32, generator=generator) for j in layers},
        {j: 2.0 + j for j in layers},
        target,
    )
    bundle.save(folder / "bundles" / "mean_difference.safetensors")
    return bundle


def test_gguf_export_holds_the_hook_deltas(tmp_path, tiny_llama_dir):
    bundle = _run(tmp_path / "run", tiny_llama_dir, (1, 3))
    out = tmp_path / "cv.gguf"
    assert (
        export_main(
            ["gguf", str(tmp_path / "run"), "--method", "mean_difference", "--coefficient", "-0.25", "-o", str(out)]
        )
        == 0
    )
    vector = load_control_vector_gguf(out)
    assert vector.model_hint == "llama" and sorted(vector.directions) == [1, 3]
    for layer, delta in steering_deltas(bundle, -0.25).items():
        torch.testing.assert_close(vector.directions[layer], delta, rtol=1e-6, atol=1e-7)


def test_gguf_export_refuses_block_zero_and_writes_nothing(tmp_path, tiny_llama_dir, capsys):
    _run(tmp_path / "run", tiny_llama_dir, (0, 2))
    out = tmp_path / "cv.gguf"
    assert (
        export_main(
            [
                "gguf",
                str(tmp_path / "run" / "bundles" / "mean_difference.safetensors"),
                "--coefficient",
                "0.1",
                "-o",
                str(out),
            ]
        )
        == 2
    )
    assert "block 0" in capsys.readouterr().err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["run"]
