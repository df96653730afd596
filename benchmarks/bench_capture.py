"""Benchmark: hook-based capture of middle layers (early stop) vs a full forward with output_hidden_states=True.

Runs both on the real ``smollm2-135m-instruct`` in one process, interleaved, and prints the speed ratio and
the peak resident-memory increase of each (sampled with psutil every 5 ms; a CPU build of torch has no
allocator statistics, so RSS above the pre-run level is the honest proxy).

    python benchmarks/bench_capture.py --repeats 5 --batch 16
"""

from __future__ import annotations

import argparse
import gc
import statistics
import threading
import time

import psutil
import torch

from es_lightning.models import capture_hidden_states, load_model


class PeakRSS:
    """Sample this process's RSS in a thread; ``peak - start`` is the memory a block needed."""

    def __enter__(self):
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()

    @property
    def delta_mib(self) -> float:
        return (self.peak - self.start) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--layers", default="10,12,14", help="comma-separated block indices to capture")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    loaded = load_model(args.model)
    model = loaded.model
    torch.manual_seed(0)
    ids = torch.randint(100, 1000, (args.batch, args.tokens))
    mask = torch.ones_like(ids)

    def capture():
        return capture_hidden_states(model, ids, mask, layers, "last")

    @torch.no_grad()
    def full():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        return torch.stack([out.hidden_states[i + 1][:, -1] for i in layers], 1)

    # Memory first, before anything warms the allocator: capture, then the full forward (which can only
    # reuse what capture left, so its increase is, if anything, under-stated).
    times = {"capture": [], "full": []}
    peaks = {"capture": 0.0, "full": 0.0}
    for _ in range(args.repeats):
        for name, fn in (("capture", capture), ("full", full)):
            gc.collect()
            with PeakRSS() as rss:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
            peaks[name] = max(peaks[name], rss.delta_mib)
    torch.testing.assert_close(capture(), full(), rtol=1e-4, atol=1e-4)  # both gave the same numbers
    cap, ful = statistics.median(times["capture"]), statistics.median(times["full"])
    depth = len(model.model.layers)
    print(
        f"model={args.model} blocks={depth} layers={layers} batch={args.batch} tokens={args.tokens} "
        f"repeats={args.repeats} threads={torch.get_num_threads()}"
    )
    print("| method | median s | peak RSS increase (MiB) |")
    print("|---|---|---|")
    print(f"| capture (hooks, stop after block {max(layers)}) | {cap:.3f} | {peaks['capture']:.0f} |")
    print(f"| full forward, output_hidden_states=True | {ful:.3f} | {peaks['full']:.0f} |")
    print(f"speed-up (full / capture): {ful / cap:.2f}x")


if __name__ == "__main__":
    main()
