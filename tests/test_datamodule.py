"""The paired cache DataModule: shapes, splits, cache keys, resumption, corruption and bad input."""

import json
from pathlib import Path

import pytest
import torch

from es_lightning.data import cache as cache_module
from es_lightning.data.datamodule import DataSource, PairedHiddenStatesDataModule, SplitConfig
from es_lightning.data.examples import ExampleFormat
from es_lightning.models import load_model
from es_lightning.models.capture import capture_texts
from es_lightning.models.spec import ModelSpec


def make_dm(expert_dir, target_dir, data_path, cache_dir, **kwargs):
    expert = kwargs.pop("expert", ModelSpec(str(expert_dir)))
    target = kwargs.pop("target", ModelSpec(str(target_dir), layers=[1, 3]))
    source = kwargs.pop("data", DataSource(str(data_path)))
    return PairedHiddenStatesDataModule(
        expert, target, source, cache_dir=str(cache_dir), shard_size=16, batch_size=8, progress=False, **kwargs
    )


def build_log(dm, side="target"):
    path = Path(dm.cache_dir) / "paired" / dm.cache_keys["data"] / "build-log.jsonl"
    return [entry for line in path.read_text().splitlines() if (entry := json.loads(line))["side"] == side]


def everything(dm, side):
    """Every cached layer of every row of one side, read through the store."""
    return dm.store.read(side, None, dm.store.layers(side))


def test_batches_pair_two_models_of_different_widths_and_tokenizers(tiny_gpt2_dir, tiny_llama_dir, mc_jsonl, tmp_path):
    dm = make_dm(tiny_gpt2_dir, tiny_llama_dir, mc_jsonl, tmp_path)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["expert"].shape == (8, 3, 48) and batch["target"].shape == (8, 2, 32)
    assert batch["expert"].dtype == torch.float32 and batch["label"].shape == (8,)
    assert dm.layout.expert.hidden_size == 48 and dm.layout.target_layers == [1, 3]
    # no question's rows in two splits
    table = dm.question_table
    groups = {name: {table.examples[i].group for i in idx} for name, idx in table.split_indices.items()}
    assert (
        not groups["train"] & groups["val"]
        and not groups["train"] & groups["test"]
        and not groups["val"] & groups["test"]
    )
    assert sum(len(v) for v in table.split_indices.values()) == len(table.examples)
    # each question yields one positive and (choices - 1) negatives
    assert sum(e.label for e in table.examples) == 24


def test_cache_round_trip_equals_fresh_extraction(tiny_gpt2_dir, tiny_llama_dir, mc_jsonl, tmp_path):
    dm = make_dm(tiny_gpt2_dir, tiny_llama_dir, mc_jsonl, tmp_path)
    dm.setup("fit")
    again = make_dm(tiny_gpt2_dir, tiny_llama_dir, mc_jsonl, tmp_path)
    again.setup("fit")
    assert again.cache_keys == dm.cache_keys and len(build_log(again)) == 5  # reused: nothing rebuilt
    loaded = load_model(str(tiny_llama_dir))
    texts = [e.prompt + e.completion for e in dm.question_table.examples[:10]]
    fresh, _ = capture_texts(loaded.model, loaded.tokenizer, texts, [1, 3], "last", batch_size=4)
    torch.testing.assert_close(everything(again, "target")[:10], fresh, rtol=1e-5, atol=1e-5)


def test_changed_template_or_layers_builds_a_new_cache(tiny_gpt2_dir, tiny_llama_dir, mc_jsonl, tmp_path):
    base = make_dm(tiny_gpt2_dir, tiny_llama_dir, mc_jsonl, tmp_path)
    base.setup("fit")
    other_layers = make_dm(
        tiny_gpt2_dir, tiny_llama_dir, mc_jsonl, tmp_path, target=ModelSpec(str(tiny_llama_dir), layers=[0, 3])
    )
    other_layers.setup("fit")
    other_template = make_dm(
        tiny_gpt2_dir,
        tiny_llama_dir,
        mc_jsonl,
        tmp_path,
        data=DataSource(str(mc_jsonl), format=ExampleFormat(prompt_template="Q: {question}\nA:")),
    )
    other_template.setup("fit")
    other_pooling = make_dm(tiny_gpt2_dir, tiny_llama_dir, mc_jsonl, tmp_path, pooling="mean")
    other_pooling.setup("fit")
    keys = {dm.cache_keys["data"] for dm in (base, other_layers, other_template, other_pooling)}
    assert len(keys) == 4


@pytest.mark.parametrize("side", ["expert", "target"])
@pytest.mark.parametrize(
    "change",
    [{"chat_template": True}, {"dtype": "bfloat16"}, {"max_length": 128}, {"block_path": "model.layers"}],
    ids=lambda c: next(iter(c)),
)
def test_cache_key_changes_with_every_setting_that_changes_the_states(side, change):
    from dataclasses import replace

    from es_lightning.models.spec import ModelInfo

    info = ModelInfo("m", "/m", "f" * 16, "llama", 4, 32, (1, 3))
    layout = cache_module.PairedLayout(info, info, "last")
    specs = {"expert": ModelSpec("e"), "target": ModelSpec("t", layers=[1, 3])}
    base = cache_module.cache_key(layout, specs["expert"], specs["target"], "data")
    specs[side] = replace(specs[side], **change)
    assert cache_module.cache_key(layout, specs["expert"], specs["target"], "data") != base


def test_dtype_max_length_and_block_path_reach_the_cache_key(tiny_gpt2_dir, tiny_llama_dir, mc_jsonl, tmp_path):
    target = {"name": str(tiny_llama_dir), "layers": [1, 3]}
    variants = [{}, {"dtype": "bfloat16"}, {"max_length": 64}, {"block_path": "model.layers"}]
    keys = []
    for extra in variants:
        dm = make_dm(tiny_gpt2_dir, tiny_llama_dir, mc_jsonl, tmp_path, target=ModelSpec(**target, **extra))
        dm.setup("fit")
        keys.append(dm.cache_keys["data"])
    assert len(set(keys)) == len(variants)


def test_killed_build_resumes_from_finished_shards(tiny_gpt2_dir, tiny_llama_dir, mc_jsonl, tmp_path, monkeypatch):
    real = cache_module.PairedCache.write_shard
    calls = {"n": 0}

    def dying(self, shard, side, *args, **kwargs):
        if calls["n"] == 7:  # all 5 expert sides and 2 target sides written
            raise KeyboardInterrupt("killed")
        calls["n"] += 1
        return real(self, shard, side, *args, **kwargs)

    monkeypatch.setattr(cache_module.PairedCache, "write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        make_dm(tiny_gpt2_dir, tiny_llama_dir, mc_jsonl, tmp_path).setup("fit")
    monkeypatch.setattr(cache_module.PairedCache, "write_shard", real)
    resumed = make_dm(tiny_gpt2_dir, tiny_llama_dir, mc_jsonl, tmp_path)
    resumed.setup("fit")
    for side in ("expert", "target"):
        assert sorted(entry["shard"] for entry in build_log(resumed, side)) == [
            0,
            1,
            2,
            3,
            4,
        ]  # each shard side extracted once
    assert not list((Path(resumed.cache_dir) / "paired" / resumed.cache_keys["data"]).glob("*.tmp"))
    fresh = make_dm(tiny_gpt2_dir, tiny_llama_dir, mc_jsonl, tmp_path / "fresh")
    fresh.setup("fit")
    for side in ("expert", "target"):
        torch.testing.assert_close(everything(resumed, side), everything(fresh, side))


def test_corrupted_shard_is_rebuilt(tiny_gpt2_dir, tiny_llama_dir, mc_jsonl, tmp_path, caplog):
    dm = make_dm(tiny_gpt2_dir, tiny_llama_dir, mc_jsonl, tmp_path)
    dm.setup("fit")
    shard = Path(dm.cache_dir) / "paired" / dm.cache_keys["data"] / "shard-00001.target.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated, as a crash mid-copy would leave it
    again = make_dm(tiny_gpt2_dir, tiny_llama_dir, mc_jsonl, tmp_path)
    again.setup("fit")
    assert "rebuilt" in caplog.text
    assert [entry["shard"] for entry in build_log(again)].count(1) == 2
    torch.testing.assert_close(everything(again, "target"), everything(dm, "target"))


def test_alignment_source_trains_on_unlabelled_texts(tiny_gpt2_dir, tiny_llama_dir, mc_jsonl, tmp_path):
    texts = tmp_path / "texts.jsonl"
    texts.write_text(
        "".join(json.dumps({"text": f"the {w} is big"}) + "\n" for w in ["cat", "dog", "sun", "moon", "tree"])
    )
    align = DataSource(str(texts), format=ExampleFormat(kind="text", label_field=None, id_field=None))
    dm = make_dm(tiny_gpt2_dir, tiny_llama_dir, mc_jsonl, tmp_path, alignment_data=align)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["expert"].shape[0] == 5 and (batch["label"] == -1).all()
    assert "alignment" in dm.cache_keys


def test_split_from_files(tiny_gpt2_dir, tiny_llama_dir, tmp_path):
    from conftest import write_mc_jsonl

    train = write_mc_jsonl(tmp_path / "train.jsonl", 10, seed=1)
    val = tmp_path / "val.jsonl"
    val.write_text(
        "".join(
            line.replace('"id": "q', '"id": "v') + "\n"
            for line in write_mc_jsonl(tmp_path / "v.jsonl", 4, seed=2).read_text().splitlines()
        )
    )
    dm = make_dm(tiny_gpt2_dir, tiny_llama_dir, train, tmp_path, splits=SplitConfig(val_path=str(val)))
    dm.setup("fit")
    table = dm.question_table
    assert (
        len(table.questions["train"]) == 10 and len(table.questions["val"]) == 4 and table.split_indices["test"] == []
    )


@pytest.mark.parametrize(
    "rows, match",
    [
        ([{"id": "a", "question": "q ?", "choices": ["x", "y"], "answer": 2}], "not a valid index"),
        (
            [
                {"id": "a", "question": "q ?", "choices": ["x", "y"], "answer": 0},
                {"id": "a", "question": "r ?", "choices": ["x", "y"], "answer": 1},
            ],
            "duplicate ids",
        ),
        ([{"id": "a", "question": "", "choices": ["x", "y"], "answer": 0}], "empty"),
        ([{"id": "a", "question": "q ?", "choices": ["x"], "answer": 0}], "at least two"),
    ],
)
def test_bad_multiple_choice_rows(tiny_gpt2_dir, tiny_llama_dir, tmp_path, rows, match):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=match):
        make_dm(tiny_gpt2_dir, tiny_llama_dir, path, tmp_path).setup("fit")


def test_bad_sources(tiny_gpt2_dir, tiny_llama_dir, mc_jsonl, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_dm(tiny_gpt2_dir, tiny_llama_dir, tmp_path / "missing.jsonl", tmp_path).setup("fit")
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    with pytest.raises(ValueError, match="empty"):
        make_dm(
            tiny_gpt2_dir,
            tiny_llama_dir,
            empty,
            tmp_path,
            data=DataSource(str(empty), format=ExampleFormat(kind="text")),
        ).setup("fit")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": "a"}\n{"id": \n')
    with pytest.raises(ValueError, match="broken.jsonl:2"):
        make_dm(tiny_gpt2_dir, tiny_llama_dir, broken, tmp_path).setup("fit")
    with pytest.raises(KeyError, match="no column"):
        make_dm(
            tiny_gpt2_dir,
            tiny_llama_dir,
            mc_jsonl,
            tmp_path,
            data=DataSource(str(mc_jsonl), format=ExampleFormat(kind="text")),
        ).setup("fit")
    one_class = tmp_path / "one.csv"
    one_class.write_text("text,label\n" + "".join(f"the cat {i},1\n" for i in range(20)))
    with pytest.raises(ValueError, match="only one class"):
        make_dm(
            tiny_gpt2_dir,
            tiny_llama_dir,
            one_class,
            tmp_path,
            data=DataSource(str(one_class), format=ExampleFormat(kind="text")),
        ).setup("fit")
    with pytest.raises(ValueError, match="out of range"):
        make_dm(
            tiny_gpt2_dir, tiny_llama_dir, mc_jsonl, tmp_path, target=ModelSpec(str(tiny_llama_dir), layers=[9])
        ).setup("fit")


def test_long_texts_are_truncated_with_one_warning(tiny_gpt2_dir, tiny_llama_dir, mc_jsonl, tmp_path, caplog):
    dm = make_dm(
        tiny_gpt2_dir,
        tiny_llama_dir,
        mc_jsonl,
        tmp_path,
        target=ModelSpec(str(tiny_llama_dir), layers=[1], max_length=8),
    )
    dm.setup("fit")
    assert "truncated from the left" in caplog.text


def test_two_runs_on_one_cache_do_not_collide(tiny_gpt2_dir, tiny_llama_dir, mc_jsonl, tmp_path):
    import subprocess
    import sys

    script = tmp_path / "build.py"
    script.write_text(
        "import sys, torch, hashlib\n"
        "torch.set_num_threads(1)\n"
        "from es_lightning.data.datamodule import DataSource, PairedHiddenStatesDataModule\n"
        "from es_lightning.models.spec import ModelSpec\n"
        f"dm = PairedHiddenStatesDataModule(ModelSpec({str(tiny_gpt2_dir)!r}), "
        f"ModelSpec({str(tiny_llama_dir)!r}, layers=[1, 3]),\n"
        f"    DataSource({str(mc_jsonl)!r}), cache_dir={str(tmp_path / 'cache')!r}, shard_size=8, progress=False)\n"
        "dm.setup('fit')\n"
        "states = [dm.store.read(side, None, dm.store.layers(side)) for side in ('expert', 'target')]\n"
        "print(hashlib.sha256(states[0].numpy().tobytes() + states[1].numpy().tobytes()).hexdigest())\n"
    )
    procs = [
        subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    digests = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert len(digests) == 1
    key_dir = next((tmp_path / "cache" / "paired").iterdir())
    shards = [json.loads(line)["shard"] for line in (key_dir / "build-log.jsonl").read_text().splitlines()]
    assert sorted(shards) == sorted(
        list(range(10)) * 2
    )  # 79 examples / 8 per shard: each built exactly once by one of the runs
    assert not list(key_dir.glob("*.tmp"))


def test_val_split_of_one_class_is_reported(tiny_gpt2_dir, tiny_llama_dir, tmp_path, caplog):
    imbalanced = tmp_path / "imbalanced.csv"
    imbalanced.write_text("text,label\n" + "".join(f"the cat {i},{int(i < 3)}\n" for i in range(40)))
    source = DataSource(str(imbalanced), format=ExampleFormat(kind="text"))
    make_dm(tiny_gpt2_dir, tiny_llama_dir, imbalanced, tmp_path, data=source, splits=SplitConfig(seed=1)).setup("fit")
    assert "val split has labels of only one class" in caplog.text


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_is_made_concrete_and_keys_the_cache_as_such(native, monkeypatch):
    from dataclasses import replace

    from es_lightning.models import loading
    from es_lightning.models.spec import ModelInfo

    monkeypatch.setattr(loading, "_cpu_has_bfloat16", lambda: native)
    concrete = "bfloat16" if native else "float32"
    assert loading.dtype_name("auto") == concrete and loading.resolve_dtype("auto") == getattr(torch, concrete)
    info = ModelInfo("m", "/m", "f" * 16, "llama", 4, 32, (1, 3))
    layout = cache_module.PairedLayout(info, info, "last")
    auto = ModelSpec("t", dtype="auto")
    assert cache_module.cache_key(layout, auto, auto, "d") == cache_module.cache_key(
        layout, *[replace(auto, dtype=concrete)] * 2, "d"
    )
    with pytest.raises(ValueError, match="auto"):
        loading.resolve_dtype("float8")
