"""Time and memory of ``fit_rfm`` (``rfm_direction`` is a thin wrapper with the same cost) on planted data.

Each (n, d) point runs in a fresh Python process so its memory is measured alone: peak RSS of that
process (``resource.getrusage(...).ru_maxrss``) minus its RSS just before the fit (after imports and data
generation). This counts torch's allocations, which ``tracemalloc`` cannot see. The table ends with
the least-squares slope of log(time) against log(n) for each d.

    python benchmarks/bench_rfm.py                      # n in 500..4000, d in 576, 896 (several minutes)
    python benchmarks/bench_rfm.py --ns 500 1000 --ds 64  # quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import numpy as np


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_one(n: int, d: int, seed: int) -> dict:
    """Fit one planted problem in this process; return timing, memory and quality figures."""
    import torch

    from es_lightning.steering.rfm import fit_rfm

    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g)
    u /= u.norm()
    x = torch.randn(n, d, generator=g)
    y = ((x @ u) ** 3 + 0.3 * torch.randn(n, generator=g) > 0).long()
    before = _rss_bytes()
    result = fit_rfm(x, y, seed=seed)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    return {
        "n": n,
        "d": d,
        "seconds": result.fit_seconds,
        "peak_rss_delta_mib": (peak - before) / 2**20,
        "n_grid_train": result.n_grid_train,
        "val_auc": result.val_score,
        "cos": float(result.direction @ u),
        "bandwidth_scale": result.bandwidth_scale,
        "reg": result.reg,
        "threads": torch.get_num_threads(),
    }


def scaling_exponent(ns: list[int], seconds: list[float]) -> float:
    """Slope of the least-squares line of log(seconds) on log(n)."""
    return float(np.polyfit(np.log(ns), np.log(seconds), 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ns", type=int, nargs="+", default=[500, 1000, 2000, 4000])
    parser.add_argument("--ds", type=int, nargs="+", default=[576, 896])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--one", type=int, nargs=2, metavar=("N", "D"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one, args.seed)))
        return

    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    header = (
        f"{'d':>5} {'n':>6} {'grid n':>7} {'seconds':>8} {'peak RSS delta MiB':>19} {'val AUC':>8} "
        f"{'cos(v,u)':>9} {'bw':>4} {'reg':>6}"
    )
    print(header)
    print("-" * len(header))
    for d in args.ds:
        times = []
        for n in args.ns:
            out = subprocess.run(
                [sys.executable, __file__, "--one", str(n), str(d), "--seed", str(args.seed)],
                check=True,
                capture_output=True,
                text=True,
            )
            row = json.loads(out.stdout.strip().splitlines()[-1])
            times.append(row["seconds"])
            print(
                f"{d:>5} {n:>6} {row['n_grid_train']:>7} {row['seconds']:>8.1f} {row['peak_rss_delta_mib']:>19.0f} "
                f"{row['val_auc']:>8.3f} {row['cos']:>9.3f} {row['bandwidth_scale']:>4g} {row['reg']:>6g}",
                flush=True,
            )
        if len(args.ns) > 1:
            print(f"d={d}: time ~ n^{scaling_exponent(args.ns, times):.2f} (log-log least squares over n={args.ns})")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
