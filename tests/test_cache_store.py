"""The paired cache's storage: one model resident at a time, memory-mapped reads of only the requested rows and
layers, half-precision storage and its refusals, resumption at any point of the two-model build."""

import json
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from es_lightning.data import cache as cache_module
from es_lightning.data.cache import CacheDtypeError
from es_lightning.data.datamodule import DataSource, PairedHiddenStatesDataModule
from es_lightning.models import loading
from es_lightning.models.spec import ModelSpec
from es_lightning.steering.mi import MISettings
from es_lightning.steering.pair_search import PairSearchConfig, search_pairs
from es_lightning.steering.rows import PairedRows


def make_dm(expert_dir, target_dir, data_path, cache_dir, **kwargs):
    return PairedHiddenStatesDataModule(
        ModelSpec(str(expert_dir)),
        ModelSpec(str(target_dir), layers=[1, 3]),
        DataSource(str(data_path)),
        cache_dir=str(cache_dir),
        shard_size=16,
        batch_size=8,
        progress=False,
        **kwargs,
    )


def full_read(dm, side):
    """What format 1's whole-cache load held: every shard's states of one side concatenated."""
    folder = Path(dm.cache_dir) / "paired" / dm.cache_keys["data"]
    return torch.cat(
        [
            load_file(str(folder / f"shard-{s:05d}.{side}.safetensors"))["states"].float()
            for s in range(dm.store.cache.n_shards)
        ]
    )


@pytest.fixture
def built(tiny_gpt2_dir, tiny_llama_dir, mc_jsonl, tmp_path):
    dm = make_dm(tiny_gpt2_dir, tiny_llama_dir, mc_jsonl, tmp_path)
    dm.setup("fit")
    return dm


def test_the_expert_is_freed_before_the_target_is_loaded(
    tiny_gpt2_dir, tiny_llama_dir, mc_jsonl, tmp_path, monkeypatch
):
    real = loading.load_model
    alive: list[tuple[str, weakref.ref]] = []
    events = []

    def spy(name, *args, **kwargs):
        events.append((name, [n for n, ref in alive if ref() is not None]))  # models still in memory at this load
        loaded = real(name, *args, **kwargs)
        alive.append((name, weakref.ref(loaded.model)))
        return loaded

    monkeypatch.setattr(loading, "load_model", spy)
    dm = make_dm(tiny_gpt2_dir, tiny_llama_dir, mc_jsonl, tmp_path)
    dm.setup("fit")
    assert events == [(str(tiny_gpt2_dir), []), (str(tiny_llama_dir), [])]  # each model once, the other one gone
    assert all(ref() is None for _, ref in alive)  # nothing downstream keeps a model


def test_reads_return_exactly_the_requested_layers_and_equal_the_full_read(built):
    dm = built
    expert, target = full_read(dm, "expert"), full_read(dm, "target")
    rows = dm.question_table.split_indices["val"]
    out = dm.states("val", expert_layers=[2, 0], target_layers=[3])
    assert (
        set(out) == {"expert", "target", "label"}
        and out["expert"].shape == (len(rows), 2, 48)
        and out["target"].shape == (len(rows), 1, 32)
    )
    assert out["expert"].dtype == torch.float32
    torch.testing.assert_close(out["expert"], expert[rows][:, [2, 0]], rtol=0, atol=0)
    torch.testing.assert_close(out["target"], target[rows][:, [1]], rtol=0, atol=0)
    assert torch.equal(out["label"], torch.tensor([dm.question_table.examples[i].label for i in rows]))
    assert set(dm.states("train", target_layers=[1])) == {"target", "label"}
    scattered = [70, 3, 40, 41, 17]  # across shards, out of order
    torch.testing.assert_close(
        dm.states(scattered, expert_layers=[1])["expert"][:, 0], expert[scattered][:, 1], rtol=0, atol=0
    )
    with pytest.raises(ValueError, match=r"target layers \[2\] are not in the cache"):
        dm.states("val", target_layers=[2])
    batch = next(iter(dm.val_dataloader()))
    torch.testing.assert_close(batch["target"], target[batch["index"]], rtol=0, atol=0)


def test_pair_search_on_the_store_reads_each_layer_once_and_equals_the_in_memory_search(built, monkeypatch):
    dm = built
    config = PairSearchConfig(rule="highest", top_k=2, max_components=16, mi_options=MISettings(n_components=2))
    layout = dm.layout
    args = (layout.expert_layers, layout.target_layers, layout.expert.num_layers, layout.target.num_layers, config)
    full = dm.states
    in_memory = [
        PairedRows(
            full(s, layout.expert_layers)["expert"],
            full(s, target_layers=layout.target_layers)["target"],
            full(s)["label"],
            dm.split_groups(s),
        )
        for s in ("train", "val")
    ]
    reads = []
    real = type(dm.store).read
    monkeypatch.setattr(
        type(dm.store),
        "read",
        lambda self, side, rows, layers: reads.append((side, tuple(layers))) or real(self, side, rows, layers),
    )
    streamed = [
        PairedRows(dm.layer_rows(s, "expert"), dm.layer_rows(s, "target"), full(s)["label"], dm.split_groups(s))
        for s in ("train", "val")
    ]
    a, b = search_pairs(*in_memory, *args).result, search_pairs(*streamed, *args).result
    assert a.pairs == b.pairs and a.ridge == b.ridge
    torch.testing.assert_close(torch.tensor(a.mi), torch.tensor(b.mi))
    assert all(len(layers) == 1 for _, layers in reads)  # never more than one layer at full width
    assert sorted(reads) == sorted(
        [("expert", (i,)) for i in layout.expert_layers] * 2 + [("target", (j,)) for j in layout.target_layers] * 2
    )


@pytest.mark.parametrize("dtype, tolerance", [("bfloat16", 2**-8), ("float16", 2**-11)])
def test_half_precision_cache_round_trips_and_is_half_the_size(
    built, tiny_gpt2_dir, tiny_llama_dir, mc_jsonl, dtype, tolerance
):
    half = make_dm(tiny_gpt2_dir, tiny_llama_dir, mc_jsonl, built.cache_dir, cache_dtype=dtype)
    half.setup("fit")
    assert half.cache_keys["data"] != built.cache_keys["data"]
    for side in ("expert", "target"):
        exact, rounded = full_read(built, side), half.store.read(side, None, half.store.layers(side))
        assert rounded.dtype == torch.float32
        assert ((rounded - exact).abs() <= tolerance * exact.abs() + 1e-6).all()

    def size(dm) -> int:
        folder = Path(dm.cache_dir) / "paired" / dm.cache_keys["data"]
        return sum(p.stat().st_size for p in folder.glob("*.target.safetensors"))

    assert size(half) < 0.6 * size(built)
    assert (
        json.loads((Path(half.cache_dir) / "paired" / half.cache_keys["data"] / "meta.json").read_text())["cache_dtype"]
        == dtype
    )


def test_a_cache_read_in_another_precision_is_refused_naming_the_fix(
    built, tiny_gpt2_dir, tiny_llama_dir, mc_jsonl, monkeypatch
):
    folder = Path(built.cache_dir) / "paired" / built.cache_keys["data"]
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps(dict(meta, cache_dtype="bfloat16")))
    with pytest.raises(
        CacheDtypeError,
        match="stores hidden states in bfloat16, but this run reads the cache as float32"
        ".*Fix: set data.cache_dtype: bfloat16",
    ):
        make_dm(tiny_gpt2_dir, tiny_llama_dir, mc_jsonl, built.cache_dir).setup("fit")
    (folder / "meta.json").write_text(json.dumps(meta))
    # a shard of this key written in another precision (e.g. copied from elsewhere) is refused, not silently rebuilt
    cache = built.store.cache
    other = cache_module.PairedCache(
        cache.directory.parent.parent, cache.key, cache.n_examples, cache.shard_size, cache.layout, "float16"
    )
    other.write_shard(
        2, "expert", full_read(built, "expert")[other.shard_rows(2)], built.store.labels[list(other.shard_rows(2))]
    )
    with pytest.raises(CacheDtypeError, match="shard-00002.expert.safetensors stores hidden states in float16"):
        make_dm(tiny_gpt2_dir, tiny_llama_dir, mc_jsonl, built.cache_dir).setup("fit")
    # a checkpoint of a float32 cache, resumed or tested with a bfloat16 one
    half = make_dm(tiny_gpt2_dir, tiny_llama_dir, mc_jsonl, Path(built.cache_dir) / "half", cache_dtype="bfloat16")
    half.setup("fit")
    with pytest.raises(CacheDtypeError, match="checkpoint's paired cache stores hidden states in float32.*--ckpt_path"):
        half.load_state_dict(built.state_dict())
    with pytest.raises(ValueError, match="cache_dtype='int8' is not supported"):
        make_dm(tiny_gpt2_dir, tiny_llama_dir, mc_jsonl, built.cache_dir, cache_dtype="int8")


@pytest.mark.parametrize("killed_after", [2, 6], ids=["during the expert side", "during the target side"])
def test_a_build_killed_at_any_point_resumes_with_each_shard_side_extracted_once(
    tiny_gpt2_dir, tiny_llama_dir, mc_jsonl, tmp_path, monkeypatch, killed_after
):
    real = cache_module.PairedCache.write_shard
    calls = {"n": 0}

    def dying(self, *args, **kwargs):
        if calls["n"] == killed_after:
            raise KeyboardInterrupt("killed")
        calls["n"] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cache_module.PairedCache, "write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        make_dm(tiny_gpt2_dir, tiny_llama_dir, mc_jsonl, tmp_path).setup("fit")
    monkeypatch.setattr(cache_module.PairedCache, "write_shard", real)
    loads = []
    monkeypatch.setattr(loading, "load_model", lambda name, *a, **k: loads.append(name) or loaded_model(name, *a, **k))
    resumed = make_dm(tiny_gpt2_dir, tiny_llama_dir, mc_jsonl, tmp_path)
    resumed.setup("fit")
    assert loads == ([str(tiny_gpt2_dir)] if killed_after < 5 else []) + [
        str(tiny_llama_dir)
    ]  # a finished side loads no model
    folder = Path(resumed.cache_dir) / "paired" / resumed.cache_keys["data"]
    log = [json.loads(line) for line in (folder / "build-log.jsonl").read_text().splitlines()]
    assert sorted((e["side"], e["shard"]) for e in log) == sorted(
        (side, s) for side in ("expert", "target") for s in range(5)
    )


loaded_model = loading.load_model


@pytest.mark.parametrize("objective", ["paired", "reconstruction"])
def test_training_reads_only_the_trained_layers_and_learns_what_full_batches_learn(built, monkeypatch, objective):
    import lightning as L

    from es_lightning.module import ExpertSteer

    def fit(serve_all: bool):
        if serve_all:
            monkeypatch.setattr(ExpertSteer, "batch_layers", property(lambda self: None))
        module = ExpertSteer(objective=objective, layer_map={1: 3}, optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
        reads = []
        real = type(built.store).read
        monkeypatch.setattr(
            type(built.store),
            "read",
            lambda self, side, rows, layers: (
                reads.append((side, len(rows), tuple(layers))) or real(self, side, rows, layers)
            ),
        )
        L.Trainer(
            max_epochs=2,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        ).fit(module, datamodule=built)
        monkeypatch.undo()
        return module, {
            r for r in reads if r[1] <= built.batch_size
        }  # batch reads (the seed reads one layer of all train rows)

    subset, subset_reads = fit(False)
    full, full_reads = fit(True)
    assert {layers for side, _, layers in subset_reads if side == "expert"} == {(1,)}
    assert {layers for side, _, layers in subset_reads if side == "target"} <= {(3,), ()}
    assert {layers for _, _, layers in full_reads} == {(0, 1, 2), (1, 3)}
    for name in ("enc_weight", "enc_bias", "dec_weight", "dec_bias"):
        torch.testing.assert_close(getattr(subset.alignment, name), getattr(full.alignment, name), rtol=1e-5, atol=1e-6)
