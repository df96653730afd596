"""Benchmark (not a test): time and peak RSS of every stage at paper widths as the number of examples n grows.

Builds random-init Llama-style models at the paper's widths (expert hidden 3584 x 28 blocks, target hidden 4096 x
32 blocks; a 512-word vocabulary, an MLP of 512 units and 4 query / 1 KV heads of 128, so a CPU can push a few
thousand short texts: the widths, depths and layer counts that size the cache, the pair search, the auto-encoders
and the RFM are the paper's), writes synthetic two-choice questions, and runs the real pipeline through the CLI
(``python -m es_lightning.cli fit`` then ``test``) for each n. Stage boundaries are marked by a callback in the
child process: wall time since the previous mark, the peak RSS in between (``VmHWM``, reset after each mark through
``/proc/self/clear_refs``) and, from a thread sampling ``/proc/self/status`` every 10 ms, the stage's rise of
anonymous memory (``RssAnon``: what the process allocated, without the file-backed pages of the mapped weights and
cache, printed apart as the file peak) over the lowest value sampled before it. At each mark the child calls
``malloc_trim(0)``, so pages an earlier stage freed but the allocator kept are counted again when a stage reuses
them. Stages: startup (interpreter, imports, config parsing), capture+cache (both models, data module setup), pair
search, auto-encoders (setup, closed-form seed, training), vectors (RFM and baselines) and evaluation (``test``:
target loading, the nested protocol on a fixed number of questions, scoring). For each stage it prints the host
estimate of :mod:`es_lightning.memory` for this CPU run beside the anonymous rise (``ratio``: measured / estimated),
fits the growth exponent in n (log-log least squares on time, peak RSS and the anonymous rise) and extrapolates to
n = 10,000. The cache of each n is kept under ``--work`` and reused by a later run of the same n (its capture+cache
row then measures nothing); ``--from`` reprints a saved run with the estimator as it is now.

    python benchmarks/bench_scale.py --quick               # tiny widths, n in {50, 100}: about a minute
    python benchmarks/bench_scale.py --out bench_scale.json  # paper widths, n in {500, 1000, 2000}: 20+ CPU minutes

n counts cached rows (choice texts; two per question). The MI estimator uses 4 components (2 with --quick) so that
each nested evaluation fold of ``--eval-questions`` questions has enough held-out rows for the pair search.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import lightning as L

from es_lightning.memory import RunSettings, estimate_stages, read_shape

ROOT = Path(__file__).resolve().parents[1]
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def config_max_length(words: int) -> int:
    """``data.*.max_length`` of the run's config for questions of ``words`` words."""
    return 4 * words + 16


# ----------------------------------------------------------------------------------------- child side
def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


LIBC = ctypes.CDLL(None)  # glibc: malloc_trim
_last = {"time": None, "rss": 0, "anon": 0}
# KiB since the previous mark: the largest RssAnon / RssFile sampled, the lowest RssAnon, and the largest rise of
# RssAnon over the lowest sampled before it (what the stage allocated above memory an earlier stage let go of)
_peaks = {"anon": 0, "file": 0, "floor": 0, "drawup": 0}


def _sample(anon: int, file: int) -> None:
    _peaks.update(anon=max(_peaks["anon"], anon), file=max(_peaks["file"], file), floor=min(_peaks["floor"], anon))
    _peaks["drawup"] = max(_peaks["drawup"], anon - _peaks["floor"])


def _sample_forever(interval: float = 0.01) -> None:
    """Sample RssAnon and RssFile (the kernel keeps no high-water mark of either)."""
    while True:
        _sample(_status_kib("RssAnon"), _status_kib("RssFile"))
        time.sleep(interval)


def record(stage: str) -> None:
    """Append ``{stage, seconds, peak_rss_mib, start_rss_mib, peak_anon_mib, start_anon_mib, anon_rise_mib,
    peak_file_mib}`` since the previous mark to ``$BENCH_STAGES``, then reset the peaks (``VmHWM := VmRSS``)."""
    now = time.time()
    _sample(_status_kib("RssAnon"), _status_kib("RssFile"))
    start = _last["time"] if _last["time"] is not None else float(os.environ["BENCH_T0"])
    row = {
        "stage": stage,
        "seconds": round(now - start, 3),
        "peak_rss_mib": _status_kib("VmHWM") / 1024,
        "start_rss_mib": _last["rss"] / 1024,
        "peak_anon_mib": _peaks["anon"] / 1024,
        "start_anon_mib": _last["anon"] / 1024,
        "anon_rise_mib": _peaks["drawup"] / 1024,
        "peak_file_mib": _peaks["file"] / 1024,
    }
    with open(os.environ["BENCH_STAGES"], "a") as handle:
        handle.write(json.dumps(row) + "\n")
    Path("/proc/self/clear_refs").write_text("5")
    LIBC.malloc_trim(0)  # hand the heap's free pages back: the next stage's rise counts every page it touches
    anon = _status_kib("RssAnon")
    _peaks.update(anon=anon, file=_status_kib("RssFile"), floor=anon, drawup=0)
    _last.update(time=time.time(), rss=_status_kib("VmRSS"), anon=anon)


if os.environ.get("BENCH_STAGES") and __name__ != "__main__":  # imported by the CLI child while it parses the config
    record("startup (test)" if "test" in sys.argv else "startup")
    threading.Thread(target=_sample_forever, daemon=True, name="bench-rss-sampler").start()


class StageClock(L.Callback):
    """Ends a stage at each hook named in ``marks`` (hook -> stage name), on rank 0, with :func:`record`."""

    def __init__(self, marks: dict[str, str]):
        self.marks = marks

    def _mark(self, hook: str, trainer: L.Trainer) -> None:
        if hook in self.marks and trainer.global_rank == 0:
            record(self.marks[hook])

    def setup(self, trainer, pl_module, stage):
        self._mark("setup", trainer)

    def on_train_end(self, trainer, pl_module):
        self._mark("on_train_end", trainer)

    def on_test_end(self, trainer, pl_module):
        self._mark("on_test_end", trainer)


# ---------------------------------------------------------------------------------------- parent side
def build_model(
    folder: Path,
    hidden: int,
    blocks: int,
    vocab: int,
    intermediate: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    seed: int,
) -> Path:
    """A random-init Llama with a word-level tokenizer over ``w0..w{vocab-5}``, saved once under ``folder``."""
    if (folder / "config.json").exists() and (folder / "tokenizer.json").exists():
        return folder
    import torch
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(vocab - len(SPECIALS) - 3)] + ["?", ":", "\n"]
    backend = Tokenizer(WordLevel(vocab={t: i for i, t in enumerate(SPECIALS + words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=blocks,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    tmp = folder.with_name(folder.name + ".tmp")
    LlamaForCausalLM(config).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def write_questions(path: Path, n_rows: int, words: int, vocab: int, seed: int) -> Path:
    """``n_rows // 2`` two-choice questions of random words (``words`` per question, half that per choice)."""
    import random

    rng = random.Random(seed)
    pool = [f"w{i}" for i in range(vocab - len(SPECIALS) - 3)]
    with open(path, "w") as handle:
        for q in range(n_rows // 2):
            question = " ".join(rng.choices(pool, k=words)) + " ?"
            choices = [" ".join(rng.choices(pool, k=max(1, words // 2))) for _ in range(2)]
            handle.write(json.dumps({"id": f"q{q}", "question": question, "choices": choices, "answer": q % 2}) + "\n")
    return path


def _callbacks(subcommand: str) -> list[dict]:
    clock = "bench_scale.StageClock"
    if subcommand == "test":
        return [
            {"class_path": clock, "init_args": {"marks": {"setup": "evaluation startup", "on_test_end": "evaluation"}}}
        ]
    return [
        {"class_path": clock, "init_args": {"marks": {"setup": "capture+cache", "on_train_end": "auto-encoders"}}},
        {"class_path": "es_lightning.callbacks.LayerPairingCallback"},
        {"class_path": clock, "init_args": {"marks": {"setup": "pair search", "on_train_end": "pairing report"}}},
        {"class_path": "es_lightning.callbacks.SteeringVectorCallback"},
        {"class_path": clock, "init_args": {"marks": {"on_train_end": "vectors"}}},
    ]


def write_config(
    path: Path,
    subcommand: str,
    args: argparse.Namespace,
    work: Path,
    expert: Path,
    target: Path,
    data: Path,
    n_questions: int,
    cache_dir: Path,
) -> Path:
    """The run's config: configs/default.yaml with the bench's models, data, callbacks and a small evaluation."""
    import yaml

    config = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    config["trainer"].update(
        callbacks=_callbacks(subcommand),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=1,
    )
    config["output_dir"] = str(work / "runs")
    model = config["model"]
    model["pairing"]["mi_options"] = {"n_components": 2 if args.quick else 4}
    questions = min(args.eval_questions, n_questions)
    model["evaluation"].update(
        folds=2,
        max_questions=questions,
        max_val_questions=max(2, questions // 5),
        random_draws=1,
        coefficients=[-0.4, 0.4],
        permutations=100,
    )
    for side, folder in (("expert", expert), ("target", target)):
        config["data"][side].update(name=str(folder), max_length=config_max_length(args.words))
    config["data"]["data"]["path"] = str(data)
    config["data"]["cache_dir"] = str(cache_dir)
    config["data"]["progress"] = False
    config["data"].pop("predict_data", None)
    if args.quick:
        config["data"]["splits"]["val_fraction"] = 0.25
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_stages(subcommand: str, config: Path, run_name: str, extra: list[str], stages_file: Path) -> list[dict]:
    """One CLI run in a child process; returns its stage rows."""
    stages_file.unlink(missing_ok=True)
    env = dict(
        os.environ,
        BENCH_T0=repr(time.time()),
        BENCH_STAGES=str(stages_file),
        PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parent), str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    command = [
        sys.executable,
        "-m",
        "es_lightning.cli",
        "--quiet",
        subcommand,
        "--config",
        str(config),
        "--run_name",
        run_name,
        *extra,
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return [json.loads(line) for line in stages_file.read_text().splitlines()]


def estimates(expert: Path, target: Path, n_rows: int, args: argparse.Namespace) -> dict[str, float]:
    """The memory estimator's host figure (MiB) for each measured stage of this CPU run (the settings of
    :func:`write_config`; every split is cached, test rows included), and for the cache on disk."""
    import yaml

    data = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())["data"]
    e, t = read_shape(expert, "expert"), read_shape(target, "target")
    val = 0.25 if args.quick else data["splits"]["val_fraction"]
    n_heldout = round(n_rows * val)
    n_test = round(n_rows * (val if args.quick else data["splits"]["test_fraction"]))
    settings = RunSettings(
        n_rows - n_heldout - n_test,
        n_heldout,
        e.layers,
        e.layers - 1,
        t.layers,
        t.layers - 1,
        n_test=n_test,
        cache_dtype=args.cache_dtype or "float32",
        extract_batch_tokens=args.extract_batch_tokens or data["extract_batch_tokens"],
        extract_batch_size=data["extract_batch_size"],
        max_length=config_max_length(args.words),
        shard_rows=data["shard_size"],
        max_components=256,
        top_k=3,
        batch_size=data["batch_size"],
        prompt_tokens=args.words + 4,
        completion_tokens=args.words // 2 + 1,
    )
    by_name = {s.stage: s for s in estimate_stages(e, t, settings)}
    mib = {name: s.host_bytes / 2**20 for name, s in by_name.items()}
    return {
        "capture+cache": max(mib["capture expert"], mib["capture target"]) + mib["cache"],
        "pair search": mib["pair search"],
        "auto-encoders": mib["auto-encoders"],
        "vectors": mib["rfm"],
        "evaluation": mib["evaluation"],
        "cache on disk": by_name["cache"].disk_bytes / 2**20,
    }


def print_table(result: dict) -> None:
    """Each stage of one n: time, peak RSS, the rise of anonymous memory over the stage's start, the file-backed peak
    (mapped weights and cache), the estimate and measured / estimated."""
    n, predicted = result["n"], result["estimate_mib"]
    print(
        f"\nn = {n}: cache on disk {result['cache_mib']:.1f} MiB (estimate {predicted['cache on disk']:.1f} MiB)",
        flush=True,
    )
    print(
        f"  {'stage':<20} {'seconds':>9} {'peak RSS MiB':>13} {'anon rise MiB':>14} {'file peak MiB':>14} "
        f"{'estimate MiB':>13} {'ratio':>6}"
    )
    for row in result["stages"]:
        guess, rise = predicted.get(row["stage"]), row["anon_rise_mib"]
        ratio = f"{rise / guess:.2f}" if guess else ""
        print(
            f"  {row['stage']:<20} {row['seconds']:>9.1f} {row['peak_rss_mib']:>13.0f} {rise:>14.0f} "
            f"{row['peak_file_mib']:>14.0f} {'' if guess is None else f'{guess:.0f}':>13} {ratio:>6}",
            flush=True,
        )


def growth(ns: list[int], values: list[float]) -> tuple[float, float]:
    """Least-squares slope of log(value) on log(n) and the value it extrapolates to at n = 10,000."""
    xs, ys = [math.log(n) for n in ns], [math.log(max(v, 1e-3)) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(sum((x - mx) ** 2 for x in xs), 1e-12)
    return slope, math.exp(my + slope * (math.log(10_000) - mx))


def _disk_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20 if folder.exists() else 0.0


def work_folder(args: argparse.Namespace) -> Path:
    """Where the models, data and caches of these widths live."""
    return Path(args.work) / (
        f"e{args.expert_hidden}x{args.expert_blocks}-t{args.target_hidden}x{args.target_blocks}-v{args.vocab}"
        f"-i{args.intermediate}-h{args.heads}-{args.kv_heads}-{args.head_dim}"
    )


def reprint(saved: Path) -> None:
    """Print the per-stage tables of a saved run with the estimator as it is now."""
    data = json.loads(saved.read_text())
    args = argparse.Namespace(**data["args"])
    work = work_folder(args)
    for result in data["results"]:
        print_table({**result, "estimate_mib": estimates(work / "expert", work / "target", result["n"], args)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, nargs="+", help="cached rows (choice texts) per run; default 500 1000 2000")
    parser.add_argument("--expert-hidden", type=int, default=3584)
    parser.add_argument("--expert-blocks", type=int, default=28)
    parser.add_argument("--target-hidden", type=int, default=4096)
    parser.add_argument("--target-blocks", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--heads", type=int, default=4, help="query heads (of --head-dim each)")
    parser.add_argument("--kv-heads", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--words", type=int, default=8, help="words per question (half that per choice)")
    parser.add_argument(
        "--eval-questions", type=int, default=80, help="questions of the nested evaluation (fixed in n)"
    )
    parser.add_argument("--no-test", action="store_true", help="skip the evaluation stage")
    parser.add_argument(
        "--cache-dtype", choices=["float32", "bfloat16", "float16"], help="passed as --data.cache_dtype"
    )
    parser.add_argument("--extract-batch-tokens", type=int, help="passed as --data.extract_batch_tokens")
    parser.add_argument("--work", type=Path, default=Path("/tmp/es_bench_scale"), help="models, data, caches and runs")
    parser.add_argument("--out", type=Path, help="results JSON (written atomically)")
    parser.add_argument(
        "--from",
        dest="saved",
        type=Path,
        help="reprint a saved --out file's tables with the current estimator; runs nothing",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny widths (64/48, 4/6 blocks), n in {50, 100}: a smoke test"
    )
    args = parser.parse_args()
    if args.quick:
        args.expert_hidden, args.expert_blocks, args.target_hidden, args.target_blocks = 64, 4, 48, 6
        args.heads, args.kv_heads, args.head_dim, args.intermediate, args.vocab = 4, 1, 16, 64, 128
        args.n, args.eval_questions = args.n or [50, 100], min(args.eval_questions, 24)
    if args.saved:
        reprint(args.saved)
        return
    ns = sorted(args.n or [500, 1000, 2000])
    work = work_folder(args)
    work.mkdir(parents=True, exist_ok=True)
    common = {
        "vocab": args.vocab,
        "intermediate": args.intermediate,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "head_dim": args.head_dim,
    }
    start = time.perf_counter()
    expert = build_model(work / "expert", args.expert_hidden, args.expert_blocks, seed=0, **common)
    target = build_model(work / "target", args.target_hidden, args.target_blocks, seed=1, **common)
    print(f"models ready in {time.perf_counter() - start:.0f} s under {work}", flush=True)
    extra = [f"--data.cache_dtype={args.cache_dtype}"] if args.cache_dtype else []
    extra += [f"--data.extract_batch_tokens={args.extract_batch_tokens}"] if args.extract_batch_tokens else []

    results = []
    for n in ns:
        tag = f"n{n}-{int(time.time())}"
        data = write_questions(work / f"n{n}.jsonl", n, args.words, args.vocab, seed=n)
        cache = work / "caches" / f"n{n}"  # the same rows and models: a rerun reuses the cache
        stages = run_stages(
            "fit",
            write_config(work / f"{tag}-fit.yaml", "fit", args, work, expert, target, data, n // 2, cache),
            tag,
            extra,
            work / f"{tag}-stages.jsonl",
        )
        cache_mib = _disk_mib(cache)
        if not args.no_test:
            stages += run_stages(
                "test",
                write_config(work / f"{tag}-test.yaml", "test", args, work, expert, target, data, n // 2, cache),
                tag,
                [*extra, "--ckpt_path", str(work / "runs" / tag / "last.ckpt")],
                work / f"{tag}-stages.jsonl",
            )
        predicted = estimates(expert, target, n, args)
        results.append({"n": n, "stages": stages, "cache_mib": cache_mib, "estimate_mib": predicted})
        print_table(results[-1])

    fits = {}
    if len(ns) >= 2:
        print(f"\ngrowth in n (log-log least squares over n = {ns}) and extrapolation to n = 10,000")
        print(
            f"  {'stage':<20} {'time exp':>9} {'s @10k':>9} {'peak exp':>9} {'peak MiB @10k':>14} "
            f"{'rise exp':>9} {'rise MiB @10k':>14}"
        )
        for stage in [r["stage"] for r in results[0]["stages"] if not r["stage"].startswith("startup")]:
            rows = [next(r for r in res["stages"] if r["stage"] == stage) for res in results]
            t_exp, t_10k = growth(ns, [r["seconds"] for r in rows])
            p_exp, p_10k = growth(ns, [r["peak_rss_mib"] for r in rows])
            r_exp, r_10k = growth(ns, [max(r["anon_rise_mib"], 1.0) for r in rows])
            fits[stage] = {
                "time_exponent": t_exp,
                "seconds_at_10k": t_10k,
                "peak_exponent": p_exp,
                "peak_mib_at_10k": p_10k,
                "rise_exponent": r_exp,
                "rise_mib_at_10k": r_10k,
            }
            print(
                f"  {stage:<20} {t_exp:>9.2f} {t_10k:>9.0f} {p_exp:>9.2f} {p_10k:>14.0f} {r_exp:>9.2f} {r_10k:>14.0f}"
            )
        c_exp, c_10k = growth(ns, [max(r["cache_mib"], 1e-3) for r in results])
        fits["cache on disk"] = {"exponent": c_exp, "mib_at_10k": c_10k}
        print(f"  {'cache on disk':<20} exponent {c_exp:.2f}, {c_10k:.0f} MiB at 10k")
    if args.out:
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "results": results,
                    "growth": fits,
                },
                indent=2,
            )
        )
        os.replace(tmp, args.out)
        print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
