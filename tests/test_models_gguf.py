"""A user's .gguf file (or a folder holding one GGUF model, whole or in parts) as a model name."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONF, write_two_choice_jsonl

from es_lightning.cli import build_cli
from es_lightning.models import load_model, loading, resolve_model_dir
from es_lightning.models.loading import FINGERPRINT_FILE

WORDS = ["▁the", "▁cat", "▁dog", "▁is", "▁red", "▁blue", "▁big", "▁small", "▁what", "▁true", "▁and"]
# A sentencepiece ("llama") vocabulary: transformers rebuilds the merges from the scores, so every word's
# prefixes are in it too, scored by length (longer pieces are merged later).
PREFIXES = dict.fromkeys(word[:n] for word in WORDS for n in range(2, len(word) + 1))
PIECES = ["▁", *"abcdefghijklmnopqrstuvwxyz?", *sorted(PREFIXES, key=len)]
TOKENS = ["<unk>", "<s>", "</s>", *dict.fromkeys(PIECES)]
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
IDS = torch.tensor([[1, 40, 52, 7, 60, 2, 19]])


def tiny_llama(seed: int, hidden: int = 32, layers: int = 2):
    """A random-init Llama over :data:`TOKENS`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(TOKENS),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def write_gguf(path: Path, model, split_max_tensors: int = 0) -> list[Path]:
    """Write ``model`` as a float32 llama GGUF with its tokenizer in the metadata, the way llama.cpp's converter
    does (q/k rows permuted); ``split_max_tensors`` writes ``gguf-split`` shards. Returns the written files."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(path, "llama", split_max_tensors=split_max_tensors)
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(len(TOKENS))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(TOKENS)
    writer.add_token_scores([0.0] * 3 + [float(len(token)) for token in TOKENS[3:]])
    writer.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(TOKENS) - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template(CHAT_TEMPLATE)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    for name, tensor in model.state_dict().items():
        module, kind = name.rsplit(".", 1)
        gguf_name = names.get_name(module)
        weights = tensor.numpy().copy()
        if (n_head := heads.get(gguf_name.rsplit(".", 1)[-1])) is not None:
            weights = weights.reshape(n_head, 2, -1, weights.shape[1]).swapaxes(1, 2).reshape(weights.shape)
        writer.add_tensor(f"{gguf_name}.{kind}", weights)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return writer.format_shard_names(path)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def source_model():
    return tiny_llama(seed=0)


@pytest.fixture()
def tiny_gguf(tmp_path, source_model) -> Path:
    path = tmp_path / "src" / "tiny.gguf"
    path.parent.mkdir()
    write_gguf(path, source_model)
    return path


def test_gguf_file_loads_with_the_source_logits_and_tokenizer(tmp_path, tiny_gguf, source_model):
    loaded = load_model(str(tiny_gguf), cache_dir=tmp_path / "cache")
    sha256 = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert loaded.directory == tmp_path / "cache" / "models" / f"gguf-tiny-{sha256[:12]}"
    torch.testing.assert_close(logits(loaded.model), logits(source_model), atol=1e-5, rtol=1e-5)
    record = json.loads((loaded.directory / FINGERPRINT_FILE).read_text())
    assert record["gguf_sha256"] == sha256 and record["source"] == str(tiny_gguf.resolve())
    assert record["gguf_parts"] == [
        {"path": str(tiny_gguf.resolve()), "size": tiny_gguf.stat().st_size, "mtime_ns": tiny_gguf.stat().st_mtime_ns}
    ]
    assert "model.safetensors" in record["files"] and "quantization_config" not in loaded.model.config.to_dict()
    tokenizer = loaded.tokenizer
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("the cat is red").input_ids)
    assert pieces == ["<s>", "▁the", "▁cat", "▁is", "▁red"]
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir() if p.name.endswith(".tmp")] == []


def test_second_load_reuses_the_conversion_without_hashing(tmp_path, tiny_gguf, monkeypatch):
    folder = resolve_model_dir(str(tiny_gguf), tmp_path / "cache")
    weights_mtime = (folder / "model.safetensors").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("reconverted or rehashed a GGUF whose conversion is in the cache")

    monkeypatch.setattr(loading, "gguf_sha256", fail)
    monkeypatch.setattr(loading, "join_gguf_parts", fail)
    assert resolve_model_dir(str(tiny_gguf), tmp_path / "cache") == folder
    monkeypatch.undo()
    # the same bytes with a new mtime are hashed once, found unchanged and not reconverted
    os.utime(tiny_gguf, ns=(tiny_gguf.stat().st_atime_ns, tiny_gguf.stat().st_mtime_ns + 10**9))
    monkeypatch.setattr(loading, "join_gguf_parts", fail)
    assert resolve_model_dir(str(tiny_gguf), tmp_path / "cache") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == weights_mtime
    record = json.loads((folder / FINGERPRINT_FILE).read_text())
    assert record["gguf_parts"][0]["mtime_ns"] == tiny_gguf.stat().st_mtime_ns


def test_changed_gguf_is_converted_again(tmp_path, tiny_gguf, source_model):
    first = load_model(str(tiny_gguf), cache_dir=tmp_path / "cache")
    changed = tiny_llama(seed=1)
    write_gguf(tiny_gguf, changed)
    second = load_model(str(tiny_gguf), cache_dir=tmp_path / "cache")
    assert second.directory != first.directory and second.fingerprint != first.fingerprint
    torch.testing.assert_close(logits(second.model), logits(changed), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(second.model), logits(source_model))


def test_folder_holding_one_gguf_model_whole_or_in_parts(tmp_path, source_model):
    single = tmp_path / "single"
    single.mkdir()
    write_gguf(single / "tiny.gguf", source_model)
    shards = tmp_path / "shards"
    shards.mkdir()
    shard_files = write_gguf(shards / "tiny.gguf", source_model, split_max_tensors=8)
    assert [p.name for p in shard_files] == [f"tiny-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    chunks = tmp_path / "chunks"  # one GGUF cut in byte chunks, as some uploads are
    chunks.mkdir()
    data = (single / "tiny.gguf").read_bytes()
    for i, start in enumerate(range(0, len(data), len(data) // 2 + 1)):
        (chunks / f"tiny-{i + 1:05d}-of-00002.gguf").write_bytes(data[start : start + len(data) // 2 + 1])
    reference = logits(source_model)
    for folder in (single, shards, chunks):
        loaded = load_model(str(folder), cache_dir=tmp_path / "cache")
        torch.testing.assert_close(logits(loaded.model), reference, atol=1e-5, rtol=1e-5)

    # the byte chunks are the single file's bytes: same sha256, same conversion; a part's path brings its siblings
    def resolve(path: Path) -> Path:
        return resolve_model_dir(str(path), tmp_path / "cache")

    assert resolve(chunks) == resolve(single)
    assert resolve(shard_files[0]) == resolve(shards)
    record = json.loads((resolve(shards) / FINGERPRINT_FILE).read_text())
    assert [Path(part["path"]).name for part in record["gguf_parts"]] == [p.name for p in shard_files]


def test_missing_gguf_path_names_the_path_and_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"models/absent\.gguf.*" + re.escape(os.getcwd())):
        resolve_model_dir("models/absent.gguf", tmp_path / "cache")


def test_folder_with_unrelated_ggufs_asks_for_the_file(tmp_path, tiny_gguf):
    folder = tiny_gguf.parent
    (folder / "other-Q8_0.gguf").write_bytes(tiny_gguf.read_bytes())
    listing = r"2 different GGUF models:\n  other-Q8_0\.gguf\n  tiny\.gguf\nFix: name the file"
    with pytest.raises(ValueError, match=listing):
        resolve_model_dir(str(folder), tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_split_model_with_a_missing_part_is_refused(tmp_path, source_model):
    parts = write_gguf(tmp_path / "tiny.gguf", source_model, split_max_tensors=8)
    parts[1].unlink()
    with pytest.raises(FileNotFoundError, match=r"split in 3 parts but part\(s\) 2 are missing"):
        resolve_model_dir(str(tmp_path), tmp_path / "cache")


def test_unsupported_architecture_and_non_gguf_bytes_fail_clearly(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(tmp_path / "enc.gguf", "bert")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"architecture 'bert'.*transformers' GGUF support is what limits this"):
        resolve_model_dir(str(tmp_path / "enc.gguf"), tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir() if not p.name.endswith(".lock")] == []
    pointer = tmp_path / "lfs" / "model.gguf"
    pointer.parent.mkdir()
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(ValueError, match="does not start with the GGUF magic bytes"):
        resolve_model_dir(str(pointer), tmp_path / "cache")


def test_folder_with_config_json_stays_a_transformers_folder(tmp_path, tiny_llama_dir, tiny_gguf):
    folder = tmp_path / "both"
    folder.mkdir()
    for file in tiny_llama_dir.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    (folder / "tiny.gguf").write_bytes(tiny_gguf.read_bytes())
    assert resolve_model_dir(str(folder), tmp_path / "cache") == folder


def test_gguf_models_as_expert_and_target_through_the_cli(tmp_path, tiny_gguf):
    target = tmp_path / "target.gguf"
    write_gguf(target, tiny_llama(seed=3, hidden=40, layers=4))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"id": f"p{i}", "prompt": f"what is the {w} ?"}) + "\n"
            for i, w in enumerate(["cat", "dog", "red"])
        )
    )
    args = [
        "--config",
        str(TINY_CONF),
        "--data.expert.name",
        str(tiny_gguf),
        "--data.target.name",
        str(target),
        "--data.data.path",
        str(write_two_choice_jsonl(tmp_path / "two.jsonl", 20)),
        "--data.cache_dir",
        str(tmp_path / "cache"),
        "--output_dir",
        str(tmp_path / "runs"),
        "--run_name",
        "g",
    ]
    build_cli(["fit", *args])
    ckpt = tmp_path / "runs" / "g" / "last.ckpt"
    layout = torch.load(ckpt, map_location="cpu", weights_only=False)["es_lightning"]["layout"]
    assert (layout["expert"]["hidden_size"], layout["target"]["hidden_size"]) == (32, 40)
    build_cli(["test", *args, "--ckpt_path", str(ckpt)])
    build_cli(["predict", *args, "--ckpt_path", str(ckpt), "--data.predict_data.path", str(prompts)])
    rows = [json.loads(line) for line in (tmp_path / "runs" / "g" / "predictions.jsonl").read_text().splitlines()]
    assert [row["id"] for row in rows if row["method"] == "none"] == ["p0", "p1", "p2"]
    assert sorted(p.name for p in (tmp_path / "cache" / "models").iterdir() if not p.name.startswith(".")) == [
        f"gguf-target-{hashlib.sha256(target.read_bytes()).hexdigest()[:12]}",
        f"gguf-tiny-{hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()[:12]}",
    ]
