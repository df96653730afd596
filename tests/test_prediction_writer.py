"""Prompt dataset and the resumable, streaming prediction writer (fake rows, no LLM)."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import datasets
import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from es_lightning.callbacks.prediction_writer import PartFileError, SteeredPredictionWriter, find_prediction_writer
from es_lightning.data.prompts import PromptDataset, PromptSource, collate_prompts

METHODS = ("expertsteer", "random")
COEFFICIENTS = (0.0, 2.5)
N_PROMPTS = 10
BATCH = 3


def write_prompts(path: Path, n: int = N_PROMPTS, ids: bool = True) -> Path:
    with open(path, "w") as handle:
        for i in range(n):
            row = {"prompt": f"prompt number {i} \u00e9"}
            if ids:
                row["id"] = f"p{i}"
            handle.write(json.dumps(row) + "\n")
    return path


def expected_rows(n: int = N_PROMPTS) -> list[dict]:
    rows = []
    for i in range(n):
        for method, coefficient in ((m, c) for m in METHODS for c in COEFFICIENTS):
            rows.append(
                {
                    "index": i,
                    "id": f"p{i}",
                    "prompt": f"prompt number {i} \u00e9",
                    "output": f"out {i} {method} {coefficient}",
                    "method": method,
                    "coefficient": coefficient,
                }
            )
    return rows


def make_rows(indices, ids, prompts) -> list[dict]:
    """Rows method-major (index innermost): the writer groups them by prompt, keeping each prompt's order."""
    return [
        {
            "index": int(i),
            "id": ident,
            "prompt": prompt,
            "output": f"out {int(i)} {m} {c}",
            "method": m,
            "coefficient": c,
        }
        for m in METHODS
        for c in COEFFICIENTS
        for i, ident, prompt in zip(indices, ids, prompts)
    ]


class Prompts(L.LightningDataModule):
    def __init__(self, path: Path, shuffle: bool = False):
        super().__init__()
        self.prompts = PromptDataset(PromptSource(str(path)))
        self.shuffle = shuffle

    def predict_dataloader(self):
        return DataLoader(self.prompts, batch_size=BATCH, shuffle=self.shuffle, collate_fn=collate_prompts)


class FakeGenerator(L.LightningModule):
    """Resumes like ExpertSteer (the writer says what is done, the dataset drops it) and records what it generated."""

    def __init__(self, crash_at_batch: int | None = None, fingerprint: str = "cfg"):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.crash_at_batch = crash_at_batch
        self.fingerprint = fingerprint
        self.generated: list[int] = []

    def setup(self, stage):
        datamodule = self.trainer.datamodule
        done = find_prediction_writer(self.trainer).start(
            self.trainer, self.fingerprint + datamodule.prompts.fingerprint
        )
        if done:
            datamodule.prompts = datamodule.prompts.without(done)
        if done is None or not len(datamodule.prompts):
            self.trainer.limit_predict_batches = 0

    def predict_step(self, batch, batch_idx):
        if batch_idx == self.crash_at_batch:
            raise RuntimeError(f"simulated crash at batch {batch_idx}")
        indices = [int(i) for i in batch["index"]]
        self.generated.extend(indices)
        return make_rows(indices, batch["id"], batch["prompt"])


def predict(out: Path, prompts: Path, crash_at_batch=None, fingerprint="cfg", shuffle=False):
    writer = SteeredPredictionWriter(str(out))
    module = FakeGenerator(crash_at_batch, fingerprint)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[writer],
        default_root_dir=str(out),
    )
    trainer.predict(module, datamodule=Prompts(prompts, shuffle), return_predictions=False)
    return module, writer


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture()
def prompts_file(tmp_path) -> Path:
    return write_prompts(tmp_path / "prompts.jsonl")


# --- prompt dataset ------------------------------------------------------------------------------------------


def test_prompt_dataset_is_lazy_arrow_and_collates(tmp_path, prompts_file):
    dataset = PromptDataset(PromptSource(str(prompts_file)))
    assert len(dataset) == N_PROMPTS
    assert dataset[3] == {"index": 3, "id": "p3", "prompt": "prompt number 3 \u00e9"}
    assert isinstance(dataset._table, datasets.Dataset)
    assert not any(isinstance(value, (list, tuple)) and len(value) >= N_PROMPTS for value in vars(dataset).values())
    batch = collate_prompts([dataset[0], dataset[1]])
    assert batch["index"].dtype == torch.long and batch["index"].tolist() == [0, 1]
    assert batch["id"] == ["p0", "p1"] and batch["prompt"][1] == "prompt number 1 \u00e9"
    limited = PromptDataset(PromptSource(str(prompts_file), limit=4))
    assert len(limited) == 4 and limited[3]["id"] == "p3"
    no_ids = PromptDataset(PromptSource(str(write_prompts(tmp_path / "noid.jsonl", 3, ids=False))))
    assert [no_ids[i]["id"] for i in range(3)] == ["0", "1", "2"]
    csv = tmp_path / "p.csv"
    csv.write_text("question,qid\nwhat is the sun ?,7\nwho is it ?,9\n")
    from_csv = PromptDataset(PromptSource(str(csv), prompt_field="question", id_field="qid"))
    assert from_csv[1] == {"index": 1, "id": "9", "prompt": "who is it ?"}


def test_prompt_dataset_errors(tmp_path, prompts_file):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PromptDataset(PromptSource(str(tmp_path / "missing.jsonl")))
    with pytest.raises(KeyError, match=r"no column 'question'.*\['prompt', 'id'\].*prompt_field"):
        PromptDataset(PromptSource(str(prompts_file), prompt_field="question"))
    with pytest.raises(KeyError, match="no id column 'qid'.*id_field"):
        PromptDataset(PromptSource(str(prompts_file), id_field="qid"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"prompt": "fine", "id": 1}\n{"prompt": "  ", "id": 2}\n{"prompt": "", "id": 3}\n')
    with pytest.raises(ValueError, match=r"row 1 \(0-based\) has an empty prompt.*2 empty row"):
        PromptDataset(PromptSource(str(empty)))
    duplicated = tmp_path / "dup.jsonl"
    duplicated.write_text('{"prompt": "a", "id": 1}\n{"prompt": "b", "id": 2}\n{"prompt": "c", "id": 1}\n')
    with pytest.raises(ValueError, match=r"not unique: \['1'\].*rows \[0, 2\]"):
        PromptDataset(PromptSource(str(duplicated)))
    assert PromptDataset(PromptSource(str(duplicated), id_field=None))[2]["id"] == "2"
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text('{"prompt": 1}\n')
    with pytest.raises(TypeError, match="not text"):
        PromptDataset(PromptSource(str(numbers)))
    with pytest.raises(ValueError, match="limit"):
        PromptSource(str(prompts_file), limit=0)


# --- prompt dataset: resuming and fingerprint ---------------------------------------------------------------


def test_without_drops_done_prompts_and_keeps_their_index(prompts_file):
    dataset = PromptDataset(PromptSource(str(prompts_file)))
    view = dataset.without({0, 3, 4})
    assert len(view) == N_PROMPTS - 3 and len(dataset) == N_PROMPTS
    assert [view[k]["index"] for k in range(len(view))] == [1, 2, 5, 6, 7, 8, 9]
    assert view[2] == dataset[5]
    assert [item["index"] for item in view.without({1, 9})] == [2, 5, 6, 7, 8]
    with pytest.raises(IndexError):
        view[len(view)]


def test_fingerprint_follows_the_file_bytes_and_the_settings(tmp_path, prompts_file):
    first = PromptDataset(PromptSource(str(prompts_file))).fingerprint
    assert PromptDataset(PromptSource(str(prompts_file))).fingerprint == first
    assert PromptDataset(PromptSource(str(prompts_file), limit=3)).fingerprint != first
    lines = prompts_file.read_text().splitlines()
    prompts_file.write_text("\n".join(lines[:-1] + [lines[-1].replace("number", "numero")]) + "\n")  # same size
    assert PromptDataset(PromptSource(str(prompts_file))).fingerprint != first


# --- writer through a real Trainer ---------------------------------------------------------------------------


def test_writes_one_complete_file_in_input_order(tmp_path, prompts_file):
    module, writer = predict(tmp_path / "out", prompts_file)
    assert read_jsonl(tmp_path / "out" / "predictions.jsonl") == expected_rows()
    assert sorted(module.generated) == list(range(N_PROMPTS))
    assert not (tmp_path / "out" / "parts").exists()
    assert writer.rows_written == N_PROMPTS * len(METHODS) * len(COEFFICIENTS)
    again, _ = predict(tmp_path / "out", prompts_file)  # a finished run of the same configuration: nothing to do
    assert again.generated == [] and read_jsonl(tmp_path / "out" / "predictions.jsonl") == expected_rows()


def test_shuffled_prompts_still_merge_in_input_order(tmp_path, prompts_file):
    torch.manual_seed(1)
    module, _ = predict(tmp_path / "out", prompts_file, shuffle=True)
    assert module.generated != sorted(module.generated)
    assert read_jsonl(tmp_path / "out" / "predictions.jsonl") == expected_rows()


def test_crash_then_resume_equals_uninterrupted_run_without_regenerating(tmp_path, prompts_file):
    with pytest.raises(RuntimeError, match="simulated crash at batch 2"):
        predict(tmp_path / "out", prompts_file, crash_at_batch=2)
    assert not (tmp_path / "out" / "predictions.jsonl").exists()
    assert (tmp_path / "out" / "parts" / "rank0.jsonl").exists()
    resumed, _ = predict(tmp_path / "out", prompts_file)
    assert resumed.generated == list(range(2 * BATCH, N_PROMPTS))  # batches 0 and 1 are not generated again
    assert read_jsonl(tmp_path / "out" / "predictions.jsonl") == expected_rows()
    assert not (tmp_path / "out" / "parts").exists()


def test_everything_written_but_not_merged_is_merged_without_generating(tmp_path, prompts_file):
    # a run that wrote every prompt and died before merging leaves only parts: rebuild them from a finished run
    module, writer = predict(tmp_path / "again", prompts_file)
    parts = tmp_path / "again" / "parts"
    parts.mkdir()
    rows = read_jsonl(tmp_path / "again" / "predictions.jsonl")
    (parts / "rank0.jsonl").write_text(
        "".join(json.dumps({"index": i, "rows": [r for r in rows if r["index"] == i]}) + "\n" for i in range(N_PROMPTS))
    )
    (parts / "run.json").write_text(json.dumps({"fingerprint": writer.fingerprint}))
    (tmp_path / "again" / "predictions.jsonl").unlink()
    resumed, _ = predict(tmp_path / "again", prompts_file)
    assert resumed.generated == [] and read_jsonl(tmp_path / "again" / "predictions.jsonl") == expected_rows()


def test_torn_last_line_is_dropped_and_regenerated(tmp_path, prompts_file, caplog):
    with pytest.raises(RuntimeError):
        predict(tmp_path / "out", prompts_file, crash_at_batch=2)
    part = tmp_path / "out" / "parts" / "rank0.jsonl"
    with open(part, "ab") as handle:
        handle.write(b'{"index": 6, "rows": [{"output": "half of a ro')
    resumed, _ = predict(tmp_path / "out", prompts_file)
    assert "torn last line" in caplog.text
    assert resumed.generated == list(range(2 * BATCH, N_PROMPTS))
    assert read_jsonl(tmp_path / "out" / "predictions.jsonl") == expected_rows()


def test_other_configuration_or_prompt_file_starts_fresh_and_damaged_parts_are_refused(tmp_path, prompts_file):
    with pytest.raises(RuntimeError):
        predict(tmp_path / "out", prompts_file, crash_at_batch=2, fingerprint="model-a")
    fresh, _ = predict(tmp_path / "out", prompts_file, fingerprint="model-b")
    assert fresh.generated == list(range(N_PROMPTS))
    assert read_jsonl(tmp_path / "out" / "predictions.jsonl") == expected_rows()
    write_prompts(prompts_file, N_PROMPTS - 1)  # the prompt file changed: the finished file is not reused
    edited, _ = predict(tmp_path / "out", prompts_file, fingerprint="model-b")
    assert edited.generated == list(range(N_PROMPTS - 1))
    assert read_jsonl(tmp_path / "out" / "predictions.jsonl") == expected_rows(N_PROMPTS - 1)

    with pytest.raises(RuntimeError):
        predict(tmp_path / "bad", prompts_file, crash_at_batch=2)
    part = tmp_path / "bad" / "parts" / "rank0.jsonl"
    lines = part.read_bytes().splitlines(keepends=True)
    lines[1] = b'{"index": 1, "ro\n'  # damage inside the file: not a crash, never silently used
    part.write_bytes(b"".join(lines))
    with pytest.raises(PartFileError, match=r"rank0.jsonl:2: unreadable line.*delete"):
        predict(tmp_path / "bad", prompts_file)


# --- writer driven directly (simulated ranks, memory) --------------------------------------------------------


def fake_trainer(root: Path, rank: int = 0):
    return SimpleNamespace(
        global_rank=rank, default_root_dir=str(root), strategy=SimpleNamespace(barrier=lambda *a, **k: None)
    )


def feed(writer, trainer, indices, batch_size: int) -> None:
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        rows = make_rows(chunk, [f"p{i}" for i in chunk], [f"prompt number {i} \u00e9" for i in chunk])
        writer.write_on_batch_end(trainer, None, rows, None, None, start // batch_size, 0)


def test_simulated_ranks_padding_and_world_size_change_merge_without_duplicates(tmp_path):
    n, world = 7, 2
    trainers = [fake_trainer(tmp_path, rank) for rank in range(world)]
    writers = [SteeredPredictionWriter(None) for _ in range(world)]
    assert [writer.start(trainer, "cfg") for writer, trainer in zip(writers, trainers)] == [set(), set()]
    # torch's padded DistributedSampler: rank r gets indices[r::W] of [0..6, 0]
    feed(writers[0], trainers[0], [0, 2, 4, 6], 2)
    feed(writers[1], trainers[1], [1, 3, 5, 0], 2)
    writers[1].teardown(trainers[1], None, "predict")  # rank 1 writes no merged file
    assert not (tmp_path / "predictions.jsonl").exists()
    writers[0].teardown(trainers[0], None, "predict")
    assert read_jsonl(tmp_path / "predictions.jsonl") == expected_rows(n)

    # Two ranks stop part-way; the run resumes on one process: every rank's part counts as done and is merged.
    trainers = [fake_trainer(tmp_path / "b", rank) for rank in range(world)]
    writers = [SteeredPredictionWriter(None) for _ in range(world)]
    for writer, trainer in zip(writers, trainers):
        writer.start(trainer, "cfg")
    feed(writers[0], trainers[0], [0, 2], 2)
    feed(writers[1], trainers[1], [1, 3], 2)
    for writer in writers:
        writer._close()
    single, trainer = SteeredPredictionWriter(None), fake_trainer(tmp_path / "b", 0)
    assert single.start(trainer, "cfg") == {0, 1, 2, 3}
    feed(single, trainer, [4, 5, 6], 3)
    single.teardown(trainer, None, "predict")
    assert read_jsonl(tmp_path / "b" / "predictions.jsonl") == expected_rows(n)
    assert not (tmp_path / "b" / "parts").exists()


def test_bad_rows_are_refused(tmp_path):
    writer = SteeredPredictionWriter(tmp_path)
    trainer = fake_trainer(tmp_path)
    with pytest.raises(RuntimeError, match="not open"):
        writer.write_on_batch_end(trainer, None, [], None, None, 0, 0)
    writer.start(trainer, "cfg")
    with pytest.raises(TypeError, match="list of dict rows"):
        writer.write_on_batch_end(trainer, None, {"index": 0}, None, None, 0, 0)
    with pytest.raises(ValueError, match="with an 'index'"):
        writer.write_on_batch_end(trainer, None, [{"output": "x"}], None, None, 0, 0)
    with pytest.raises(ValueError, match="int >= 0"):
        writer.write_on_batch_end(trainer, None, [{"index": -1}], None, None, 0, 0)
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        writer.write_on_batch_end(trainer, None, [{"index": 0, "x": object()}], None, None, 0, 0)
    writer.write_on_batch_end(trainer, None, [{"index": 0, "coefficient": torch.tensor(1.5)}], None, None, 0, 0)
    writer.teardown(trainer, None, "predict")
    assert read_jsonl(tmp_path / "predictions.jsonl") == [{"index": 0, "coefficient": 1.5}]
    with pytest.raises(ValueError, match="plain file name"):
        SteeredPredictionWriter(tmp_path, filename="sub/predictions.jsonl")


def test_memory_does_not_hold_the_outputs(tmp_path):
    def run(n_prompts: int, root: Path) -> tuple[int, int]:
        writer, trainer = SteeredPredictionWriter(root), fake_trainer(root)
        writer.start(trainer, "mem")
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        feed(writer, trainer, range(n_prompts), 25)  # a range: the test itself holds no per-prompt list
        retained = tracemalloc.get_traced_memory()[0] - base
        writer.teardown(trainer, None, "predict")
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
        assert sum(1 for _ in open(root / "predictions.jsonl", "rb")) == n_prompts * len(METHODS) * len(COEFFICIENTS)
        return retained, peak

    small_retained, small_peak = run(500, tmp_path / "small")
    large_retained, large_peak = run(5_000, tmp_path / "large")
    assert large_retained - small_retained < 16 * 1024, (small_retained, large_retained)  # writing holds nothing
    # merging holds one (index, part, offset) entry per prompt (~100 bytes each), never the rows (~1 KiB each)
    assert large_peak - small_peak < 4_500 * 200, (small_peak, large_peak)


# --- real 2-process DDP --------------------------------------------------------------------------------------

DDP_SCRIPT = """
import json, sys
from pathlib import Path
import lightning as L
import torch
sys.path.insert(0, {tests!r})
from test_prediction_writer import FakeGenerator, Prompts
from es_lightning.callbacks.prediction_writer import SteeredPredictionWriter

if __name__ == "__main__":
    out, prompts = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    for name, crash in (("crashed", 1), ("resumed", None)):
        module = FakeGenerator(crash)
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out),
                            callbacks=[SteeredPredictionWriter(str(out))])
        try:
            trainer.predict(module, datamodule=Prompts(prompts), return_predictions=False)
        except RuntimeError:
            pass
        (out / f"{{name}}{{trainer.global_rank}}.json").write_text(json.dumps(module.generated))
"""


@pytest.mark.ddp
def test_two_process_ddp_resumes_and_writes_one_merged_file_in_input_order(tmp_path):
    n = 13  # the ranks get 7 and 6 prompts, in batches of 3; each crashes at its second batch
    prompts = write_prompts(tmp_path / "prompts.jsonl", n)
    script = tmp_path / "ddp_predict.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(tests=str(Path(__file__).parent))))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "out"), str(prompts)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    out = tmp_path / "out"
    assert (out / "predictions.jsonl").exists(), result.stderr[-3000:]
    assert read_jsonl(out / "predictions.jsonl") == expected_rows(n)
    crashed = sorted(sum((json.loads((out / f"crashed{rank}.json").read_text()) for rank in (0, 1)), []))
    resumed = sorted(sum((json.loads((out / f"resumed{rank}.json").read_text()) for rank in (0, 1)), []))
    assert crashed and not set(crashed) & set(resumed) and sorted(crashed + resumed) == list(range(n))
    assert not (out / "parts").exists()
