"""The paired-timing report shared by the benchmarks: per-variant medians, and the per-pair ratio to quote."""

from __future__ import annotations

import statistics


def print_paired(times: dict[str, list[float]], unit: str) -> None:
    """``times``: Tent's (first) and other variants' seconds, index i of each measured back to back in one process."""
    base, *others = list(times)
    print(f"| variant | median s per {unit} | min-max s |")
    print("|---|---|---|")
    for variant, ts in times.items():
        print(f"| {variant} | {statistics.median(ts):.2f} | {min(ts):.2f}-{max(ts):.2f} |")
    for other in others:
        ratios = [z / t for t, z in zip(times[base], times[other], strict=True)]
        print(f"{other} / {base} per {unit}: median {statistics.median(ratios):.3f}, "
              f"min-max {min(ratios):.3f}-{max(ratios):.3f}")  # fmt: skip
