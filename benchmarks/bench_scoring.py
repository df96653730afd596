"""Benchmark: multiple-choice scoring with the prompt's KV cache shared by its choices vs a full forward of
prompt + choice for every choice, on the same questions, in one process.

Both give the same log-likelihoods (checked here to 1e-3, and to 1e-4 in tests/test_scoring.py); the
naive way uses ``logits_to_keep`` so that it, too, computes logits only where they are needed.

    python benchmarks/bench_scoring.py --questions 24 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from es_lightning.evaluation.scoring import score_choices
from es_lightning.models import load_model


@torch.no_grad()
def naive_scores(model, tokenizer, prompts, choices) -> list[list[float]]:
    """Sum of choice-token log-probs from one full forward per (prompt, choice)."""
    out = []
    for prompt, row in zip(prompts, choices):
        prompt_ids = tokenizer(prompt)["input_ids"]
        sums = []
        for choice in row:
            choice_ids = tokenizer(choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt_ids + choice_ids])
            logits = model(input_ids=ids, logits_to_keep=len(choice_ids) + 1).logits[0, :-1].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            sums.append(float(logprobs[torch.arange(len(choice_ids)), torch.tensor(choice_ids)].sum()))
        out.append(sums)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", default="../shared/data/truthfulqa_mc.jsonl")
    parser.add_argument("--questions", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()[: args.questions]]
    prompts = [f"Question: {r['question']}\nAnswer:" for r in rows]
    choices = [[f" {c}" for c in r["choices"]] for r in rows]
    loaded = load_model(args.model, dtype=args.dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    times = {"cached": [], "naive": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        cached = score_choices(model, tokenizer, prompts, choices, batch_size=32, progress=False)
        times["cached"].append(time.perf_counter() - start)
        start = time.perf_counter()
        naive = naive_scores(model, tokenizer, prompts, choices)
        times["naive"].append(time.perf_counter() - start)
    worst = max(abs(a - b) / max(1.0, abs(b)) for s, n in zip(cached, naive) for a, b in zip(s.logprob_sum, n))
    n_choices = sum(len(c) for c in choices)
    c, n = statistics.median(times["cached"]), statistics.median(times["naive"])
    print(
        f"model={args.model} dtype={args.dtype} questions={len(prompts)} choices={n_choices} repeats={args.repeats} "
        f"threads={torch.get_num_threads()} max relative difference={worst:.1e}"
    )
    print("| method | median s | questions/s |")
    print("|---|---|---|")
    print(f"| prompt once, KV cache shared by the choices | {c:.2f} | {len(prompts) / c:.1f} |")
    print(f"| full forward per choice | {n:.2f} | {len(prompts) / n:.1f} |")
    print(f"speed-up: {n / c:.2f}x")
    if worst > 1e-3 and args.dtype == "float32":
        raise SystemExit("cached and naive scores differ")


if __name__ == "__main__":
    main()
