"""Many steering variants in one batch (rows carry their own vectors and coefficients) against one steering context
per variant, for multiple-choice scoring and for greedy generation, on a real model, side by side in one process.

The workload is the evaluation's: a fold's val questions times the sweep's variants (no steering, and every
coefficient of the grid for two vectors), plus a random-draw set. Each configuration runs once per round in a
rotated order; the script reports median seconds, the batched/looped speed-up by wall-clock and by this process's
CPU time, and how far the batched results are from the looped ones (max abs difference of the choices' summed
log-probs; share of generated tokens that differ). It asserts nothing.

    python benchmarks/bench_batched_steering.py --questions 12 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from es_lightning.evaluation.scoring import score_choices
from es_lightning.models import get_blocks, hidden_size, load_model
from es_lightning.models.prompting import render_prompt
from es_lightning.steering.generation import GenerationSettings, generate_rendered
from es_lightning.steering.hooks import SteeringVariant, row_steering, steer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", default="../shared/data/truthfulqa_mc.jsonl")
    parser.add_argument("--questions", type=int, default=12)
    parser.add_argument("--coefficients", type=float, nargs="+", default=[-0.8, -0.4, -0.2, -0.1, 0.1, 0.2, 0.4, 0.8])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--score-batch", type=int, default=32, help="choices per scoring pass (the default config's)")
    parser.add_argument("--generate-batch", type=int, default=64, help="rows per generate call, batched")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()[: args.questions]]
    prompts = [f"Question: {r['question']}\nAnswer:" for r in rows]
    choices = [[f" {c}" for c in r["choices"]] for r in rows]
    depth, width = len(get_blocks(model)), hidden_size(model)
    generator = torch.Generator().manual_seed(0)
    layers = [depth // 3, depth // 2, 2 * depth // 3]
    norms = {layer: 1.0 for layer in layers}
    vectors = [{layer: torch.randn(width, generator=generator) for layer in layers} for _ in range(2)]
    vectors = [{layer: v / v.norm() for layer, v in vs.items()} for vs in vectors]
    variants = [SteeringVariant("none")] + [
        SteeringVariant(f"v{k}", c * 10, vs, norms)  # norms of 1: scale to SmolLM2's ~10
        for k, vs in enumerate(vectors)
        for c in args.coefficients
    ]
    chat = [render_prompt(tokenizer, p, True) for p in prompts] if tokenizer.chat_template else prompts
    print(
        f"{args.model}: {depth} blocks, hidden {width}; torch threads {torch.get_num_threads()}; "
        f"{len(rows)} questions x "
        f"{len(variants)} variants; {args.new_tokens} new tokens; {args.rounds} rounds"
    )

    def context(variant):
        return (
            None if not variant.steers else (lambda: steer(model, variant.vectors, variant.coefficient, variant.norms))
        )

    def score_looped():
        return [
            s
            for v in variants
            for s in score_choices(
                model, tokenizer, prompts, choices, context=context(v), batch_size=args.score_batch, progress=False
            )
        ]

    def score_batched():
        steering = row_steering(model, variants, [v for v in range(len(variants)) for _ in prompts])
        return score_choices(
            model,
            tokenizer,
            prompts * len(variants),
            choices * len(variants),
            batch_size=args.score_batch,
            progress=False,
            steering=steering,
        )

    settings_looped = GenerationSettings(max_new_tokens=args.new_tokens, batch_size=len(prompts))
    settings_batched = GenerationSettings(max_new_tokens=args.new_tokens, batch_size=args.generate_batch)

    def generate_looped():
        return [
            g
            for v in variants
            for g in generate_rendered(model, tokenizer, chat, settings_looped, False, context=context(v))
        ]

    def generate_batched():
        steering = row_steering(model, variants, [v for v in range(len(variants)) for _ in chat])
        return generate_rendered(model, tokenizer, chat * len(variants), settings_batched, False, steering=steering)

    runs = {
        "scoring, looped": score_looped,
        "scoring, batched": score_batched,
        "generation, looped": generate_looped,
        "generation, batched": generate_batched,
    }
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    outputs = {}
    with torch.inference_mode():
        for round_ in range(args.rounds):
            names = list(runs)
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                start, start_cpu = time.perf_counter(), time.process_time()
                outputs[name] = runs[name]()
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    gap = max(
        abs(x - y)
        for a, b in zip(outputs["scoring, looped"], outputs["scoring, batched"])
        for x, y in zip(a.logprob_sum, b.logprob_sum)
    )
    differ = sum(a.new_ids != b.new_ids for a, b in zip(outputs["generation, looped"], outputs["generation, batched"]))
    print(
        "\n| workload | looped s (median) | batched s (median) | speed-up wall (median of rounds) | speed-up CPU time "
        "| batched vs looped |"
    )
    print("|---|---:|---:|---:|---:|---|")
    for task, agreement in (
        ("scoring", f"max abs log-prob difference {gap:.2e}"),
        ("generation", f"{differ} of {len(outputs['generation, looped'])} answers differ"),
    ):
        looped, batched = wall[f"{task}, looped"], wall[f"{task}, batched"]
        ratio = statistics.median(a / b for a, b in zip(looped, batched))
        cpu_ratio = statistics.median(a / b for a, b in zip(cpu[f"{task}, looped"], cpu[f"{task}, batched"]))
        print(
            f"| {task} | {statistics.median(looped):.1f} | {statistics.median(batched):.1f} | {ratio:.2f}x "
            f"| {cpu_ratio:.2f}x | {agreement} |"
        )


if __name__ == "__main__":
    main()
