"""The paired-timing report shared by the benchmarks: per-variant medians, and the per-pair ratio to quote."""

from __future__ import annotations

import statistics


def print_paired(times: dict[str, list[float]], unit: str) -> None:
    """``times``: Tent and ZeroSiam seconds, index i of each measured back to back in one process."""
    ratios = [z / t for t, z in zip(times["tent"], times["zerosiam"], strict=True)]
    print(f"| variant | median s per {unit} | min-max s |")
    print("|---|---|---|")
    for variant, ts in times.items():
        print(f"| {variant} | {statistics.median(ts):.2f} | {min(ts):.2f}-{max(ts):.2f} |")
    print(f"zerosiam / tent per {unit}: median {statistics.median(ratios):.3f}, "
          f"min-max {min(ratios):.3f}-{max(ratios):.3f}")  # fmt: skip
