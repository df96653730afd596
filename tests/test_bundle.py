"""Steering bundles: exact round trip, atomic writes, validation errors, llama.cpp GGUF export, use with steer()."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from es_lightning import __version__
from es_lightning.models import load_model
from es_lightning.steering.bundle import (
    FORMAT_VERSION,
    ModelIdentity,
    SteeringBundle,
    VectorProvenance,
    load_control_vector_gguf,
    save_bundles,
)
from es_lightning.steering.hooks import steer

WIDTH = 32
TARGET = ModelIdentity("tiny-llama", "0123456789abcdef", "llama")
EXPERT = ModelIdentity("tiny-gemma", "fedcba9876543210", "gemma3_text")


def make_bundle(method: str = "expertsteer", layers=(1, 2, 3), seed: int = 0, **fields) -> SteeringBundle:
    generator = torch.Generator().manual_seed(seed)
    directions = {layer: torch.randn(WIDTH, generator=generator) for layer in layers}
    defaults = dict(
        target=TARGET,
        expert=EXPERT,
        layer_pairs=[(layer - 1, layer) for layer in layers],
        mi=torch.rand(3, 4, generator=generator),
        mi_expert_layers=[0, 1, 2],
        mi_target_layers=[0, 1, 2, 3],
        data_key="data-abc",
        cache_key="cache-xyz",
        provenance=VectorProvenance("paired", [(1, 2)], "train", 0.25, {"2": {"rfm_val_score": 0.75}}),
        extra={"alpha": 0.5, "notes": ["a", "b"], "nested": {"k": 1}},
    )
    norms = {layer: 1.0 / 3.0 + layer for layer in layers}  # not exactly representable in float32
    fields = {**defaults, **fields}
    return SteeringBundle.from_directions(method, directions, norms, fields.pop("target"), **fields)


def assert_same(a: SteeringBundle, b: SteeringBundle) -> None:
    assert a.vectors.keys() == b.vectors.keys()
    assert all(torch.equal(a.vectors[k], b.vectors[k]) and b.vectors[k].dtype == torch.float32 for k in a.vectors)
    assert a.norms == b.norms
    assert (a.mi is None and b.mi is None) or torch.equal(a.mi, b.mi)
    for name in (
        "method",
        "target",
        "expert",
        "layer_pairs",
        "mi_expert_layers",
        "mi_target_layers",
        "data_key",
        "cache_key",
        "package_version",
        "format_version",
        "created_at",
        "provenance",
        "extra",
    ):
        assert getattr(a, name) == getattr(b, name), name


def rewrite(source: Path, target: Path, edit_tensors=None, edit_header=None) -> Path:
    """Copy a bundle file with its tensors and/or metadata header edited."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as handle:
        header = dict(handle.metadata())
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    if edit_tensors:
        edit_tensors(tensors)
    if edit_header:
        edit_header(header)
    save_file(tensors, str(target), metadata=header)
    return target


def test_round_trip_is_exact(tmp_path):
    bundle = make_bundle()
    path = bundle.save(tmp_path / "expertsteer.safetensors")
    loaded = SteeringBundle.load(path)
    assert_same(bundle, loaded)
    assert loaded.layers == [1, 2, 3]
    assert loaded.layer_pairs == [(0, 1), (1, 2), (2, 3)]
    assert loaded.package_version == __version__ and loaded.format_version == FORMAT_VERSION
    assert all(abs(float(v.norm()) - 1) < 1e-6 for v in loaded.vectors.values())


def test_round_trip_without_optional_fields(tmp_path):
    bundle = SteeringBundle(
        method="random", vectors={5: torch.eye(WIDTH)[0]}, norms={5: 7.25}, target=ModelIdentity("m")
    )
    loaded = SteeringBundle.load(bundle.save(tmp_path / "random.safetensors"))
    assert_same(bundle, loaded)
    assert loaded.expert is None and loaded.mi is None and loaded.layer_pairs == []


def test_save_is_atomic(tmp_path, monkeypatch):
    import safetensors.torch

    path = make_bundle(seed=1).save(tmp_path / "b.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["b.safetensors"]
    original = path.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        make_bundle(seed=2).save(path)
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["b.safetensors"]
    monkeypatch.undo()
    with pytest.raises(ValueError, match="JSON-serialisable"):
        make_bundle(extra={"bad": object()}).save(path)
    assert path.read_bytes() == original


def test_load_rejects_wrong_files(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="No steering bundle"):
        SteeringBundle.load(tmp_path / "missing.safetensors")
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, not tensors")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        SteeringBundle.load(text)
    weights = tmp_path / "model.safetensors"
    save_file({"lm_head.weight": torch.zeros(2, 2)}, str(weights))
    with pytest.raises(ValueError, match="not an es-lightning steering bundle"):
        SteeringBundle.load(weights)


def test_load_validates_contents(tmp_path):
    good = make_bundle().save(tmp_path / "good.safetensors")

    def drop_norms(tensors):
        del tensors["norms"]

    def scale_vectors(tensors):
        tensors["vectors"] = tensors["vectors"] * 2

    def drop_row(tensors):
        tensors["vectors"] = tensors["vectors"][:2].contiguous()

    def drop_mi(tensors):
        del tensors["mi"]

    def newer(header):
        header["format_version"] = str(FORMAT_VERSION + 1)

    def broken_json(header):
        header["bundle"] = json.dumps({"method": "expertsteer"})

    cases = [
        (dict(edit_tensors=drop_norms), r"lacks the tensors \['norms'\]"),
        (dict(edit_tensors=scale_vectors), "has norm 2, not 1"),
        (dict(edit_tensors=drop_row), r"3 target layers but vectors of shape \(2, 32\)"),
        (dict(edit_tensors=drop_mi), "the MI matrix mi is missing"),
        (dict(edit_header=newer), "newer than this es-lightning .* Upgrade: pip install -U es-lightning"),
        (dict(edit_header=broken_json), "missing metadata field 'target_layers'"),
    ]
    for i, (edit, message) in enumerate(cases):
        with pytest.raises(ValueError, match=message):
            SteeringBundle.load(rewrite(good, tmp_path / f"bad{i}.safetensors", **edit))


def test_load_checks_the_target_model(tmp_path, tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir))
    identity = ModelIdentity.of(loaded)
    assert identity.architecture == "llama" and identity.fingerprint == loaded.fingerprint
    path = make_bundle().save(tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match="made for target model 'tiny-llama'.*target model here is .*tiny-llama0"):
        SteeringBundle.load(path, expected_target=loaded)
    SteeringBundle.load(path, expected_target=ModelIdentity("renamed", TARGET.fingerprint))  # fingerprint decides
    SteeringBundle.load(path, expected_target=ModelIdentity("tiny-llama"))  # no fingerprint: the name decides
    with pytest.raises(ValueError, match="'other'"):
        SteeringBundle.load(path, expected_target=ModelIdentity("other"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(method="bad/name"), "method name"),
        (dict(method=""), "method name"),
        (dict(vectors={}, norms={}), "at least one target layer"),
        (dict(vectors={-1: torch.eye(WIDTH)[0]}, norms={-1: 1.0}), "ints >= 0"),
        (dict(norms={1: 1.0}), "norms for"),
        (dict(norms={1: 0.0, 2: 1.0}), "finite and positive"),
        (dict(norms={1: math.nan, 2: 1.0}), "finite and positive"),
        (dict(vectors={1: torch.ones(WIDTH), 2: torch.eye(WIDTH)[0]}), "Normalise it first"),
        (dict(vectors={1: torch.eye(WIDTH)[0], 2: torch.eye(WIDTH + 1)[0]}), "same length"),
        (dict(vectors={1: torch.eye(WIDTH), 2: torch.eye(WIDTH)[0]}), "1-D tensor"),
        (dict(layer_pairs=[(0, 1)]), "exactly once"),
        (dict(mi=torch.zeros(2, 2), mi_expert_layers=[0], mi_target_layers=[0, 1]), r"layer lists give \(1, 2\)"),
        (dict(mi_expert_layers=[0]), "mi is missing"),
    ],
)
def test_constructor_validation(change, message):
    base = dict(
        method="mean_difference",
        vectors={1: torch.eye(WIDTH)[0], 2: torch.eye(WIDTH)[1]},
        norms={1: 1.0, 2: 2.0},
        target=TARGET,
    )
    with pytest.raises(ValueError, match=message):
        SteeringBundle(**{**base, **change})


def test_from_directions_rejects_zero_direction():
    with pytest.raises(ValueError, match="zero or not finite"):
        SteeringBundle.from_directions("random", {1: torch.zeros(WIDTH)}, {1: 1.0}, TARGET)


def test_directory_of_bundles(tmp_path):
    bundles = [make_bundle("expertsteer"), make_bundle("mean_difference", expert=None, layer_pairs=[], seed=4)]
    paths = save_bundles(tmp_path / "bundles", bundles)
    assert paths == {bundle.method: tmp_path / "bundles" / f"{bundle.method}.safetensors" for bundle in bundles}
    for bundle in bundles:
        assert_same(bundle, SteeringBundle.load(paths[bundle.method], expected_target=TARGET))
    # a later save of one method replaces its file and leaves the other methods' files in place
    replaced = make_bundle("expertsteer", seed=7)
    save_bundles(tmp_path / "bundles", [replaced])
    assert sorted(path.name for path in (tmp_path / "bundles").iterdir()) == [
        "expertsteer.safetensors",
        "mean_difference.safetensors",
    ]
    assert_same(replaced, SteeringBundle.load(paths["expertsteer"]))
    assert_same(bundles[1], SteeringBundle.load(paths["mean_difference"]))
    with pytest.raises(ValueError, match="one bundle per method"):
        save_bundles(tmp_path / "other", [make_bundle(), make_bundle(seed=1)])
    assert not (tmp_path / "other").exists()  # refused before anything is written


def test_gguf_export_round_trip(tmp_path):
    import gguf

    bundle = make_bundle(layers=(1, 4, 7))
    path = bundle.export_gguf(tmp_path / "control.gguf", coefficient=-2.5)
    assert [p.name for p in tmp_path.iterdir()] == ["control.gguf"]
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "controlvector"
    assert sorted(t.name for t in reader.tensors) == ["direction.1", "direction.4", "direction.7"]
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 and len(t.shape) == 1 for t in reader.tensors)
    control = load_control_vector_gguf(path)
    assert control.model_hint == "llama" and control.layer_count == 3
    assert list(control.directions) == [1, 4, 7]
    for layer, direction in control.directions.items():
        expected = (bundle.vectors[layer].double() * (-2.5 * bundle.norms[layer])).float()
        assert torch.equal(direction, expected)
    hinted = bundle.export_gguf(tmp_path / "hint.gguf", 1.0, model_hint="gemma3")
    assert load_control_vector_gguf(hinted).model_hint == "gemma3"


def test_gguf_export_errors(tmp_path):
    import gguf

    with pytest.raises(ValueError, match="cannot address"):
        make_bundle(layers=(0, 1)).export_gguf(tmp_path / "zero.gguf", 1.0)
    with pytest.raises(ValueError, match="finite number"):
        make_bundle().export_gguf(tmp_path / "nan.gguf", math.nan)
    anonymous = make_bundle(target=ModelIdentity("x"))
    with pytest.raises(ValueError, match="pass model_hint"):
        anonymous.export_gguf(tmp_path / "nohint.gguf", 1.0)
    assert not list(tmp_path.iterdir())
    writer = gguf.GGUFWriter(tmp_path / "model.gguf", "llama")
    writer.add_tensor("token_embd.weight", np.zeros((2, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="not a control vector"):
        load_control_vector_gguf(tmp_path / "model.gguf")


def test_loaded_bundle_steers_like_raw_vectors(tmp_path, tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir))
    model, tokenizer = loaded.model, loaded.tokenizer
    generator = torch.Generator().manual_seed(7)
    raw = {1: 3 * torch.randn(WIDTH, generator=generator), 3: torch.randn(WIDTH, generator=generator)}
    norms = {1: 2.5, 3: 4.0}
    bundle = SteeringBundle.from_directions("rfm_self", raw, norms, ModelIdentity.of(loaded))
    reloaded = SteeringBundle.load(bundle.save(tmp_path / "rfm_self.safetensors"), expected_target=loaded)
    ids = tokenizer(["the cat is big and red"], return_tensors="pt").input_ids
    with torch.no_grad():
        with steer(model, **reloaded.steering_kwargs(1.5), positions="all"):
            from_bundle = model(ids).logits
        with steer(model, {j: v / v.norm() for j, v in raw.items()}, 1.5, norms=norms):
            from_raw = model(ids).logits
        control = load_control_vector_gguf(reloaded.export_gguf(tmp_path / "c.gguf", 1.5))
        with steer(model, control.directions, 1.0):
            from_gguf = model(ids).logits
        plain = model(ids).logits
    assert torch.equal(from_bundle, from_raw)
    assert not torch.allclose(from_bundle, plain, atol=1e-3)
    torch.testing.assert_close(from_gguf, from_bundle, atol=1e-5, rtol=1e-5)
