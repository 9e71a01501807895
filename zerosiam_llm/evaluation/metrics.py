"""Per-benchmark metrics of a run: score (first sample, or avg@n), pass@k, maj@n, rates, with bootstrap intervals.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Sequence
from typing import Any

from zerosiam_llm.errors import UserInputError
from zerosiam_llm.grading import (
    avg_at_n,
    bootstrap_ci,
    maj_at_k,
    pass_at_k,
)

EXTRACTION_RULE = 'last complete \\boxed{}, else "the (final) answer is ...", else the last number'


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------


def _pass_ks(n: int) -> list[int]:
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    return ks if ks[-1] == n else [*ks, n]


def headline_name(n: int) -> str:
    return "accuracy" if n == 1 else f"avg@{n}"


def summarize_benchmark(
    problem_ids: Sequence[str],
    records: dict[tuple[str, int], dict[str, Any]],
    n: int,
    equivalent: Callable[[str, str], bool] | None = None,
) -> dict[str, Any]:
    """Metrics over problems ``problem_ids``, each with graded samples ``0..n-1`` in ``records``.

    accuracy: first sample (the greedy answer when T = 0); avg@n: mean over samples; pass@k: unbiased estimator;
    maj@n: majority vote with answers clustered by ``equivalent`` (math-verify), not exact strings; the 95% interval
    is a bootstrap over problems of the headline metric (accuracy when n = 1, else avg@n); rates are over samples.
    """
    if not problem_ids:
        raise UserInputError("no problems to summarise")
    first, avg, maj, passes = [], [], [], {k: [] for k in _pass_ks(n)}
    sources: dict[str, int] = {}
    truncated = tokens = 0
    for pid in problem_ids:
        samples = [records[(pid, s)] for s in range(n)]
        correct = [bool(r["correct"]) for r in samples]
        first.append(float(correct[0]))
        avg.append(avg_at_n(correct))
        for k in passes:
            passes[k].append(pass_at_k(n, sum(correct), k))
        answers = [r.get("extracted") for r in samples]
        maj.append(maj_at_k(answers, correct, equivalent if n > 1 else None))
        for r in samples:
            sources[r.get("extraction_source", "none")] = sources.get(r.get("extraction_source", "none"), 0) + 1
            truncated += bool(r.get("truncated"))
            tokens += int(r.get("completion_tokens") or 0)
    total = len(problem_ids) * n
    per_problem = first if n == 1 else avg
    lo, hi = bootstrap_ci(per_problem, seed=0)

    def mean(xs: list[float]) -> float:
        return float(sum(xs) / len(xs))

    return {
        "n_problems": len(problem_ids),
        "n_samples": n,
        "headline": headline_name(n),
        "score": mean(per_problem),
        "ci95": [lo, hi],
        "accuracy": mean(first),
        f"avg@{n}": mean(avg),
        "pass@k": {str(k): mean(v) for k, v in passes.items()},
        f"maj@{n}": mean(maj),
        "extraction_failure_rate": sources.get("none", 0) / total,
        "extraction_sources": {k: sources[k] / total for k in sorted(sources)},
        "truncation_rate": truncated / total,
        "mean_completion_tokens": tokens / total,
    }


def grader_description(timeout_s: float) -> dict[str, Any]:
    try:
        version = importlib.metadata.version("math-verify")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "name": "math-verify",
        "version": version,
        "rule": "verify(parse($gold$), parse($answer$)), gold first",
        "deadline_s": timeout_s,
        "extraction": EXTRACTION_RULE,
    }
