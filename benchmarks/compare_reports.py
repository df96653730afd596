"""Compare two runs of the main job number for number: every value of ``report/report.json`` and every generated
text of ``predictions.jsonl``, leaving out what differs between any two runs (timings, file hashes, paths, dates).

    python benchmarks/compare_reports.py <run folder A> <run folder B>

Prints the count of values compared and each difference; exits 1 when the two runs' results differ.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# leaves whose path contains one of these differ between any two runs and say nothing about the results
RUN_SPECIFIC = ("seconds", "sha256", "path", "created_at", "bundles", "package_version", "meta.ckpt")


def leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted path, value)`` for every leaf of a JSON value."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from leaves(item, f"{path}[{index}]")
    else:
        yield path, value


def differences(a: Any, b: Any) -> tuple[int, list[str]]:
    """How many comparable leaves ``a`` holds, and each path whose value differs (or exists on one side only)."""
    left, right = dict(leaves(a)), dict(leaves(b))
    compared = [p for p in sorted(set(left) | set(right)) if not any(word in p for word in RUN_SPECIFIC)]
    missing = "<missing>"
    return len(compared), [
        f"{p}: {left.get(p, missing)!r} -> {right.get(p, missing)!r}"
        for p in compared
        if left.get(p, missing) != right.get(p, missing)
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    args = parser.parse_args()
    found = 0
    report_a, report_b = (json.loads((run / "report" / "report.json").read_text()) for run in (args.run_a, args.run_b))
    count, diff = differences(report_a, report_b)
    print(f"report.json: {count} values compared, {len(diff)} differ")
    found += len(diff)
    rows_a, rows_b = (
        [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines() if line.strip()]
        for run in (args.run_a, args.run_b)
    )
    count, diff_rows = differences(rows_a, rows_b)
    print(f"predictions.jsonl: {len(rows_a)} and {len(rows_b)} rows, {count} values compared, {len(diff_rows)} differ")
    found += len(diff_rows)
    for line in (diff + diff_rows)[:50]:
        print("  " + line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
