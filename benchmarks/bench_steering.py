"""Throughput of steered against unsteered greedy generation on a real model, in one process.

Runs every configuration once per round, in a rotated order, for several rounds, and reports the median
tokens per second and the median per-round ratio steered/unsteered. The issue's goal is a cost under 3% of
throughput; this script reports what it measures and asserts nothing.

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
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
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
    print(f"model {args.model}: {depth} blocks, hidden {width}; torch threads {torch.get_num_threads()}; "
          f"{args.new_tokens} new tokens; coefficient {args.coefficient}; {args.repeats} rounds")

    def run(encoding, config: dict | None) -> tuple[float, torch.Tensor]:
        kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
        start = time.perf_counter()
        with torch.no_grad():
            if config is None:
                out = model.generate(**encoding, **kwargs)
            else:
                with steer(model, coefficient=args.coefficient, **config):
                    out = model.generate(**encoding, **kwargs)
        return time.perf_counter() - start, out[:, encoding.input_ids.shape[1]:]

    rows = []
    for batch in args.batch_sizes:
        encoding = tokenizer([PROMPTS[i % len(PROMPTS)] for i in range(batch)], return_tensors="pt", padding=True)
        names = list(configs)
        outputs = {name: run(encoding, configs[name])[1] for name in names}  # warm-up, and keep outputs
        seconds: dict[str, list[float]] = {name: [] for name in names}
        for round_ in range(args.repeats):
            order = names[round_ % len(names):] + names[: round_ % len(names)]
            for name in order:
                seconds[name].append(run(encoding, configs[name])[0])
        tokens = batch * args.new_tokens
        for name in names:
            ratios = [base / steered for base, steered in zip(seconds["unsteered"], seconds[name])]
            changed = (outputs[name] != outputs["unsteered"]).float().mean().item()
            rows.append((batch, name, tokens / statistics.median(seconds[name]), statistics.median(ratios),
                         min(ratios), max(ratios), changed))

    print("\n| batch | configuration | tokens/s (median) | steered/unsteered (median) | min..max | tokens changed |")
    print("|---:|---|---:|---:|---:|---:|")
    for batch, name, rate, ratio, low, high, changed in rows:
        print(f"| {batch} | {name} | {rate:.1f} | {ratio:.3f} | {low:.3f}..{high:.3f} | {changed:.0%} |")


if __name__ == "__main__":
    main()
