"""GPU check that needs no network: the pipeline at paper widths on random-init models and generated data.

Builds two random-init models at the paper's widths with a few blocks (expert: Gemma-2-9B-like, d = 3584;
target: Llama-3.1-8B-like, d = 4096; word-level tokenizers over 1,000 words, so nothing is downloaded), writes a
multiple-choice JSONL in the format of ``../shared/data`` and a prompts JSONL, and runs the ``es-lightning`` stages
``fit``, ``test`` and ``predict`` one after another in this process, as ``es-lightning-pipeline`` does, on one GPU
in bfloat16 (``data.*.dtype`` and ``model.target_dtype``; the auto-encoders and the RFM stay float32, as in
``configs/paper/``). Per stage, and per part of a stage, it prints the wall time, the peak GPU memory
(``torch.cuda.max_memory_allocated``, reset at each part) and the peak RSS beside the product's own estimate: the
parts are the stage's ``Memory estimate, <part>: host X GiB, device Y GiB`` announcements, each part running from
one announcement to the next. Then the steered against the unsteered target's greedy generation in tokens/s, and,
when two GPUs are visible, a 2-process DDP fit (``python -m es_lightning.cli fit``, its own process group).

    python benchmarks/gpu_check.py                 # one GPU: a few minutes on an H100, stopped at --budget-s
    python benchmarks/gpu_check.py --dry-run       # the same steps on CPU at tiny widths, for CI

Needs es_lightning and its dependencies importable (``PYTHONPATH=<checkout>`` is enough for es_lightning); on a
lent machine without network, ``benchmarks/wheelhouse.py`` brings the missing packages as wheels and prints the
one command that installs them and runs this check. Everything goes to ``--work`` (default: a temporary folder,
removed at the end unless ``--keep``); ``--out DIR`` writes ``results.json`` (and the DDP fit's log) there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
GIB = 2**30
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
MARKS = ["Question", "Answer", "?", ":"]
STAGES = ("fit", "test", "predict")
PROBE_ENV = "GPU_CHECK_PROBE"
RUN = "gpu_check"
COEFFICIENT = 0.2  # x each steered layer's mean norm, for the throughput runs: the hooks cost the same at any value
# The product's announcement, es_lightning.memory.StageEstimate.format(): "<part>: host X GiB, device Y GiB[, ...]".
ESTIMATE = re.compile(r"^(?P<part>.+?): host (?P<host>[\d.]+) GiB, device (?P<device>[\d.]+) GiB")


@dataclass(frozen=True)
class Shape:
    """A random-init decoder of ``family`` ``llama`` or ``gemma2`` (each family's other defaults, e.g. Gemma-2's
    tied embeddings and logit soft-capping)."""

    family: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    blocks: int

    def config(self, vocab: int) -> Any:
        """The transformers config of this shape for a ``vocab``-token tokenizer (pad 0, bos 2, eos 3)."""
        from transformers import Gemma2Config, LlamaConfig

        kind = {"llama": LlamaConfig, "gemma2": Gemma2Config}[self.family]
        return kind(
            vocab_size=vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.blocks,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            max_position_embeddings=512,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        )


@dataclass(frozen=True)
class Plan:
    """What sizes a check: the two models, the generated data, the evaluation and the throughput runs."""

    expert: Shape
    target: Shape
    words: int  # vocabulary words; each tokenizer adds SPECIALS and MARKS
    questions: int
    choices: int
    question_words: int  # a choice has half as many
    eval_questions: int  # test: a seeded subset, 2 nested folds
    val_questions: int  # test: val questions per swept coefficient
    new_tokens: int  # predict's and the evaluation's generated answers
    prompts: int
    throughput_batches: tuple[int, ...]
    throughput_tokens: int
    rounds: int
    rfm_options: dict[str, Any] = field(default_factory=dict)  # model.vectors.rfm_options; {}: the product's defaults

    @property
    def vocab(self) -> int:
        return len(SPECIALS) + len(MARKS) + self.words


PAPER = (
    Plan(  # Gemma-2-9B's and Llama-3.1-8B's widths, MLPs and heads (configs/paper/truthfulqa_gemma2_to_llama31.yaml)
        expert=Shape("gemma2", 3584, 14336, 16, 8, 256, 4),
        target=Shape("llama", 4096, 14336, 32, 8, 128, 4),
        words=1000,
        questions=400,
        choices=4,
        question_words=12,
        eval_questions=48,
        val_questions=8,
        new_tokens=16,
        prompts=16,
        throughput_batches=(1, 16),
        throughput_tokens=64,
        rounds=3,
    )
)
TINY = Plan(
    expert=Shape("gemma2", 56, 112, 4, 2, 16, 4),
    target=Shape("llama", 64, 128, 4, 2, 16, 4),
    words=200,
    questions=40,
    choices=3,
    question_words=6,
    eval_questions=12,
    val_questions=3,
    new_tokens=4,
    prompts=4,
    throughput_batches=(1, 2),
    throughput_tokens=4,
    rounds=1,
    rfm_options={"iters": 1, "bandwidths": [1.0], "regs": [0.1]},
)


class StageFailed(RuntimeError):
    """A step failed or the check ran past its time budget; the message says where."""


# ------------------------------------------------------------------------------------------------ child side
def _cuda_ready() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_initialized()  # never start CUDA (a context on GPU 0) here


def _reset_peaks() -> None:
    import torch

    if _cuda_ready():
        torch.cuda.reset_peak_memory_stats()
    with contextlib.suppress(OSError):  # VmHWM := VmRSS; without it the RSS peak is the process's so far
        Path("/proc/self/clear_refs").write_text("5")


def _peaks() -> dict[str, int | None]:
    import torch

    hwm = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return {
        "peak_device": torch.cuda.max_memory_allocated() if _cuda_ready() else None,
        "peak_rss": int(hwm.group(1)) * 1024 if hwm else None,
    }


class _Announcements(logging.Handler):
    def __init__(self, probe: MemoryProbe):
        super().__init__(logging.INFO)
        self.probe = probe

    def emit(self, record: logging.LogRecord) -> None:
        match = (
            ESTIMATE.match(str(record.args[0])) if record.args and record.msg.startswith("Memory estimate") else None
        )
        if match:
            self.probe.switch(match["part"], (float(match["host"]), float(match["device"])))


class MemoryProbe(L.Callback):
    """Splits a stage into parts and records each part's wall time, peak GPU memory
    (``torch.cuda.max_memory_allocated``, reset at each part), peak RSS (``VmHWM``, reset likewise) and estimate
    (host, device GiB); at teardown rank r writes them to ``$GPU_CHECK_PROBE/rank<r>.jsonl``.

    A part starts at each of the product's memory announcements and is named after it; ``setup`` comes before the
    first, and ``test questions`` starts at the first test batch (after every fold's plan; the estimate in force is
    ``evaluation``'s). A part ends where the next starts, so in ``test`` each fold's coefficient sweep, which scores
    with the target resident, falls in that fold's ``rfm`` part."""

    def __init__(self) -> None:
        self.folder = Path(os.environ[PROBE_ENV])
        self.parts: list[dict[str, Any]] = []
        self.estimates: dict[str, tuple[float, float]] = {}
        self._open("setup", None)
        self._handler = _Announcements(self)
        announcer = logging.getLogger("es_lightning.memory.check")
        announcer.setLevel(logging.INFO)
        announcer.addHandler(self._handler)

    def _open(self, part: str, estimate: tuple[float, float] | None) -> None:
        host, device = estimate or (None, None)
        self._current = {"part": part, "host_estimate_gib": host, "device_estimate_gib": device}
        _reset_peaks()
        self._start = time.perf_counter()

    def _close(self) -> None:
        self.parts.append({**self._current, "seconds": time.perf_counter() - self._start, **_peaks()})

    def switch(self, part: str, estimate: tuple[float, float] | None) -> None:
        """End the current part and start ``part`` with its ``(host, device)`` estimate in GiB."""
        self._close()
        if estimate:
            self.estimates[part] = estimate
        self._open(part, estimate)

    def on_test_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if batch_idx == 0:
            self.switch("test questions", self.estimates.get("evaluation"))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._close()
        logging.getLogger("es_lightning.memory.check").removeHandler(self._handler)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{trainer.global_rank}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in self.parts))


# ----------------------------------------------------------------------------------------------- parent side
def vocabulary(plan: Plan, reverse: bool) -> list[str]:
    """The tokens of one model's word-level tokenizer, in id order (the expert's words in reverse order)."""
    words = [f"w{i}" for i in range(plan.words)]
    return SPECIALS + MARKS + (words[::-1] if reverse else words)


def save_tokenizer(folder: Path, tokens: list[str]) -> None:
    """A word-level ``PreTrainedTokenizerFast`` over ``tokens`` (the first four are pad, unk, bos, eos)."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(folder)


def build_model(folder: Path, shape: Shape, plan: Plan, reverse: bool, device: str, seed: int) -> Path:
    """A random-init model of ``shape`` in bfloat16 with its tokenizer, built on ``device`` and saved to ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokens = vocabulary(plan, reverse)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(shape.config(len(tokens))).to(torch.bfloat16)
    model.save_pretrained(folder)
    save_tokenizer(folder, tokens)
    del model
    words = tokens[len(SPECIALS) :]
    read = AutoTokenizer.from_pretrained(folder)  # as the product loads it: transformers may swap the class per family
    if read.convert_ids_to_tokens(read(" ".join(words), add_special_tokens=False)["input_ids"]) != words:
        raise StageFailed(
            f"{type(read).__name__} does not read back the word-level tokenizer saved in {folder} "
            f"(transformers picks a tokenizer class per model family); use another family than "
            f"{shape.family!r}."
        )
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder


def write_data(work: Path, plan: Plan) -> tuple[Path, Path]:
    """``mc.jsonl`` (``{"id", "question", "choices", "answer"}``, as in ``../shared/data``) and ``prompts.jsonl``."""
    rng = random.Random(0)

    def words(k: int) -> str:
        return " ".join(f"w{rng.randrange(plan.words)}" for _ in range(k))

    mc, prompts = work / "mc.jsonl", work / "prompts.jsonl"
    with open(mc, "w") as handle:
        for q in range(plan.questions):
            choices = [words(max(1, plan.question_words // 2)) for _ in range(plan.choices)]
            row = {
                "id": f"q{q}",
                "question": words(plan.question_words) + " ?",
                "choices": choices,
                "answer": rng.randrange(plan.choices),
            }
            handle.write(json.dumps(row) + "\n")
    with open(prompts, "w") as handle:
        handle.writelines(
            json.dumps({"id": f"p{p}", "prompt": f"Question: {words(plan.question_words)} ?\nAnswer:"}) + "\n"
            for p in range(plan.prompts)
        )
    return mc, prompts


def stage_config(plan: Plan, work: Path, accelerator: str) -> dict[str, Any]:
    """The config of every stage: the models in ``work``, bfloat16, a short nested evaluation, the probe."""
    model = {"dtype": "bfloat16", "layers": None, "chat_template": False, "max_length": 64}
    return {
        "seed_everything": 0,
        "run_name": RUN,
        "output_dir": str(work / "runs"),
        "trainer": {
            "accelerator": accelerator,
            "devices": 1,
            "max_epochs": 1,
            "logger": False,
            "log_every_n_steps": 5,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [
                {"class_path": "gpu_check.MemoryProbe"},
                {"class_path": "es_lightning.callbacks.LayerPairingCallback"},
                {"class_path": "es_lightning.callbacks.SteeringVectorCallback"},
                {"class_path": "es_lightning.callbacks.SteeredPredictionWriter"},
            ],
        },
        "model": {
            "objective": "paired",
            "pairing": {"rule": "depth", "top_k": 3},
            "vectors": {"methods": ["expertsteer", "rfm_self", "mean_difference"], "rfm_options": plan.rfm_options},
            "target_dtype": "bfloat16",
            "evaluation": {
                "protocol": "nested",
                "coefficients": [-0.4, -0.1, 0.1, 0.4],
                "random_draws": 2,
                "permutations": 1000,
                "folds": 2,
                "max_questions": plan.eval_questions,
                "max_val_questions": plan.val_questions,
                "batch_size": 32,
                "generation": {"max_new_tokens": plan.new_tokens},
            },
            "generation": {"max_new_tokens": plan.new_tokens, "batch_size": 8},
            "predict": {"methods": ["expertsteer", "mean_difference"], "coefficients": [COEFFICIENT]},
        },
        "data": {
            "expert": {"name": str(work / "expert"), **model},
            "target": {"name": str(work / "target"), **model},
            "data": {
                "path": str(work / "mc.jsonl"),
                "format": {
                    "kind": "multiple_choice",
                    "prompt_template": "Question: {question}\nAnswer:",
                    "completion_template": " {choice}",
                },
            },
            "splits": {"val_fraction": 0.15, "test_fraction": 0.15, "seed": 0},
            "predict_data": {"path": str(work / "prompts.jsonl"), "prompt_field": "prompt"},
            "batch_size": 256,
            "extract_batch_size": 64,
            "extract_batch_tokens": 16384,
            "cache_dtype": "float32",
            "shard_size": 128,
            "cache_dir": str(work / "cache"),
            "progress": False,
            "predict_batch_size": 8,
        },
    }


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _probe_parts(probe: Path) -> dict[int, list[dict[str, Any]]]:
    return {
        int(p.stem[4:]): [json.loads(line) for line in p.read_text().splitlines()]
        for p in sorted(probe.glob("rank*.jsonl"))
    }


def run_inline(name: str, arguments: list[str], work: Path) -> dict[str, Any]:
    """One ``es-lightning`` subcommand in this process, after freeing what the previous one left; returns its wall
    time and its probe parts."""
    import gc

    import torch

    from es_lightning.cli import build_cli

    probe = work / "probe" / name
    os.environ[PROBE_ENV] = str(probe)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    start = time.perf_counter()
    try:
        build_cli(arguments)
    except StageFailed:
        raise
    except (Exception, SystemExit) as error:
        raise StageFailed(f"{name} failed:\n{traceback.format_exc(limit=-12)}") from error
    return {"stage": name, "seconds": time.perf_counter() - start, "ranks": _probe_parts(probe)}


def run_process(name: str, arguments: list[str], work: Path, logs: Path) -> dict[str, Any]:
    """One ``python -m es_lightning.cli`` process group (killed if this check stops first), output to
    ``logs/<name>.log``; returns its wall time and every rank's probe parts."""
    probe = work / "probe" / name
    log_path = logs / f"{name}.log"
    path = os.pathsep.join(filter(None, [str(HERE), str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, PROBE_ENV: str(probe), "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "es_lightning.cli", *arguments],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = child.wait()
        finally:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
    if code:
        raise StageFailed(f"{name} failed (exit {code}); its log ({log_path}) ends:\n{_tail(log_path)}")
    return {
        "stage": name,
        "seconds": time.perf_counter() - start,
        "ranks": _probe_parts(probe),
        "log": str(log_path),
        "whole": "whole process, start-up included",
    }


def _max(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def merge_parts(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Parts of the same name summed (seconds) and maximised (peaks, estimates), in order of first appearance."""
    merged: dict[str, dict[str, Any]] = {}
    for part in parts:
        row = merged.setdefault(part["part"], {"part": part["part"], "count": 0, "seconds": 0.0})
        row["count"] += 1
        row["seconds"] += part["seconds"]
        for key in ("peak_device", "peak_rss", "device_estimate_gib", "host_estimate_gib"):
            row[key] = _max([row.get(key), part[key]])
    return list(merged.values())


def _gib(n_bytes: float | None) -> str:
    return "-" if n_bytes is None else f"{n_bytes / GIB:.2f}"


def _est(gib: float | None) -> str:
    return "-" if gib is None else f"{gib:.2f}"


def _times(count: int) -> str:
    return f" (x{count})" if count > 1 else ""


STAGE_HEADER = (
    "| stage | part | wall s | peak GPU GiB | estimate GPU GiB | peak RSS GiB | estimate host GiB |\n"
    "|---|---|---:|---:|---:|---:|---:|"
)


def stage_rows(result: dict[str, Any], rank: int = 0) -> list[str]:
    """Markdown rows of one stage (one rank): each part, then the process's wall time and largest figures."""
    parts = merge_parts(result["ranks"].get(rank, []))
    rows = [
        f"| {result['stage']} | {p['part']}{_times(p['count'])} | {p['seconds']:.1f} | {_gib(p['peak_device'])} | "
        f"{_est(p['device_estimate_gib'])} | {_gib(p['peak_rss'])} | {_est(p['host_estimate_gib'])} |"
        for p in parts
    ]
    rows.append(
        f"| {result['stage']} | **{result.get('whole', 'whole stage')}** | {result['seconds']:.1f} | "
        f"{_gib(_max([p['peak_device'] for p in parts]))} | {_est(_max([p['device_estimate_gib'] for p in parts]))} | "
        f"{_gib(_max([p['peak_rss'] for p in parts]))} | {_est(_max([p['host_estimate_gib'] for p in parts]))} |"
    )
    return rows


def _generation_seconds(model: Any, encoding: Any, tokens: int, scope: contextlib.AbstractContextManager) -> float:
    """Wall time of one greedy generation of exactly ``tokens`` new tokens per row inside ``scope``."""
    import torch

    start = time.perf_counter()
    with torch.inference_mode(), scope:
        model.generate(**encoding, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def throughput(plan: Plan, work: Path, device: str) -> list[dict[str, Any]]:
    """Greedy generation of ``plan.throughput_tokens`` tokens per row, unsteered and steered by the fit's
    ``expertsteer`` bundle (x ``COEFFICIENT``), interleaved over ``plan.rounds`` rounds after one warm-up each."""
    from es_lightning.models import load_model
    from es_lightning.steering.bundle import SteeringBundle
    from es_lightning.steering.hooks import steer

    loaded = load_model(str(work / "target"), dtype="bfloat16", device=device)
    bundle = SteeringBundle.load(work / "runs" / RUN / "bundles" / "expertsteer.safetensors", expected_target=loaded)
    prompts = [json.loads(line)["prompt"] for line in (work / "prompts.jsonl").read_text().splitlines()]

    def scope(steered: bool) -> contextlib.AbstractContextManager:
        return steer(loaded.model, **bundle.steering_kwargs(COEFFICIENT)) if steered else contextlib.nullcontext()

    rows = []
    for batch in plan.throughput_batches:
        encoding = loaded.tokenizer(
            [prompts[i % len(prompts)] for i in range(batch)], return_tensors="pt", padding=True, padding_side="left"
        ).to(device)
        times: dict[bool, list[float]] = {False: [], True: []}
        for round_ in range(plan.rounds + 1):  # round 0 warms up
            for steered in (False, True) if round_ % 2 == 0 else (True, False):
                seconds = _generation_seconds(loaded.model, encoding, plan.throughput_tokens, scope(steered))
                if round_:
                    times[steered].append(seconds)
        tokens = batch * plan.throughput_tokens
        unsteered, steered = tokens / statistics.median(times[False]), tokens / statistics.median(times[True])
        rows.append(
            {
                "batch": batch,
                "unsteered_tokens_per_s": unsteered,
                "steered_tokens_per_s": steered,
                "ratio": steered / unsteered,
                "layers": bundle.layers,
            }
        )
    return rows


def preflight(device: str) -> dict[str, Any]:
    """Versions and the device; refuse a GPU check without a CUDA device torch can use."""
    from importlib import metadata

    import torch

    versions = {}
    for name in ("torch", "transformers", "lightning", "pytorch-lightning", "datasets", "jsonargparse", "xrfm"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"gpu_check: torch {torch.__version__} sees no CUDA device (CPU build, or no GPU visible); "
            "on CPU, run with --dry-run."
        )
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if device == "cuda" else []
    return {"python": sys.version.split()[0], "versions": versions, "gpus": gpus}


def _shape_text(shape: Shape, vocab: int) -> str:
    params = sum(p.numel() for p in _meta_model(shape, vocab).parameters())
    return (
        f"{shape.family} d={shape.hidden}, {shape.blocks} blocks, MLP {shape.intermediate}, {shape.heads}/"
        f"{shape.kv_heads} heads of {shape.head_dim}, vocabulary {vocab}: {params:,} parameters"
    )


def _meta_model(shape: Shape, vocab: int) -> Any:
    """The model of ``shape`` on the meta device: its parameter count without memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(shape.config(vocab))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny widths on CPU: the same steps, for CI")
    parser.add_argument(
        "--ddp",
        choices=["auto", "on", "off"],
        default="auto",
        help="the 2-process DDP fit: auto runs it when two GPUs are visible (never in a dry run); "
        "on forces it (gloo on CPU in a dry run)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=480.0,
        help="stop after this many seconds from the start (default 480) and report what ran",
    )
    parser.add_argument("--work", type=Path, help="models, data, cache and runs (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    parser.add_argument("--out", type=Path, help="write results.json (and the DDP fit's log) here")
    return parser.parse_args(argv)


def ddp_arguments(config: Path, work: Path) -> list[str]:
    """``fit`` on two processes with DDP, into its own run folder and a fresh cache that the ranks extract between
    them (shard s on rank s % 2)."""
    return [
        "fit",
        "--config",
        str(config),
        "--run_name",
        f"{RUN}_ddp",
        "--data.cache_dir",
        str(work / "cache-ddp"),
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
    ]


def ddp_skipped(mode: str, device: str, gpus: int) -> str | None:
    """Why the 2-process DDP fit does not run, or None when it does."""
    if mode == "on":
        return None
    if mode == "off":
        return "--ddp off"
    if device == "cpu":
        return "a dry run (--ddp on runs it on 2 CPU processes)"
    return None if gpus >= 2 else f"{gpus} GPU visible, it needs two"


def _out_of_time(signum: int, frame: Any) -> None:
    raise StageFailed("the check ran past --budget-s and was stopped")


def report(results: dict[str, Any]) -> None:
    """Print the tables of whatever ran."""
    if results["stages"]:
        print(f"\n{STAGE_HEADER}\n" + "\n".join(row for r in results["stages"] for row in stage_rows(r)))
        print(
            "\nPeak GPU: torch.cuda.max_memory_allocated (tensors only, no CUDA context). Peak RSS counts the "
            "interpreter and libraries, which the host estimates leave out."
        )
    if results.get("throughput"):
        print(
            "\n| batch | unsteered tokens/s | steered tokens/s | steered / unsteered | steered layers |\n"
            "|---:|---:|---:|---:|---|"
        )
        for row in results["throughput"]:
            print(
                f"| {row['batch']} | {row['unsteered_tokens_per_s']:.1f} | {row['steered_tokens_per_s']:.1f} | "
                f"{row['ratio']:.3f} | {row['layers']} |"
            )
        plan = results["plan"]
        print(
            f"(greedy, {plan['throughput_tokens']} new tokens per row, expertsteer x{COEFFICIENT}, median of "
            f"{plan['rounds']} interleaved rounds after a warm-up)"
        )
    if results.get("ddp"):
        ddp = results["ddp"]
        print(
            f"\n{STAGE_HEADER}\n"
            + "\n".join(
                row
                for rank in sorted(ddp["ranks"])
                for row in stage_rows({**ddp, "stage": f"fit, DDP rank {rank}"}, rank)
            )
        )
    elif results.get("ddp_skipped"):
        print(f"\n2-process DDP fit skipped: {results['ddp_skipped']}")


def main(argv: list[str] | None = None) -> int:
    """Run the check; 0 when every step ran, 1 when one failed or the budget ran out."""
    args = parse_args(argv)
    start = time.monotonic()
    signal.signal(signal.SIGALRM, _out_of_time)
    signal.alarm(max(1, round(args.budget_s)))
    plan, device = (TINY, "cpu") if args.dry_run else (PAPER, "cuda")
    environment = preflight(device)
    import torch

    skipped = ddp_skipped(args.ddp, device, torch.cuda.device_count() if device == "cuda" else 0)
    temporary = args.work is None
    work = Path(tempfile.mkdtemp(prefix="es-gpu-check-")) if temporary else args.work.resolve()
    logs = args.out.resolve() if args.out else work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    os.environ["ES_LIGHTNING_CACHE"] = str(work / "cache")
    print(
        f"gpu_check: {'dry run on CPU' if args.dry_run else 'GPU ' + ', '.join(environment['gpus'])}; Python "
        f"{environment['python']}; {', '.join(f'{k} {v}' for k, v in environment['versions'].items())}; work {work}"
    )
    print(f"  expert: {_shape_text(plan.expert, plan.vocab)}\n  target: {_shape_text(plan.target, plan.vocab)}")
    results: dict[str, Any] = {
        "plan": asdict(plan),
        "device": device,
        **environment,
        "stages": [],
        "ddp_skipped": skipped,
    }
    try:
        tick = time.perf_counter()
        build_model(work / "expert", plan.expert, plan, reverse=True, device=device, seed=0)
        build_model(work / "target", plan.target, plan, reverse=False, device=device, seed=1)
        write_data(work, plan)
        results["build_seconds"] = time.perf_counter() - tick
        print(
            f"gpu_check: models and data ready in {results['build_seconds']:.1f} s ({plan.questions} questions x "
            f"{plan.choices} choices, {plan.prompts} prompts)",
            flush=True,
        )
        config = work / "config.json"  # JSON is YAML: the CLI reads it with --config
        config.write_text(json.dumps(stage_config(plan, work, "gpu" if device == "cuda" else "cpu"), indent=1))
        checkpoint = str(work / "runs" / RUN / "last.ckpt")
        for stage in STAGES:
            extra = [] if stage == "fit" else ["--ckpt_path", checkpoint]
            results["stages"].append(run_inline(stage, [stage, "--config", str(config), *extra], work))
            print(f"gpu_check: {stage} done in {results['stages'][-1]['seconds']:.1f} s", flush=True)
        results["throughput"] = throughput(plan, work, device)
        print("gpu_check: throughput measured", flush=True)
        if not skipped:
            if device == "cuda":
                torch.cuda.empty_cache()
            results["ddp"] = run_process("fit-ddp", ddp_arguments(config, work), work, logs)
            print(f"gpu_check: DDP fit done in {results['ddp']['seconds']:.1f} s", flush=True)
        status = 0
    except Exception as failure:  # noqa: BLE001 - whatever ran is still reported
        print(
            f"\ngpu_check: {failure if isinstance(failure, StageFailed) else traceback.format_exc()}",
            file=sys.stderr,
            flush=True,
        )
        status = 1
    finally:
        signal.alarm(0)
    results["seconds"] = time.monotonic() - start
    report(results)
    print(f"\ngpu_check: {'done' if status == 0 else 'FAILED'} in {results['seconds']:.1f} s", flush=True)
    if args.out:
        (logs / "results.json").write_text(json.dumps(results, indent=1))
    if temporary and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
