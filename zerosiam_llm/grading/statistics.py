"""Metrics over graded samples: pass@k, avg@n, majority vote and maj@k, bootstrap and Wilson intervals.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from statistics import NormalDist

import numpy as np

from zerosiam_llm.errors import UserInputError
from zerosiam_llm.grading.extraction import normalize_answer

# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): ``1 - C(n-c, k) / C(n, k)`` for n samples with c correct.

    Computed as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)``, which avoids huge binomials.
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or int(value) != value:
            raise UserInputError(f"pass_at_k: {name} must be an integer, got {value!r}")
    if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
        raise UserInputError(f"pass_at_k needs n >= 1, 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def avg_at_n(correct: Sequence[bool]) -> float:
    """Mean accuracy over the n samples of one problem (the "pass@1 estimated from n samples")."""
    if len(correct) == 0:
        raise UserInputError("avg_at_n needs at least one sample")
    return float(np.mean(np.asarray(correct, dtype=np.float64)))


def answer_clusters(
    answers: Sequence[str | None], equivalent: Callable[[str, str], bool] | None = None
) -> list[int | None]:
    """The cluster of each answer (``None`` for no answer), clusters numbered in order of first occurrence.

    Answers are first grouped by :func:`normalize_answer`; with ``equivalent`` (e.g. ``Grader.equivalent``) the
    groups are then merged greedily by math equivalence, each new group compared with the representatives (first
    members) of earlier clusters in order, the representative in the gold role, so ``1/2``, ``0.5`` and
    ``\\frac{1}{2}`` form one cluster. None (and empty) answers belong to no cluster.
    """
    groups: dict[str, list[int]] = {}
    for i, answer in enumerate(answers):
        key = normalize_answer(answer) if answer is not None else ""
        if key:
            groups.setdefault(key, []).append(i)
    out: list[int | None] = [None] * len(answers)
    representatives: list[str] = []
    for members in groups.values():  # dict order = order of first occurrence
        first = answers[members[0]]
        cluster = next(
            (c for c, rep in enumerate(representatives) if equivalent is not None and equivalent(rep, first)), None
        )
        if cluster is None:
            cluster = len(representatives)
            representatives.append(first)
        for i in members:
            out[i] = cluster
    return out


def majority_answer(
    answers: Sequence[str | None], equivalent: Callable[[str, str], bool] | None = None
) -> tuple[int | None, int]:
    """``(index of a representative of the largest answer cluster, cluster size)``; ``(None, 0)`` if all None.

    Clusters as :func:`answer_clusters`. Ties go to the cluster whose first member comes first; the representative
    is that first member.
    """
    clusters = answer_clusters(answers, equivalent)
    sizes: dict[int, int] = {}
    firsts: dict[int, int] = {}
    for i, cluster in enumerate(clusters):
        if cluster is not None:
            sizes[cluster] = sizes.get(cluster, 0) + 1
            firsts.setdefault(cluster, i)
    if not sizes:
        return None, 0
    best = max(sizes, key=lambda c: (sizes[c], -firsts[c]))
    return firsts[best], sizes[best]


def maj_at_k(
    answers: Sequence[str | None],
    correct: Sequence[bool],
    equivalent: Callable[[str, str], bool] | None = None,
    k: int | None = None,
) -> float:
    """Majority-vote accuracy for one problem: 1.0 if the majority cluster of the first ``k`` answers (all when
    None) is correct, else 0.0 (also when every answer is None). ``correct[i]`` is the grade of ``answers[i]``;
    the representative's grade stands for its cluster."""
    if len(answers) != len(correct):
        raise UserInputError(f"maj_at_k: {len(answers)} answers but {len(correct)} correctness flags")
    if k is not None:
        if k < 1 or k > len(answers):
            raise UserInputError(f"maj_at_k: k must be in 1..{len(answers)}, got {k}")
        answers, correct = answers[:k], correct[:k]
    index, _ = majority_answer(answers, equivalent)
    return 0.0 if index is None else float(bool(correct[index]))


def _check_interval_args(num_resamples: int, confidence: float) -> None:
    if num_resamples < 1:
        raise UserInputError(f"num_resamples must be >= 1, got {num_resamples}")
    if not 0.0 < confidence < 1.0:
        raise UserInputError(f"confidence must be in (0, 1), got {confidence}")


def bootstrap_ci(
    values: Sequence[float], num_resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-problem scores (resampling problems). Deterministic for a
    seed."""
    _check_interval_args(num_resamples, confidence)
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise UserInputError("bootstrap_ci needs a non-empty 1-D sequence of per-problem scores")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(num_resamples, x.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def paired_bootstrap_diff(
    a: Sequence[float], b: Sequence[float], num_resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """``(mean(b - a), lower, upper)``: paired percentile bootstrap over problems, for two runs on the same
    problems (same order). An interval excluding 0 means the difference is unlikely to be resampling noise."""
    _check_interval_args(num_resamples, confidence)
    xa = np.asarray(a, dtype=np.float64)
    xb = np.asarray(b, dtype=np.float64)
    if xa.ndim != 1 or xa.shape != xb.shape or xa.size == 0:
        raise UserInputError(
            f"paired_bootstrap_diff needs two non-empty runs of equal length, got {xa.size}, {xb.size}"
        )
    diff = xb - xa
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(num_resamples, diff.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(diff.mean()), float(lo), float(hi)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; ``(0.0, 1.0)`` when n is 0."""
    if not 0.0 < confidence < 1.0:
        raise UserInputError(f"confidence must be in (0, 1), got {confidence}")
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise UserInputError(f"wilson_interval needs 0 <= successes <= n; got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2.0)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n)) / denom
    # Exact ends at 0 and n (the formula gives them up to rounding).
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi
