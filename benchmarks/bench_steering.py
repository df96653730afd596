"""Throughput of steered against unsteered greedy generation on a real model, in one process.

Runs every configuration once per round, in a rotated order, for several rounds, and reports the median
tokens per second and the median per-round throughput ratio steered/unsteered, by wall-clock time and by
this process's CPU time (the latter barely moves when other processes share the CPUs). The issue's goal
is a cost under 3% of throughput; this script reports what it measures and asserts nothing.

    python benchmarks/bench_steering.py --repeats 5 --new-tokens 32
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from es_lightning.models import get_blocks, hidden_size, load_model
from es_lightning.steering.hooks import steer

PROMPTS = [
    "Explain why the sky is blue.",
    "Write a short poem about the sea.",
    "What is the capital of France, and why is it famous?",
    "Give three tips for learning a new language.",
    "Describe how a bicycle works.",
    "Summarise the plot of a detective story in two sentences.",
    "Why do cats purr?",
    "List the planets of the solar system in order.",
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=5, help="rounds; each runs every configuration once")
    parser.add_argument("--new-tokens", type=int, default=32, help="generated tokens per sequence (fixed)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--many-layers", type=int, default=10, help="how many middle layers the 'many' runs steer")
    parser.add_argument("--coefficient", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="e.g. cpu or cuda")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device=args.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    tokenizer.padding_side = "left"
    depth, width = len(get_blocks(model)), hidden_size(model)
    generator = torch.Generator().manual_seed(0)

    def unit_vectors(layers: list[int]) -> dict[int, torch.Tensor]:
        vectors = {layer: torch.randn(width, generator=generator) for layer in layers}
        return {layer: v / v.norm() for layer, v in vectors.items()}

    first = (depth - args.many_layers) // 2
    many = unit_vectors(list(range(first, first + args.many_layers)))
    one = unit_vectors([depth // 2])
    configs: dict[str, dict | None] = {
        "unsteered": None,
        "1 layer": {"vectors": one},
        f"{args.many_layers} layers": {"vectors": many},
        f"{args.many_layers} layers, generated": {"vectors": many, "positions": "generated"},
    }
    print(
        f"model {args.model} on {args.device}: {depth} blocks, hidden {width}; "
        f"torch threads {torch.get_num_threads()}; {args.new_tokens} new tokens; "
        f"coefficient {args.coefficient}; {args.repeats} rounds"
    )

    def run(encoding, config: dict | None) -> tuple[float, float, torch.Tensor]:
        kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
        start, start_cpu = time.perf_counter(), time.process_time()
        with torch.no_grad():
            if config is None:
                out = model.generate(**encoding, **kwargs)
            else:
                with steer(model, coefficient=args.coefficient, **config):
                    out = model.generate(**encoding, **kwargs)
        if out.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, time.process_time() - start_cpu, out[:, encoding.input_ids.shape[1] :]

    rows = []
    for batch in args.batch_sizes:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        encoding = tokenizer(prompts, return_tensors="pt", padding=True).to(args.device)
        names = list(configs)
        outputs = {name: run(encoding, configs[name])[2] for name in names}  # warm-up, and keep outputs
        wall: dict[str, list[float]] = {name: [] for name in names}
        cpu: dict[str, list[float]] = {name: [] for name in names}
        for round_ in range(args.repeats):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            for name in order:
                seconds, cpu_seconds, _ = run(encoding, configs[name])
                wall[name].append(seconds)
                cpu[name].append(cpu_seconds)
        tokens = batch * args.new_tokens
        for name in names:
            ratios = [base / steered for base, steered in zip(wall["unsteered"], wall[name])]
            cpu_ratio = statistics.median(base / steered for base, steered in zip(cpu["unsteered"], cpu[name]))
            changed = (outputs[name] != outputs["unsteered"]).float().mean().item()
            rows.append(
                (
                    batch,
                    name,
                    tokens / statistics.median(wall[name]),
                    statistics.median(ratios),
                    min(ratios),
                    max(ratios),
                    cpu_ratio,
                    changed,
                )
            )

    print(
        "\n| batch | configuration | tokens/s (wall, median) | ratio (wall, median) | ratio min..max | "
        "ratio (CPU time, median) | tokens changed |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|")
    for batch, name, rate, ratio, low, high, cpu_ratio, changed in rows:
        print(
            f"| {batch} | {name} | {rate:.1f} | {ratio:.3f} | {low:.3f}..{high:.3f} | {cpu_ratio:.3f} | {changed:.0%} |"
        )


if __name__ == "__main__":
    main()
