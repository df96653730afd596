"""Generation throughput of the folded checkpoint (``es-lightning-export hf``) against hook steering and the
unsteered model, in one process.

The steering is a bundle of random unit vectors on three middle blocks, scaled by each block's mean
hidden-state norm (measured on the prompts) times ``--coefficient``, or a real bundle with ``--bundle``. The
folded checkpoint is written to a temporary folder with the export code and loaded with plain
``AutoModelForCausalLM.from_pretrained``. Every configuration runs once per round in a rotated order;
the script reports median tokens/s, the median per-round ratio to unsteered by wall-clock time and by this
process's CPU time (which moves much less when other processes share the CPUs), and whether the folded
model's greedy tokens equal hook steering's. It asserts nothing.

    python benchmarks/bench_folded.py --repeats 5 --new-tokens 32
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_steering import PROMPTS  # the steering-overhead benchmark's prompts (this script's folder is on sys.path)

from es_lightning.export.hf import export_hf
from es_lightning.export.source import load_source, resolve_target
from es_lightning.models import get_blocks, hidden_size, load_model
from es_lightning.steering.bundle import ModelIdentity, SteeringBundle
from es_lightning.steering.hooks import steer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--bundle", help="a bundle .safetensors for --model (default: random vectors)")
    parser.add_argument("--layers", type=int, nargs="+", default=[12, 15, 17])
    parser.add_argument("--coefficient", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args()


def random_bundle(loaded, layers: list[int], folder: Path) -> Path:
    """Random unit vectors on ``layers``, with the layers' mean hidden-state norms over the prompts."""
    tokenizer, model = loaded.tokenizer, loaded.model
    encoding = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        states = model(**encoding, output_hidden_states=True).hidden_states
    mask = encoding.attention_mask.bool()
    mask[torch.arange(len(PROMPTS)), mask.int().argmax(1)] = False  # not the first real token: an attention sink
    norms = {j: float(states[j + 1][mask].norm(dim=-1).mean()) for j in layers}
    generator = torch.Generator().manual_seed(0)
    directions = {j: torch.randn(hidden_size(model), generator=generator) for j in layers}
    bundle = SteeringBundle.from_directions("random", directions, norms, ModelIdentity.of(loaded))
    return bundle.save(folder / "bundles" / "random.safetensors")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    tokenizer.padding_side = "left"
    work = Path(tempfile.mkdtemp(prefix="bench-folded-"))
    bundle_path = Path(args.bundle) if args.bundle else random_bundle(loaded, args.layers, work)
    source = load_source(bundle_path, coefficient=args.coefficient)
    start = time.perf_counter()
    folded_dir = export_hf(source, work / "folded", resolve_target(source.bundle, args.model))
    export_seconds = time.perf_counter() - start
    from transformers import AutoModelForCausalLM

    folded = AutoModelForCausalLM.from_pretrained(folded_dir, dtype=model.dtype).eval()
    kwargs = source.bundle.steering_kwargs(source.coefficient)
    print(
        f"model {args.model}: {len(get_blocks(model))} blocks; torch threads {torch.get_num_threads()}; "
        f"{source.method} x {source.coefficient} on blocks {source.bundle.layers}; {args.new_tokens} new tokens; "
        f"{args.repeats} rounds; export took {export_seconds:.1f} s"
    )

    def run(encoding, name: str) -> tuple[float, float, torch.Tensor]:
        gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
        begin, begin_cpu = time.perf_counter(), time.process_time()
        with torch.no_grad():
            if name == "unsteered":
                out = model.generate(**encoding, **gen)
            elif name == "hook steering":
                with steer(model, **kwargs):
                    out = model.generate(**encoding, **gen)
            else:
                out = folded.generate(**encoding, **gen)
        return time.perf_counter() - begin, time.process_time() - begin_cpu, out[:, encoding.input_ids.shape[1] :]

    names = ["unsteered", "hook steering", "folded checkpoint"]
    rows = []
    for batch in args.batch_sizes:
        encoding = tokenizer([PROMPTS[i % len(PROMPTS)] for i in range(batch)], return_tensors="pt", padding=True)
        outputs = {name: run(encoding, name)[2] for name in names}  # warm-up, and keep outputs
        wall: dict[str, list[float]] = {name: [] for name in names}
        cpu: dict[str, list[float]] = {name: [] for name in names}
        for round_ in range(args.repeats):
            for name in names[round_ % 3 :] + names[: round_ % 3]:
                seconds, cpu_seconds, _ = run(encoding, name)
                wall[name].append(seconds)
                cpu[name].append(cpu_seconds)
        for name in names:
            ratios = [base / other for base, other in zip(wall["unsteered"], wall[name])]
            cpu_ratios = [base / other for base, other in zip(cpu["unsteered"], cpu[name])]
            same = bool(torch.equal(outputs[name], outputs["hook steering"]))
            rows.append(
                (
                    batch,
                    name,
                    batch * args.new_tokens / statistics.median(wall[name]),
                    statistics.median(ratios),
                    min(ratios),
                    max(ratios),
                    statistics.median(cpu_ratios),
                    min(cpu_ratios),
                    max(cpu_ratios),
                    same,
                )
            )
    print(
        "\n| batch | configuration | tokens/s (wall, median) | / unsteered (wall, median) | min..max | "
        "/ unsteered (CPU time, median) | min..max | tokens = hook steering's |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---|")
    for batch, name, rate, ratio, low, high, cpu_ratio, cpu_low, cpu_high, same in rows:
        print(
            f"| {batch} | {name} | {rate:.1f} | {ratio:.3f} | {low:.3f}..{high:.3f} | {cpu_ratio:.3f} | "
            f"{cpu_low:.3f}..{cpu_high:.3f} | {'yes' if same else 'no'} |"
        )


if __name__ == "__main__":
    main()
