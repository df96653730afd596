#!/usr/bin/env bash
# The GPU check, benchmarks/gpu_check.py (its docstring says what it runs and prints): random-init models at the
# paper's widths and generated data, so it needs no network and no ../shared/data. Arguments pass through:
#
#   bash benchmarks/gpu_check.sh              # one GPU (and a 2-process DDP fit when two are visible)
#   bash benchmarks/gpu_check.sh --dry-run    # the same steps on CPU at tiny widths
#
# Runs the es_lightning of this checkout (put on PYTHONPATH); PYTHON picks the interpreter (default python3). On a lent
# machine without network, `python benchmarks/wheelhouse.py` (run beforehand where there is network) prints the
# one call that installs the missing packages offline and runs this check.
set -euo pipefail
checkout="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${checkout}${PYTHONPATH:+:${PYTHONPATH}}"
exec "${PYTHON:-python3}" "${checkout}/benchmarks/gpu_check.py" "$@"
