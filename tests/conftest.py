"""Shared fixtures: tiny random-init models of different widths, families and tokenizers, saved to disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

# Tiny models gain nothing from intra-op threads, and oversubscribed threads make them 100x slower.
torch.set_num_threads(1)

WORDS = (
    "the a an is are was not yes no maybe true false question answer what where who why how "
    "cat dog fish bird tree water fire earth sky sun moon star red blue green big small old new "
    "eat drink run walk see say know think good bad right wrong one two three four five six seven "
    "eight nine ten you we they it this that of in on to from with and or but if then so because"
).split()
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def make_tokenizer(folder: Path, words: list[str], lowercase: bool = True):
    """A word-level tokenizer (PreTrainedTokenizerFast) over ``words`` plus punctuation, saved to ``folder``."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + words + list("?.,:!'\n"))}
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase() if lowercase else normalizers.Sequence([])
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


def make_tiny_llama(folder: Path, hidden: int = 32, layers: int = 4, seed: int = 0) -> Path:
    """A random-init tiny Llama (hidden 32, 4 blocks) with a word-level tokenizer, saved under ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer(folder, WORDS)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def make_tiny_gpt2(folder: Path, hidden: int = 48, layers: int = 3, seed: int = 1) -> Path:
    """A random-init tiny GPT-2 (hidden 48, 3 blocks) with its own word-level vocabulary order, saved under
    ``folder``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = make_tokenizer(folder, list(reversed(WORDS)))
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=hidden,
        n_layer=layers,
        n_head=4,
        n_positions=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def make_tiny_gemma(folder: Path, hidden: int = 40, layers: int = 3, seed: int = 2) -> Path:
    """A random-init tiny Gemma-3 text model (hidden 40, 3 blocks), saved under ``folder``."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = make_tokenizer(folder, WORDS)
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=128,
        sliding_window=16,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    Gemma3ForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_gemma_dir(tmp_path_factory) -> Path:
    return make_tiny_gemma(tmp_path_factory.mktemp("tiny-gemma"))


def write_mc_jsonl(path: Path, n_questions: int = 24, seed: int = 0) -> Path:
    """A small multiple-choice JSONL file in the shared/data format, built from the tiny vocabulary."""
    rng = torch.Generator().manual_seed(seed)
    subjects = ["cat", "dog", "fish", "bird", "tree", "sun", "moon", "star"]
    colours = ["red", "blue", "green"]
    with open(path, "w") as handle:
        for q in range(n_questions):
            subject = subjects[q % len(subjects)]
            size = ["big", "small", "old", "new"][q % 4]
            n_choices = 2 + int(torch.randint(0, 3, (1,), generator=rng))
            choices = [f"the {subject} is {colours[c % 3]} and {'good' if c == 0 else 'bad'}" for c in range(n_choices)]
            answer = int(torch.randint(0, n_choices, (1,), generator=rng))
            choices[answer] = f"the {subject} is {size} and true"
            row = {"id": f"q{q}", "question": f"what is the {size} {subject} ?", "choices": choices, "answer": answer}
            handle.write(json.dumps(row) + "\n")
    return path


@pytest.fixture()
def mc_jsonl(tmp_path) -> Path:
    return write_mc_jsonl(tmp_path / "mc.jsonl")


def write_two_choice_jsonl(path: Path, n_questions: int = 20) -> Path:
    """Multiple choice with exactly two choices per question, so every split has an even number of rows."""
    subjects = ["cat", "dog", "fish", "bird", "tree", "sun", "moon", "star", "sky", "water"]
    with open(path, "w") as handle:
        for q in range(n_questions):
            subject, size = subjects[q % 10], ["big", "small"][q % 2]
            choices = [f"the {subject} is {size} and true", f"the {subject} is red and bad"]
            answer = q % 2
            if answer:
                choices.reverse()
            handle.write(
                json.dumps(
                    {"id": f"q{q}", "question": f"what is the {size} {subject} ?", "choices": choices, "answer": answer}
                )
                + "\n"
            )
    return path


@pytest.fixture()
def offline(monkeypatch):
    """No Hub access: lm-eval, datasets and transformers read only local files."""
    import datasets.config
    import huggingface_hub.constants

    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)


class DieAtStep(Callback):
    """A Lightning callback that kills training at a given global step (simulates a crash)."""

    def __init__(self, step: int = 1):
        self.step = step

    def on_train_batch_end(self, trainer, *args, **kwargs):
        if trainer.global_step >= self.step:
            raise RuntimeError(f"simulated crash at step {trainer.global_step}")


TINY_CONF = Path(__file__).parent / "conf" / "tiny.yaml"


def tiny_job(root: Path, expert: Path, target: Path, n_questions: int = 24) -> tuple[list[str], Path]:
    """Pipeline arguments for a tiny job under ``root`` (two prompts, ``n_questions`` two-choice questions, its own
    cache; the output folder left to the caller) and the prompts file."""
    data = write_two_choice_jsonl(root / "two.jsonl", n_questions)
    prompts = root / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "what is the cat ?"}\n{"id": "b", "prompt": "where is the sun ?"}\n')
    args = ["--config", str(TINY_CONF), "--prompts", str(prompts), "--data.expert.name", str(expert)]
    args += ["--data.target.name", str(target), "--data.data.path", str(data), "--data.cache_dir", str(root / "cache")]
    return args, prompts


def tiny_cli_args(expert: Path, target: Path, data: Path, runs: Path, cache: Path | None = None) -> list[str]:
    """The arguments every tiny run shares: the tiny config, both models, the data file, the output folder and (when
    given) a cache folder of its own."""
    args = ["--config", str(TINY_CONF), "--data.expert.name", str(expert), "--data.target.name", str(target)]
    args += ["--data.data.path", str(data), "--output_dir", str(runs)]
    return args + (["--data.cache_dir", str(cache)] if cache is not None else [])


@pytest.fixture()
def run_args(tmp_path, tiny_gpt2_dir, tiny_llama_dir):
    """CLI arguments for a tiny run: tiny models, 20 two-choice questions, everything under tmp_path."""
    data = write_two_choice_jsonl(tmp_path / "two.jsonl", 20)
    return tiny_cli_args(tiny_gpt2_dir, tiny_llama_dir, data, tmp_path / "runs", tmp_path / "cache")
