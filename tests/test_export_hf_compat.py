"""An hf export read by transformers 4.x (installed apart) gives hook steering's logits, token ids and generations.

transformers 4.x is installed once per version (no torch: the venv's is used) under ``.cache/`` in the repository
and shadows transformers 5 in a subprocess through ``PYTHONPATH``. That subprocess loads each export with plain
``AutoModelForCausalLM``/``AutoTokenizer``; this process compares with hook steering on the unfolded target.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import WORDS, make_tokenizer
from test_export_hf import _config, make_bundle

from es_lightning.export.hf import RECIPES, export_hf
from es_lightning.export.hf_compat import CHECKED_TRANSFORMERS, legacy_config_keys, legacy_tokenizer_keys
from es_lightning.export.source import EXPORT_RECORD, load_source, resolve_target
from es_lightning.io import atomic_directory
from es_lightning.steering.bundle import SteeringBundle
from es_lightning.steering.hooks import steer

CACHE = Path(__file__).resolve().parents[1] / ".cache"
COEFFICIENT = 0.7
PROMPTS = ["the cat is big ?", "<|im_start|> what is the red sun and the blue moon , you know <|im_end|>", "yes ?"]
EXTRA_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|> {{ m['role'] }} : {{ m['content'] }} <|im_end|>{% endfor %}"
CHAT = [{"role": "user", "content": "where is the moon ?"}]
NEW_TOKENS = 6
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
# Every architecture the fold writes, with RoPE settings other than 4.x's defaults (theta 10000, no scaling, gpt_neox
# rotary_pct 0.25), so a 4.x reader that falls back to a default gives other logits.
TARGETS: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {"rope_theta": 100000.0}),
    "llama-llama3-rope": ("llama", {"rope_parameters": LLAMA3_ROPE}),
    "qwen2": ("qwen2", {"rope_theta": 20000.0}),
    "mistral": ("mistral", {"rope_theta": 1000000.0}),
    "gpt_neox": ("gpt_neox", {"rotary_emb_base": 50000.0, "rotary_pct": 0.5}),
    "gpt2": ("gpt2", {}),
    "opt": ("opt", {}),
}
# Weights drawn large in the tiny targets: attention that depends on positions, so RoPE read wrong shows in logits.
ATTENTION_INPUTS = ("q_proj.weight", "k_proj.weight", "query_key_value.weight")

# Runs under transformers 4.x: argv[1] is JSON [folders by name, prompts, chat messages, new tokens, output file].
READER = """
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(1)
folders, prompts, chat_messages, new_tokens, out = json.loads(sys.argv[1])
results = {"version": transformers.__version__}
for name, folder in folders.items():
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = []
    with torch.inference_mode():
        for prompt in prompts:
            encoded = tokenizer(prompt, return_tensors="pt")
            generated = model.generate(**encoded, max_new_tokens=new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id)
            logits = model(**encoded).logits[0]
            rows.append({"ids": encoded.input_ids[0], "logits": logits, "generated": generated[0]})
    chat = tokenizer.apply_chat_template(chat_messages, tokenize=False)
    results[name] = {"rows": rows, "chat": chat, "chat_ids": tokenizer(chat).input_ids}
torch.save(results, out)
"""


def install_transformers(version: str) -> Path:
    """A folder with transformers ``version`` and its pinned dependencies (not torch), installed once under .cache/."""
    folder = CACHE / f"transformers-{version}"
    if (folder / f"transformers-{version}.dist-info").is_dir():
        return folder
    pins = CHECKED_TRANSFORMERS[version]
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-deps",
        "--timeout",
        "20",
        "--retries",
        "2",
        "--target",
    ]
    with atomic_directory(folder) as tmp:
        done = subprocess.run([*command, str(tmp), *pins], check=False, capture_output=True, text=True, timeout=300)
        if done.returncode:
            pytest.fail(
                f"Could not install {' '.join(pins)} to check the hf export under transformers {version}; this test "
                f"needs PyPI once (then it reuses {folder}). pip said:\n{done.stderr[-2000:]}\nFix: give pip access "
                f"to PyPI, or run `pip install --no-deps --target {folder} {' '.join(pins)}` where it has it.",
                pytrace=False,
            )
    return folder


def make_target(folder: Path, model_type: str, rope: dict) -> Path:
    """A random-init tiny ``model_type`` with RoPE settings ``rope`` and a word-level tokenizer with extra special
    tokens and a chat template, saved under ``folder``."""
    from transformers import AutoModelForCausalLM

    tokenizer = make_tokenizer(folder, WORDS)
    tokenizer.add_special_tokens({"additional_special_tokens": EXTRA_SPECIAL_TOKENS})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    special = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(model_type, len(tokenizer), **special, **rope))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):  # folding into an existing bias is checked too
                param.normal_(0, 0.02)
            elif param.dim() == 2:  # logits of order 1 and sharp attention, so a RoPE read wrong shows
                param.normal_(0, 0.5 if name.endswith(ATTENTION_INPUTS) else 0.2)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, tuple[Path, Path, SteeringBundle]]:
    """``{name: (target folder, its export, the bundle exported)}`` for every entry of :data:`TARGETS`."""
    root = tmp_path_factory.mktemp("compat")
    folders = {}
    for name, (model_type, rope) in TARGETS.items():
        target = make_target(root / name / "model", model_type, rope)
        source = load_source(make_bundle(root / name / "run", target), coefficient=COEFFICIENT)
        folded = export_hf(source, root / name / "folded", resolve_target(source.bundle))
        folders[name] = (target, folded, source.bundle)
    return folders


@pytest.fixture(scope="module", params=sorted(CHECKED_TRANSFORMERS))
def read_by_4x(request, exports, tmp_path_factory) -> dict:
    """What transformers 4.x reads from every export: token ids, logits and greedy generations per prompt."""
    version = request.param
    site = install_transformers(version)
    out = tmp_path_factory.mktemp("read") / "results.pt"
    args = [{name: str(folded) for name, (_, folded, _) in exports.items()}, PROMPTS, CHAT, NEW_TOKENS, str(out)]
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(
        [sys.executable, "-c", READER, json.dumps(args)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"transformers {version} could not load the exports:\n{done.stderr[-4000:]}"
    results = torch.load(out, weights_only=True)
    assert results["version"] == version, f"{site} did not shadow the venv's transformers"
    return results


def test_every_foldable_architecture_is_checked():
    assert {model_type for model_type, _ in TARGETS.values()} == set(RECIPES)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_4x_reads_the_export_as_hook_steering(exports, read_by_4x, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target, folded, bundle = exports[name]
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    tokenizer, folded_tokenizer = AutoTokenizer.from_pretrained(target), AutoTokenizer.from_pretrained(folded)
    read = read_by_4x[name]
    for prompt, row in zip(PROMPTS, read["rows"], strict=True):
        encoded = tokenizer(prompt, return_tensors="pt")
        assert encoded.input_ids[0].tolist() == row["ids"].tolist() == folded_tokenizer(prompt).input_ids
        with torch.inference_mode():
            plain = model(**encoded).logits[0]
            with steer(model, **bundle.steering_kwargs(COEFFICIENT)):
                hooked = model(**encoded).logits[0]
                generated = model.generate(
                    **encoded, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )[0]
        assert (hooked - plain).abs().max() > 0.1  # the steering shows, so agreeing with it means something
        torch.testing.assert_close(row["logits"], hooked, atol=1e-3, rtol=0)
        assert row["generated"].tolist() == generated.tolist()
    chat = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert read["chat"] == chat and read["chat_ids"] == tokenizer(chat).input_ids
    record = json.loads((folded / EXPORT_RECORD).read_text())["transformers"]
    assert read_by_4x["version"] in record["checked_with"] and record["written_with"] in record["checked_with"]


def test_legacy_config_keys_carry_the_rope_settings_5x_reads():
    llama = {"model_type": "llama", "dtype": "bfloat16", "rope_parameters": {"rope_type": "default", "rope_theta": 1e5}}
    assert legacy_config_keys(llama) == {"torch_dtype": "bfloat16", "rope_theta": 1e5, "rope_scaling": None}
    scaled = legacy_config_keys({"model_type": "llama", "rope_parameters": LLAMA3_ROPE})
    assert scaled["rope_theta"] == 500000.0 and scaled["rope_scaling"]["rope_type"] == "llama3"
    assert "rope_theta" not in scaled["rope_scaling"]
    neox = {
        "model_type": "gpt_neox",
        "rope_parameters": {"rope_type": "default", "rope_theta": 5e4, "partial_rotary_factor": 0.5},
    }
    assert legacy_config_keys(neox) == {"rotary_emb_base": 5e4, "rotary_pct": 0.5, "rope_scaling": None}
    assert legacy_config_keys({"model_type": "gpt2", "dtype": "float32"}) == {"torch_dtype": "float32"}
    nested = {"model_type": "gemma3_text", "rope_parameters": {"full_attention": {"rope_theta": 1e6}}}
    with pytest.raises(ValueError, match="per layer type"):
        legacy_config_keys(nested)


def test_legacy_tokenizer_keys_rename_5x_only_classes_and_lists():
    written = {"tokenizer_class": "TokenizersBackend", "extra_special_tokens": ["<|im_start|>", "<|im_end|>"]}
    changed, dropped = legacy_tokenizer_keys(written)
    assert changed == {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_input_names": ["input_ids", "attention_mask"],
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
    }
    assert dropped == ["extra_special_tokens"]
    named = {"tokenizer_class": "GPT2Tokenizer", "extra_special_tokens": {"image_token": "<image>"}}
    assert legacy_tokenizer_keys(named) == ({}, [])  # classes and named tokens 4.x knows stay
