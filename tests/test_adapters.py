"""Row adapters (gsm8k_mc, pubmedqa) and where the default data comes from (resolve_data_path)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from es_lightning.data import resolve
from es_lightning.data.adapters import ADAPTERS, adapt_rows, trim_context
from es_lightning.data.examples import ExampleFormat, questions_from_rows
from es_lightning.data.resolve import resolve_data_path, truthfulqa_mc1_rows

SHARED = Path("/work/shared/data")

GSM = [
    {
        "question": "Natalia sold clips to 48 friends in April and half as many in May. How many in total?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72",
    },
    {
        "question": "Weng earns $12 an hour. She babysat 50 minutes. How much did she earn?",
        "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nShe earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10",
    },
    {
        "question": "A farm has 1,200 hens and buys 300 more. How many hens?",
        "answer": "1,200 + 300 = <<1200+300=1500>>1,500\n#### 1,500",
    },
    {"question": "Tom has 3 apples and eats 3. How many are left?", "answer": "3-3=<<3-3=0>>0\n#### 0"},
    {"id": "custom-7", "question": "What is 7 times 6?", "answer": "7*6=<<7*6=42>>42\n#### 42"},
]
FINALS = ["72", "10", "1500", "0", "42"]


def _load_jsonl(path: Path, n: int) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            rows.append(json.loads(line))
            if len(rows) == n:
                break
    return rows


# --------------------------------------------------------------------------------------- gsm8k_mc
def test_gsm8k_correct_answer_once_and_distinct_numbers():
    out = adapt_rows(GSM, "gsm8k_mc", seed=0)
    assert [r["id"] for r in out] == ["gsm8k-0", "gsm8k-1", "gsm8k-2", "gsm8k-3", "custom-7"]
    for row, final in zip(out, FINALS):
        assert set(row) == {"id", "question", "choices", "answer"}  # the worked solution is gone
        assert len(row["choices"]) == 4 and row["choices"][row["answer"]] == final
        assert row["choices"].count(final) == 1
        values = [float(c) for c in row["choices"]]
        assert len(set(values)) == 4 and all(v >= 0 and v == int(v) for v in values)
        assert all(c == str(int(float(c))) for c in row["choices"])  # canonical "42", no commas
    # the adapted rows are valid multiple-choice rows
    questions = questions_from_rows(out, ExampleFormat(), "gsm8k")
    assert questions[0].prompt == "Question: " + GSM[0]["question"] + "\nAnswer:"


def test_gsm8k_deterministic_and_seed_changes_order():
    a = adapt_rows(GSM, "gsm8k_mc", seed=3)
    assert a == adapt_rows(GSM, "gsm8k_mc", seed=3)
    seeds = [adapt_rows(GSM, "gsm8k_mc", seed=s) for s in range(6)]
    assert len({json.dumps([r["choices"] for r in out]) for out in seeds}) > 1
    assert len({tuple(r["answer"] for r in out) for out in seeds}) > 1


def test_gsm8k_n_distractors_and_bad_options():
    out = adapt_rows(GSM, "gsm8k_mc", n_distractors=5)
    assert all(len(r["choices"]) == 6 and len(set(r["choices"])) == 6 for r in out)
    with pytest.raises(ValueError, match="n_distractors"):
        adapt_rows(GSM, "gsm8k_mc", n_distractors=0)
    with pytest.raises(ValueError, match="accepts"):
        adapt_rows(GSM, "gsm8k_mc", distractors=3)
    with pytest.raises(ValueError, match="Unknown data adapter"):
        adapt_rows(GSM, "gsm8k")
    assert adapt_rows(GSM, None) == GSM and set(ADAPTERS) >= {"gsm8k_mc", "pubmedqa"}


@pytest.mark.parametrize("answer", ["She has 5 apples.", "#### about five", "7*6=42\n####"])
def test_gsm8k_malformed_answer_names_the_row(answer):
    rows = GSM[:2] + [{"question": "q?", "answer": answer}]
    with pytest.raises(ValueError, match=r"row 3\b.*####"):
        adapt_rows(rows, "gsm8k_mc")


def test_gsm8k_missing_field_names_the_row():
    with pytest.raises(KeyError, match="row 2 has no 'answer'"):
        adapt_rows([GSM[0], {"question": "q?"}], "gsm8k_mc")


@pytest.mark.skipif(not (SHARED / "gsm8k_train.jsonl").is_file(), reason="shared GSM8K data not present")
def test_gsm8k_on_real_rows_is_fair():
    rows = _load_jsonl(SHARED / "gsm8k_train.jsonl", 200)
    out = adapt_rows(rows, "gsm8k_mc", seed=0)
    ranks, positions = Counter(), Counter()
    for row, adapted in zip(rows, out):
        final = row["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        choices = adapted["choices"]
        assert choices[adapted["answer"]] == final
        assert final not in [c for i, c in enumerate(choices) if i != adapted["answer"]]
        values = [float(c) for c in choices]
        assert len(set(values)) == len(values) == 4
        assert row["answer"].split("####")[0].strip() not in json.dumps(adapted)  # no worked solution
        ranks[sorted(values).index(values[adapted["answer"]])] += 1
        positions[adapted["answer"]] += 1
    # the answer is not always the smallest / largest / a middle value, nor always at one position
    assert all(ranks[r] > 0.15 * len(out) for r in range(4)), ranks
    assert all(positions[p] > 0.15 * len(out) for p in range(4)), positions


# --------------------------------------------------------------------------------------- pubmedqa
PUB = [
    {
        "id": "p1",
        "question": "Does X help?",
        "context": "X was given. It helped.",
        "choices": ["yes", "no", "maybe"],
        "answer": 0,
    },
    {
        "id": "p2",
        "question": "Does Y help?",
        "context": "Y was given.",
        "choices": ["yes", "no", "maybe"],
        "answer": 2,
        "long_answer": "Unclear.",
    },
]


def test_pubmedqa_passes_valid_rows_unchanged():
    out = adapt_rows(PUB, "pubmedqa")
    assert out == PUB and out[0] is not PUB[0]
    fmt = ExampleFormat(prompt_template="Context: {context}\nQuestion: {question}\nAnswer (yes, no or maybe):")
    assert questions_from_rows(out, fmt, "pubmedqa")[1].prompt.startswith("Context: Y was given.\n")


@pytest.mark.parametrize(
    "bad, error", [({}, KeyError), ({"context": ["a", "b"]}, ValueError), ({"context": "  "}, ValueError)]
)
def test_pubmedqa_bad_context_names_the_row(bad, error):
    row = {k: v for k, v in PUB[1].items() if k != "context"} | bad
    with pytest.raises(error, match="row 2"):
        adapt_rows([PUB[0], row], "pubmedqa")


def test_pubmedqa_trims_long_context_at_sentence_end():
    sentences = [f"Sentence number {i} says something about the trial." for i in range(60)]
    long = " ".join(sentences)
    out = adapt_rows([{**PUB[0], "context": long}], "pubmedqa", max_context_chars=500)
    trimmed = out[0]["context"]
    assert len(trimmed) <= 500 and trimmed.endswith("trial.") and long.startswith(trimmed)
    assert len(trimmed) > 400  # kept as much as fits
    assert adapt_rows([{**PUB[0], "context": long}], "pubmedqa", max_context_chars=None)[0]["context"] == long
    assert len(adapt_rows([{**PUB[0], "context": long}], "pubmedqa")[0]["context"]) <= 2000  # default 2000
    with pytest.raises(ValueError, match="max_context_chars"):
        adapt_rows(PUB, "pubmedqa", max_context_chars=0)


def test_trim_context_without_sentence_end():
    text = "word " * 200
    cut = trim_context(text, 53)
    assert len(cut) <= 53 and cut.endswith("word...")
    assert trim_context("short.", 100) == "short."


# --------------------------------------------------------------------------------------- resolve
def _write_mc(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


MC_ROW = {"id": "q0", "question": "Q?", "choices": ["a", "b"], "answer": 1}


def _no_hub(monkeypatch):
    def fail(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'truthfulqa/truthful_qa' on the Hub (offline)")

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", fail)
    monkeypatch.setattr(resolve, "_hub_reachable", lambda timeout=3.0: None)


def test_resolve_existing_path_is_returned(tmp_path, monkeypatch):
    data = _write_mc(tmp_path / "mine.jsonl", [MC_ROW])
    assert resolve_data_path(str(data), search_from=tmp_path, hub=None) == str(data)
    monkeypatch.chdir(tmp_path)
    assert resolve_data_path("mine.jsonl", search_from=tmp_path, hub=None) == "mine.jsonl"  # relative to the cwd
    assert resolve_data_path("org/some_dataset", hub=None) == "org/some_dataset"  # a `datasets` id: untouched


def test_resolve_finds_shared_data_in_or_beside_the_checkout_only(tmp_path, monkeypatch):
    shared = _write_mc(tmp_path / "shared" / "data" / "truthfulqa_mc.jsonl", [MC_ROW])
    checkout = tmp_path / "main"
    (checkout / "configs").mkdir(parents=True)
    assert resolve_data_path(None, search_from=checkout, hub=None) == str(shared)
    # a shipped config's "../shared/data/..." run from anywhere: found beside the checkout the package lives in
    monkeypatch.setattr(resolve, "_checkout_dir", lambda: checkout)
    monkeypatch.chdir(checkout / "configs")
    assert resolve_data_path("../shared/data/truthfulqa_mc.jsonl", hub=None) == str(shared)
    # another configured file name is looked up under its own name, never swapped for TruthfulQA
    other = _write_mc(tmp_path / "shared" / "data" / "pubmedqa_pqal.jsonl", [MC_ROW])
    assert resolve_data_path("nowhere/pubmedqa_pqal.jsonl", search_from=checkout) == str(other)
    inside = _write_mc(checkout / "shared" / "data" / "pubmedqa_pqal.jsonl", [MC_ROW])  # in the checkout comes first
    assert resolve_data_path("nowhere/pubmedqa_pqal.jsonl", search_from=checkout) == str(inside)
    # never further up than the start's parent folder: tmp_path/shared is two levels above main/configs
    with pytest.raises(FileNotFoundError) as info:
        resolve_data_path(None, search_from=checkout / "configs", hub=None)
    tried = [
        str(checkout / "configs" / "shared" / "data" / "truthfulqa_mc.jsonl"),
        str(checkout / "shared" / "data" / "truthfulqa_mc.jsonl"),
    ]
    assert f"{tried[0]}, {tried[1]}: none exists" in str(info.value) and str(shared) not in str(info.value)


def test_truthfulqa_mc1_conversion():
    hf = [
        {"question": "Q1?", "mc1_targets": {"choices": ["right", "wrong", "also wrong"], "labels": [1, 0, 0]}},
        {"question": "Q2?", "mc1_targets": {"choices": ["no", "yes"], "labels": [0, 1]}},
    ]
    rows = truthfulqa_mc1_rows(hf)
    assert rows == [
        {"id": "truthfulqa-0", "question": "Q1?", "choices": ["right", "wrong", "also wrong"], "answer": 0},
        {"id": "truthfulqa-1", "question": "Q2?", "choices": ["no", "yes"], "answer": 1},
    ]
    shuffled = truthfulqa_mc1_rows(hf, seed=0)
    assert [r["choices"][r["answer"]] for r in shuffled] == ["right", "yes"]
    with pytest.raises(ValueError, match="exactly one label 1"):
        truthfulqa_mc1_rows([{"question": "Q?", "mc1_targets": {"choices": ["a", "b"], "labels": [1, 1]}}])


def test_resolve_uses_hub_and_caches(tmp_path, monkeypatch):
    import datasets

    calls = []
    hf = [
        {"question": "Q1?", "mc1_targets": {"choices": ["right", "wrong", "bad"], "labels": [1, 0, 0]}},
        {"question": "Q2?", "mc1_targets": {"choices": ["x", "y"], "labels": [0, 1]}},
    ]

    def fake_load(name, config=None, split=None, **kwargs):
        calls.append((name, config, split))
        return hf

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.setattr(resolve, "_hub_reachable", lambda timeout=3.0: None)
    empty = tmp_path / "main"
    empty.mkdir()
    got = resolve_data_path(None, search_from=empty, cache_dir=tmp_path / "cache")
    assert got == str(tmp_path / "cache" / "data" / "truthfulqa_mc1.jsonl")
    assert calls == [("truthfulqa/truthful_qa", "multiple_choice", "validation")]
    rows = [json.loads(line) for line in Path(got).read_text().splitlines()]
    assert [r["choices"][r["answer"]] for r in rows] == ["right", "y"]
    assert len(questions_from_rows(rows, ExampleFormat(), got)) == 2
    assert resolve_data_path(None, search_from=empty, cache_dir=tmp_path / "cache") == got and len(calls) == 1  # cached


def test_resolve_error_names_all_three_places(tmp_path, monkeypatch):
    _no_hub(monkeypatch)
    empty = tmp_path / "main"
    empty.mkdir()
    monkeypatch.chdir(empty)  # the configured relative path must not exist from the current directory
    with pytest.raises(FileNotFoundError) as info:
        resolve_data_path("../shared/data/truthfulqa_mc.jsonl", search_from=empty, cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert "'../shared/data/truthfulqa_mc.jsonl'" in message and "does not exist" in message
    assert str(empty / "shared" / "data" / "truthfulqa_mc.jsonl") in message
    assert str(tmp_path / "shared" / "data" / "truthfulqa_mc.jsonl") in message
    assert "truthfulqa/truthful_qa" in message and "ConnectionError" in message and "Fix:" in message


def test_resolve_unreachable_hub_fails_fast(tmp_path, monkeypatch):
    import datasets

    def never(*args, **kwargs):
        raise AssertionError("load_dataset must not be called when the Hub is unreachable")

    monkeypatch.setattr(datasets, "load_dataset", never)
    monkeypatch.setattr(
        resolve, "_hub_reachable", lambda timeout=3.0: "the Hub (huggingface.co:443) is unreachable: no DNS"
    )
    empty = tmp_path / "main"  # searched in and beside: both inside tmp_path, whatever lies above it
    with pytest.raises(FileNotFoundError, match="unreachable: no DNS"):
        resolve_data_path(None, search_from=empty, cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="skipped"):
        resolve_data_path(None, search_from=empty, hub=None, cache_dir=tmp_path / "cache")


def test_hub_probe_respects_offline_mode(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve._hub_reachable() is None  # offline: let `datasets` fail fast (or use its own cache)
