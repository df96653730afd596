"""Per-stage memory of the paper-scale pairs in configs/paper/, from es_lightning.memory's estimator (not a test).

The models cannot be downloaded here, so their shapes are the published ``config.json`` values, written below. For
each pair and each n (labelled rows = choice texts), prints GPU and host memory per stage as ``estimate_stages``
computes them for one rank on CUDA, with bfloat16 models, float32 auto-encoders and RFM, and the cache in
float32 or bfloat16 storage. Usage::

    python benchmarks/estimate_paper.py            # n = 2000 and 10000
    python benchmarks/estimate_paper.py --n 5000
"""

from __future__ import annotations

import argparse

from es_lightning.memory import ModelShape, RunSettings, estimate_stages
from es_lightning.memory.estimate import gib

# config.json of each Hub model (hidden_size, num_hidden_layers, vocab_size, intermediate_size, heads, kv heads,
# head_dim)
LLAMA_31_8B = ModelShape("meta-llama/Llama-3.1-8B-Instruct", 4096, 32, 128256, 14336, 32, 8, 128)
OPENBIO_8B = ModelShape("aaditya/Llama3-OpenBioLLM-8B", 4096, 32, 128256, 14336, 32, 8, 128)
QWEN_MATH_7B = ModelShape("Qwen/Qwen2.5-Math-7B-Instruct", 3584, 28, 152064, 18944, 28, 4, 128)
GEMMA2_9B = ModelShape("google/gemma-2-9b-it", 3584, 42, 256000, 14336, 16, 8, 256, tied_embeddings=True)

# (config, expert, target, captured expert blocks, captured target blocks, prompt tokens of a scored question)
PAIRS = [
    ("medical_pubmedqa_llama31", OPENBIO_8B, LLAMA_31_8B, range(8, 24), range(8, 24), 512),
    ("math_gsm8k_qwen_to_llama31", QWEN_MATH_7B, LLAMA_31_8B, range(7, 21), range(8, 24), 256),
    ("truthfulqa_gemma2_to_llama31", GEMMA2_9B, LLAMA_31_8B, range(42), range(32), 128),
]


def rows(n: int, cache_dtype: str) -> list[tuple[str, str, str, str]]:
    """(config, stage, GPU, host) for every pair at ``n`` rows (85% fit/train, 15% held out)."""
    out = []
    for name, expert, target, e_layers, t_layers, prompt in PAIRS:
        settings = RunSettings(
            n_train=int(0.85 * n),
            n_heldout=n - int(0.85 * n),
            expert_layers=len(e_layers),
            expert_deepest=max(e_layers),
            target_layers=len(t_layers),
            target_deepest=max(t_layers),
            expert_dtype="bfloat16",
            target_dtype="bfloat16",
            cache_dtype=cache_dtype,
            extract_batch_tokens=16384,
            max_length=prompt,
            batch_size=64,
            eval_batch=32,
            prompt_tokens=prompt,
            completion_tokens=16,
            device="cuda",
        )
        for estimate in estimate_stages(expert, target, settings):
            disk = f" (disk {gib(estimate.disk_bytes)})" if estimate.disk_bytes else ""
            out.append((name, estimate.stage, gib(estimate.device_bytes), gib(estimate.host_bytes) + disk))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[2000, 10000], help="labelled rows (choice texts)")
    parser.add_argument("--cache-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    for n in args.n:
        print(f"\nn = {n} rows, cache in {args.cache_dtype}, one rank on CUDA\n")
        print("| config | stage | GPU | host |\n|---|---|---|---|")
        for row in rows(n, args.cache_dtype):
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
