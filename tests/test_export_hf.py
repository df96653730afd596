"""The hf export: steering folded into biases gives hook steering's logits and generations, per architecture."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import WORDS, make_tokenizer

from es_lightning.export.cli import main as export_main
from es_lightning.export.hf import RECIPES, export_hf
from es_lightning.export.source import EXPORT_RECORD, load_source, resolve_target
from es_lightning.models.layers import num_layers
from es_lightning.models.loading import fingerprint_model_dir
from es_lightning.steering.bundle import ModelIdentity, SteeringBundle
from es_lightning.steering.hooks import steer

WIDTH = 32


def _config(model_type: str, vocab: int, **special):
    from transformers import (
        Gemma3TextConfig,
        GemmaConfig,
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
        MistralConfig,
        OlmoConfig,
        OPTConfig,
        Qwen2Config,
        Qwen3Config,
    )

    common = dict(
        vocab_size=vocab,
        hidden_size=WIDTH,
        intermediate_size=2 * WIDTH,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **special,
    )
    if model_type == "llama":
        return LlamaConfig(**common)
    if model_type == "qwen3":
        return Qwen3Config(**common, head_dim=8)
    if model_type == "gemma":
        return GemmaConfig(**common, head_dim=8)
    if model_type == "olmo":
        return OlmoConfig(**common)
    if model_type == "qwen2":
        return Qwen2Config(**common)
    if model_type == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if model_type == "gemma3_text":
        return Gemma3TextConfig(**common, head_dim=8, sliding_window=16)
    if model_type == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=WIDTH, n_layer=3, n_head=4, n_positions=64, **special)
    if model_type == "gpt_neox":
        return GPTNeoXConfig(
            vocab_size=vocab,
            hidden_size=WIDTH,
            intermediate_size=2 * WIDTH,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=64,
            **special,
        )
    if model_type == "opt":
        return OPTConfig(
            vocab_size=vocab,
            hidden_size=WIDTH,
            ffn_dim=2 * WIDTH,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=WIDTH,
            **special,
        )
    raise KeyError(model_type)


def make_model(folder, model_type: str, seed: int = 0, **overrides):
    """A random-init tiny causal LM of ``model_type`` with a word-level tokenizer, saved under ``folder``."""
    from transformers import AutoModelForCausalLM

    tokenizer = make_tokenizer(folder, WORDS)
    special = dict(
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    config = _config(model_type, len(tokenizer), **special)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random biases where they exist, so folding into an existing bias is tested too
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.02)
    model.save_pretrained(folder)
    return folder


def make_bundle(folder, model_dir, layers=(0, 2), seed: int = 0, method: str = "expertsteer"):
    """A bundle of random unit vectors for ``model_dir`` saved as ``folder/bundles/<method>.safetensors``."""
    from transformers import AutoConfig

    generator = torch.Generator().manual_seed(seed)
    model_type = AutoConfig.from_pretrained(model_dir).model_type
    target = ModelIdentity(str(model_dir), fingerprint_model_dir(model_dir), model_type)
    bundle = SteeringBundle.from_directions(
        method,
        {layer: torch.randn(WIDTH, generator=generator) for layer in layers},
        {layer: 3.0 + layer for layer in layers},
        target,
    )
    return bundle.save(folder / "bundles" / f"{method}.safetensors")


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


INPUT = torch.tensor([[2, 5, 9, 14, 20, 7, 3, 11], [2, 30, 31, 8, 6, 40, 41, 12]])


@pytest.mark.parametrize("model_type", sorted(RECIPES))
def test_folded_logits_and_generations_equal_hook_steering(tmp_path, model_type):
    model_dir = make_model(tmp_path / "model", model_type)
    bundle_path = make_bundle(tmp_path / "run", model_dir)
    source = load_source(bundle_path, coefficient=0.7)
    out = export_hf(source, tmp_path / "folded", resolve_target(source.bundle))
    original, folded = _load(model_dir), _load(out)
    bundle = source.bundle
    with torch.inference_mode():
        plain = original(INPUT).logits
        with steer(original, **bundle.steering_kwargs(0.7)):
            hooked = original(INPUT).logits
            hooked_gen = original.generate(INPUT, max_new_tokens=8, do_sample=False)
        folded_logits = folded(INPUT).logits
        folded_gen = folded.generate(INPUT, max_new_tokens=8, do_sample=False)
    assert (hooked - plain).abs().max() > 0.1  # the steering changes the logits, so the check below means something
    torch.testing.assert_close(folded_logits, hooked, atol=1e-4, rtol=1e-4)
    assert torch.equal(folded_gen, hooked_gen)
    record = json.loads((out / EXPORT_RECORD).read_text())
    assert record["method"] == "expertsteer" and record["coefficient"] == 0.7 and record["layers"] == [0, 2]
    if RECIPES[model_type].as_llama is not None:  # qwen2 and mistral are written as llama checkpoints
        assert json.loads((out / "config.json").read_text())["model_type"] == "llama"


def test_zero_coefficient_fold_equals_the_unsteered_model(tmp_path):
    model_dir = make_model(tmp_path / "model", "llama")
    source = load_source(make_bundle(tmp_path / "run", model_dir), coefficient=0.0)
    out = export_hf(source, tmp_path / "folded", resolve_target(source.bundle))
    with torch.inference_mode():
        torch.testing.assert_close(_load(out)(INPUT).logits, _load(model_dir)(INPUT).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", ["qwen3", "gemma", "gemma3_text"])
def test_architectures_without_a_foldable_bias_are_refused(tmp_path, model_type):
    model_dir = make_model(tmp_path / "model", model_type)
    bundle_path = make_bundle(tmp_path / "run", model_dir)
    with pytest.raises(ValueError, match="Supported architectures: gpt2, gpt_neox, llama, mistral, opt, qwen2"):
        export_hf(
            load_source(bundle_path, coefficient=0.2),
            tmp_path / "out",
            resolve_target(SteeringBundle.load(bundle_path)),
        )
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize(
    ("model_type", "overrides", "message"),
    [
        ("opt", {"do_layer_norm_before": False}, "do_layer_norm_before=True"),
        ("mistral", {"sliding_window": 16}, "sliding window"),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 16}, "sliding window"),
    ],
)
def test_configs_the_fold_cannot_express_are_refused(tmp_path, model_type, overrides, message):
    model_dir = make_model(tmp_path / "model", model_type, **overrides)
    bundle_path = make_bundle(tmp_path / "run", model_dir)
    with pytest.raises(ValueError, match=message):
        export_hf(
            load_source(bundle_path, coefficient=0.2),
            tmp_path / "out",
            resolve_target(SteeringBundle.load(bundle_path)),
        )


def test_cli_refuses_existing_output_and_foreign_folders(tmp_path, capsys):
    model_dir = make_model(tmp_path / "model", "gpt2")
    make_bundle(tmp_path / "run", model_dir)
    args = ["hf", str(tmp_path / "run"), "--method", "expertsteer", "--coefficient", "0.3", "-o", str(tmp_path / "out")]
    assert export_main(args) == 0
    first = (tmp_path / "out" / "model.safetensors").stat().st_mtime_ns
    assert export_main(args) == 2 and "already exists; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "out" / "model.safetensors").stat().st_mtime_ns == first
    assert export_main([*args[:-1], str(tmp_path / "run"), "--overwrite"]) == 2  # a folder no export wrote
    assert "no earlier export wrote" in capsys.readouterr().err and (tmp_path / "run" / "bundles").is_dir()
    assert export_main([*args, "--overwrite", "--coefficient", "0.5"]) == 0
    assert json.loads((tmp_path / "out" / EXPORT_RECORD).read_text())["coefficient"] == 0.5
    assert num_layers(_load(tmp_path / "out")) == 3


@pytest.mark.slow
def test_smollm2_folded_equals_hook_steering(tmp_path):
    from es_lightning.models import load_model

    loaded = load_model("smollm2-135m-instruct")
    torch.manual_seed(0)
    layers = {12: 140.0, 15: 170.0, 17: 190.0}  # measured mean hidden-state norms
    bundle = SteeringBundle.from_directions(
        "expertsteer",
        {layer: torch.randn(576) for layer in layers},
        layers,
        ModelIdentity.of(loaded),
    )
    bundle.save(tmp_path / "run" / "bundles" / "expertsteer.safetensors")
    source = load_source(tmp_path / "run", "expertsteer", coefficient=0.3)
    out = export_hf(source, tmp_path / "folded", resolve_target(source.bundle))
    folded = _load(out)
    ids = loaded.tokenizer(
        ["Do people only use ten percent of their brains?", "The capital of France is"],
        return_tensors="pt",
        padding=True,
    )
    with torch.inference_mode():
        with steer(loaded.model, **bundle.steering_kwargs(0.3)):
            hooked = loaded.model(**ids).logits
            hooked_gen = loaded.model.generate(**ids, max_new_tokens=12, do_sample=False)
        plain = loaded.model(**ids).logits
        folded_logits = folded(**ids).logits
        folded_gen = folded.generate(**ids, max_new_tokens=12, do_sample=False)
    assert (hooked - plain).abs().max() > 1.0
    torch.testing.assert_close(folded_logits, hooked, atol=2e-3, rtol=1e-4)
    assert torch.equal(folded_gen, hooked_gen)
