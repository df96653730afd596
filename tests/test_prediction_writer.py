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
        for order, (method, coefficient) in enumerate((m, c) for m in METHODS for c in COEFFICIENTS):
            rows.append({"index": i, "id": f"p{i}", "prompt": f"prompt number {i} \u00e9",
                         "output": f"out {i} {method} {coefficient}", "method": method,
                         "coefficient": coefficient, "order": order})
    return rows


def make_rows(indices, ids, prompts) -> list[dict]:
    """Rows method-major (index innermost), so the writer has to sort them into (index, order)."""
    return [
        {"index": int(i), "id": ident, "prompt": prompt, "output": f"out {int(i)} {m} {c}", "method": m,
         "coefficient": c}
        for m in METHODS for c in COEFFICIENTS for i, ident, prompt in zip(indices, ids, prompts)
    ]


class FakeGenerator(L.LightningModule):
    """A predict_step that follows the writer's contract and records which prompts it generated."""

    def __init__(self, crash_at_batch: int | None = None):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.crash_at_batch = crash_at_batch
        self.generated: list[int] = []

    def predict_step(self, batch, batch_idx):
        if batch_idx == self.crash_at_batch:
            raise RuntimeError(f"simulated crash at batch {batch_idx}")
        writer = find_prediction_writer(self.trainer)
        todo = writer.pending(batch["index"])
        indices = [int(batch["index"][k]) for k in todo]
        self.generated.extend(indices)
        return make_rows(indices, [batch["id"][k] for k in todo], [batch["prompt"][k] for k in todo])


def predict(out: Path, prompts: Path, crash_at_batch=None, fingerprint="cfg", shuffle=False):
    writer = SteeredPredictionWriter(str(out), run_fingerprint=fingerprint)
    module = FakeGenerator(crash_at_batch)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[writer], default_root_dir=str(out),
    )
    loader = DataLoader(PromptDataset(PromptSource(str(prompts))), batch_size=BATCH, shuffle=shuffle,
                        collate_fn=collate_prompts)
    trainer.predict(module, dataloaders=loader, return_predictions=False)
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


# --- writer through a real Trainer ---------------------------------------------------------------------------


def test_writes_one_complete_file_in_input_order(tmp_path, prompts_file):
    module, writer = predict(tmp_path / "out", prompts_file)
    assert read_jsonl(tmp_path / "out" / "predictions.jsonl") == expected_rows()
    assert sorted(module.generated) == list(range(N_PROMPTS))
    assert not (tmp_path / "out" / "parts").exists()
    assert writer.rows_merged == writer.rows_written == N_PROMPTS * len(METHODS) * len(COEFFICIENTS)


def test_crash_then_resume_equals_uninterrupted_run_without_regenerating(tmp_path, prompts_file):
    with pytest.raises(RuntimeError, match="simulated crash at batch 2"):
        predict(tmp_path / "out", prompts_file, crash_at_batch=2)
    assert not (tmp_path / "out" / "predictions.jsonl").exists()
    assert (tmp_path / "out" / "parts" / "rank0.jsonl").exists()
    resumed, writer = predict(tmp_path / "out", prompts_file)
    assert resumed.generated == list(range(2 * BATCH, N_PROMPTS))  # batches 0 and 1 are not generated again
    assert read_jsonl(tmp_path / "out" / "predictions.jsonl") == expected_rows()
    assert not (tmp_path / "out" / "parts").exists()


def test_truncated_last_line_is_dropped_and_regenerated(tmp_path, prompts_file):
    with pytest.raises(RuntimeError):
        predict(tmp_path / "out", prompts_file, crash_at_batch=3)
    part = tmp_path / "out" / "parts" / "rank0.jsonl"
    data = part.read_bytes()
    part.write_bytes(data[:-4])  # cut into batch 2's commit line: batch 2 is no longer complete
    with pytest.warns(UserWarning, match="truncated"):
        resumed, _ = predict(tmp_path / "out", prompts_file)
    assert resumed.generated == list(range(2 * BATCH, N_PROMPTS))
    assert read_jsonl(tmp_path / "out" / "predictions.jsonl") == expected_rows()

    # A crash in the middle of writing a batch's rows: a half row and no commit line.
    with pytest.raises(RuntimeError):
        predict(tmp_path / "again", prompts_file, crash_at_batch=2)
    part = tmp_path / "again" / "parts" / "rank0.jsonl"
    with open(part, "ab") as handle:
        handle.write(b'{"index": 6, "order": 0, "output": "half of a ro')
    with pytest.warns(UserWarning, match="dropping 1 uncommitted"):
        resumed, _ = predict(tmp_path / "again", prompts_file)
    assert resumed.generated == list(range(2 * BATCH, N_PROMPTS))
    assert read_jsonl(tmp_path / "again" / "predictions.jsonl") == expected_rows()


def test_other_configuration_starts_fresh_and_damaged_parts_are_refused(tmp_path, prompts_file):
    with pytest.raises(RuntimeError):
        predict(tmp_path / "out", prompts_file, crash_at_batch=2, fingerprint="model-a")
    with pytest.warns(UserWarning, match="another configuration.*from scratch"):
        fresh, _ = predict(tmp_path / "out", prompts_file, fingerprint="model-b")
    assert fresh.generated == list(range(N_PROMPTS))
    assert read_jsonl(tmp_path / "out" / "predictions.jsonl") == expected_rows()

    with pytest.raises(RuntimeError):
        predict(tmp_path / "bad", prompts_file, crash_at_batch=3)
    part = tmp_path / "bad" / "parts" / "rank0.jsonl"
    lines = part.read_bytes().splitlines(keepends=True)
    lines[1] = b'{"index": 0, "ord\n'  # damage before a commit line: not a crash, never silently used
    part.write_bytes(b"".join(lines))
    with pytest.raises(PartFileError, match=r"rank0.jsonl:2: unreadable line.*delete"):
        predict(tmp_path / "bad", prompts_file)


def test_shuffled_dataloader_is_refused(tmp_path, prompts_file):
    torch.manual_seed(1)
    with pytest.raises(ValueError, match="out of order.*must not shuffle"):
        predict(tmp_path / "out", prompts_file, shuffle=True)


# --- writer driven directly (simulated ranks, memory) --------------------------------------------------------


def fake_trainer(root: Path, rank: int = 0, world_size: int = 1, dataset_length: int | None = None):
    loader = SimpleNamespace(dataset=range(dataset_length)) if dataset_length is not None else None
    return SimpleNamespace(global_rank=rank, world_size=world_size, default_root_dir=str(root),
                           strategy=SimpleNamespace(barrier=lambda *args, **kwargs: None), predict_dataloaders=loader)


def feed(writer, trainer, indices: range | list[int], batch_size: int) -> None:
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        todo = [i for i in chunk if not writer.is_done(i)]
        rows = make_rows(todo, [f"p{i}" for i in todo], [f"prompt number {i} \u00e9" for i in todo])
        writer.write_on_batch_end(trainer, None, rows, None, None, start // batch_size, 0)


def test_simulated_ranks_padding_and_world_size_change_merge_without_duplicates(tmp_path):
    n, world = 7, 2
    trainers = [fake_trainer(tmp_path, rank, world, n) for rank in range(world)]
    writers = [SteeredPredictionWriter(None, run_fingerprint="cfg") for _ in range(world)]
    for writer, trainer in zip(writers, trainers):
        writer.on_predict_start(trainer, None)
    # torch's padded DistributedSampler: rank r gets indices[r::W] of [0..6, 0]
    feed(writers[0], trainers[0], [0, 2, 4, 6], 2)
    feed(writers[1], trainers[1], [1, 3, 5, 0], 2)
    writers[1].on_predict_epoch_end(trainers[1], None)  # rank 1 writes no merged file
    assert not (tmp_path / "predictions.jsonl").exists()
    writers[0].on_predict_epoch_end(trainers[0], None)
    assert read_jsonl(tmp_path / "predictions.jsonl") == expected_rows(n)

    # Two ranks crash part-way; the run resumes on one process: earlier parts count as done and are merged.
    trainers = [fake_trainer(tmp_path / "b", rank, world, n) for rank in range(world)]
    writers = [SteeredPredictionWriter(None, run_fingerprint="cfg") for _ in range(world)]
    for writer, trainer in zip(writers, trainers):
        writer.on_predict_start(trainer, None)
    feed(writers[0], trainers[0], [0, 2], 2)
    feed(writers[1], trainers[1], [1, 3], 2)
    for writer in writers:
        writer._close()
    single = SteeredPredictionWriter(None, run_fingerprint="cfg")
    trainer = fake_trainer(tmp_path / "b", 0, 1, n)
    single.on_predict_start(trainer, None)
    assert single.done_indices() == {0, 1, 2, 3}
    assert sorted(p.name for p in (tmp_path / "b" / "parts").glob("*.jsonl")) == [
        "prev-0-rank0.jsonl", "prev-0-rank1.jsonl", "rank0.jsonl"]
    feed(single, trainer, list(range(n)), 3)
    assert single.rows_written == 3 * len(METHODS) * len(COEFFICIENTS)
    single.on_predict_epoch_end(trainer, None)
    assert read_jsonl(tmp_path / "b" / "predictions.jsonl") == expected_rows(n)
    assert not (tmp_path / "b" / "parts").exists()


def test_bad_rows_are_refused(tmp_path):
    writer = SteeredPredictionWriter(tmp_path)
    trainer = fake_trainer(tmp_path, dataset_length=2)
    with pytest.raises(RuntimeError, match="not open"):
        writer.write_on_batch_end(trainer, None, [], None, None, 0, 0)
    writer.on_predict_start(trainer, None)
    with pytest.raises(TypeError, match="list of dict rows"):
        writer.write_on_batch_end(trainer, None, {"index": 0}, None, None, 0, 0)
    with pytest.raises(ValueError, match="without an 'index'"):
        writer.write_on_batch_end(trainer, None, [{"output": "x"}], None, None, 0, 0)
    with pytest.raises(ValueError, match="share \\(index, order\\) \\(0, 1\\)"):
        writer.write_on_batch_end(trainer, None, [{"index": 0, "order": 1}, {"index": 0, "order": 1}], None, None, 0, 0)
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        writer.write_on_batch_end(trainer, None, [{"index": 0, "x": object()}], None, None, 0, 0)
    writer.write_on_batch_end(trainer, None, [{"index": 0, "coefficient": torch.tensor(1.5)}], None, None, 0, 0)
    with pytest.warns(UserWarning, match="rows for 1 prompts but the predict dataset has 2"):
        writer.on_predict_epoch_end(trainer, None)
    assert read_jsonl(tmp_path / "predictions.jsonl") == [{"index": 0, "coefficient": 1.5, "order": 0}]
    with pytest.raises(ValueError, match="plain file name"):
        SteeredPredictionWriter(tmp_path, filename="sub/predictions.jsonl")


def test_memory_stays_constant_in_the_number_of_rows(tmp_path):
    def run(n_rows: int, root: Path) -> tuple[int, int]:
        n_prompts = n_rows // (len(METHODS) * len(COEFFICIENTS))
        writer = SteeredPredictionWriter(root, run_fingerprint="mem")
        trainer = fake_trainer(root, dataset_length=n_prompts)
        writer.on_predict_start(trainer, None)
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        feed(writer, trainer, range(n_prompts), 25)  # a range: the test itself holds no per-prompt list
        retained = tracemalloc.get_traced_memory()[0] - base
        writer.on_predict_epoch_end(trainer, None)
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
        assert sum(1 for _ in open(root / "predictions.jsonl", "rb")) == n_rows
        return retained, peak

    small_retained, small_peak = run(2_000, tmp_path / "small")
    large_retained, large_peak = run(20_000, tmp_path / "large")
    # Only the done bitmap grows: one bit per prompt (here 4,500 more prompts, under 1 KiB).
    assert large_retained - small_retained < 16 * 1024, (small_retained, large_retained)
    assert large_peak < small_peak + 64 * 1024, (small_peak, large_peak)


# --- real 2-process DDP --------------------------------------------------------------------------------------

DDP_SCRIPT = """
import json, sys
from pathlib import Path
import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler
sys.path.insert(0, {tests!r})
from test_prediction_writer import FakeGenerator
from es_lightning.callbacks.prediction_writer import SteeredPredictionWriter
from es_lightning.data.prompts import PromptDataset, PromptSource, collate_prompts

if __name__ == "__main__":
    out, prompts = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    dataset = PromptDataset(PromptSource(prompts))
    for name, padded in (("lightning", False), ("padded", True)):
        module = FakeGenerator()
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[SteeredPredictionWriter(str(out / name), run_fingerprint="ddp")])
        # Lightning's own predict sampler never pads; torch's DistributedSampler repeats index 0 on rank 1.
        sampler = DistributedSampler(dataset, trainer.world_size, trainer.global_rank, shuffle=False) if padded else None
        loader = DataLoader(dataset, batch_size=2, sampler=sampler, collate_fn=collate_prompts)
        trainer.predict(module, dataloaders=loader, return_predictions=False)
        (out / name / f"generated{{trainer.global_rank}}.json").write_text(json.dumps(module.generated))
"""


@pytest.mark.ddp
def test_two_process_ddp_writes_one_merged_file_in_input_order(tmp_path):
    n = 7  # odd: the ranks get 4 and 3 prompts (or 4 and 4 with padding)
    prompts = write_prompts(tmp_path / "prompts.jsonl", n)
    script = tmp_path / "ddp_predict.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(tests=str(Path(__file__).parent))))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "out"), str(prompts)], env=env,
                            capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for name, rank1 in (("lightning", [1, 3, 5]), ("padded", [1, 3, 5, 0])):
        out = tmp_path / "out" / name
        assert read_jsonl(out / "predictions.jsonl") == expected_rows(n), name
        generated = [json.loads((out / f"generated{rank}.json").read_text()) for rank in (0, 1)]
        assert generated == [[0, 2, 4, 6], rank1]
        assert not (out / "parts").exists()
