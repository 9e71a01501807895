"""The names of the logged metrics, and the collapse metrics measured on decoded rollouts: repeated n-gram share,
longest repeated span, how much of a batch one answer holds, and the answer rate.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from zerosiam_llm.errors import UserInputError
from zerosiam_llm.grading import majority_answer, normalize_answer

# Metrics the trainer logs per step (TRL's, the loss's, the rollout monitors') and that guard rules may name.
TRAINER_METRICS = (
    "loss",
    "grad_norm",
    "entropy",
    "zerosiam/entropy_online",
    "zerosiam/entropy_target",
    "zerosiam/kl_target_online",
    "zerosiam/kl_online_target",
    "zerosiam/logit_norm_mean",
    "zerosiam/logit_norm_max",
    "zerosiam/top1_prob_mean",
    "zerosiam/top1_above_099",
    "zerosiam/predictor_deviation",
    "grad_norm/lora",
    "grad_norm/predictor",
    "completions/answer_rate",
    "completions/boxed_rate",
    "completions/mean_length",
    "completions/max_length",
    "completions/clipped_ratio",
    "monitor/accuracy",
    "train/nonfinite_skipped",
)
# Computed by this module from the rollouts (see :func:`rollout_metrics` and :func:`base_model_nll`).
MONITOR_METRICS = (
    "monitor/repetition",
    "monitor/repetition_max",
    "monitor/longest_repeated_span",
    "monitor/dominance",
    "monitor/distinct_answers",
    "coherence/base_nll",
)
KNOWN_METRICS = TRAINER_METRICS + MONITOR_METRICS

DEFAULT_NGRAM = 4
# what rollout_metrics returns
ROLLOUT_METRICS = ("monitor/repetition", "monitor/repetition_max", "monitor/longest_repeated_span",
                   "monitor/dominance", "monitor/distinct_answers", "completions/answer_rate",
                   "completions/boxed_rate")  # fmt: skip

# ---------------------------------------------------------------------------------------------------------------
# Repetition
# ---------------------------------------------------------------------------------------------------------------


def _as_list(token_ids: Sequence[int] | torch.Tensor) -> list:
    return token_ids.tolist() if hasattr(token_ids, "tolist") else list(token_ids)


def repeated_ngram_share(token_ids: Sequence[int], n: int = DEFAULT_NGRAM) -> float:
    """Share of the n-gram occurrences of one completion whose n-gram occurs more than once in it.

    ``[a b c d] * 3`` (one 4-gram looped) scores exactly 1.0: each of its four rotations occurs at least twice (a
    loop of period p scores 1.0 from ``n + 2p - 1`` tokens on). All-distinct n-grams score 0.0, and so does a
    completion shorter than n tokens (it has no n-gram). Unlike ``1 - distinct / total``, this counts the first
    occurrence of a repeated n-gram too: it is the share of the text that lies inside repeats.
    """
    if n < 1:
        raise UserInputError(f"n-gram size must be >= 1, got {n}")
    ids = _as_list(token_ids)
    total = len(ids) - n + 1
    if total <= 0:
        return 0.0
    counts = Counter(tuple(ids[i : i + n]) for i in range(total))
    return sum(c for c in counts.values() if c > 1) / total


def _suffix_array(s: list[int]) -> list[int]:
    """Suffix array by prefix doubling, O(n log^2 n): plenty for completions of a few thousand tokens."""
    n = len(s)
    rank = s
    sa = list(range(n))
    k = 1
    while True:
        key = [(rank[i], rank[i + k] if i + k < n else -1) for i in range(n)]
        sa.sort(key=key.__getitem__)
        new_rank = [0] * n
        for j in range(1, n):
            new_rank[sa[j]] = new_rank[sa[j - 1]] + (key[sa[j]] != key[sa[j - 1]])
        rank = new_rank
        if rank[sa[-1]] == n - 1 or k >= n:  # all suffixes told apart
            return sa
        k *= 2


def longest_repeated_span(token_ids: Sequence[int]) -> int:
    """Length in tokens of the longest contiguous span that occurs at least twice (occurrences may overlap).

    ``banana`` -> 3 (``ana``), ``aaaa`` -> 3, all-distinct -> 0. Suffix array + Kasai LCP: the answer is the largest
    common prefix of two suffixes adjacent in sorted order.
    """
    ids = _as_list(token_ids)
    n = len(ids)
    if n < 2:
        return 0
    alphabet = {v: r for r, v in enumerate(sorted(set(ids)))}
    s = [alphabet[v] for v in ids]  # compact non-negative ranks (-1 marks "past the end")
    sa = _suffix_array(s)
    rank = [0] * n
    for r, i in enumerate(sa):
        rank[i] = r
    best = h = 0
    for i in range(n):
        if rank[i] == 0:
            h = 0
            continue
        j = sa[rank[i] - 1]
        while i + h < n and j + h < n and s[i + h] == s[j + h]:
            h += 1
        best = max(best, h)
        h = max(h - 1, 0)
    return best


def repetition_stats(token_ids: Sequence[int], n: int = DEFAULT_NGRAM) -> dict[str, float]:
    """``{"repeated_ngram_share", "longest_repeated_span"}`` of one completion (see the two functions)."""
    return {
        "repeated_ngram_share": repeated_ngram_share(token_ids, n),
        "longest_repeated_span": float(longest_repeated_span(token_ids)),
    }


# ---------------------------------------------------------------------------------------------------------------
# Answers and lengths
# ---------------------------------------------------------------------------------------------------------------


def answer_dominance(answers: Sequence[str | None]) -> dict[str, float]:
    """How much of a batch the most common extracted answer holds.

    ``dominance`` = size of the largest group of equal answers (after :func:`~zerosiam_llm.grading.normalize_answer`)
    / batch size. None answers count in the denominator but never form the dominant group, so a batch of
    completions without answers has dominance 0 (that collapse shows in the answer rate instead).
    ``distinct_answers`` = number of distinct normalised non-None answers. An empty batch gives zeros.
    """
    if not answers:
        return {"dominance": 0.0, "distinct_answers": 0.0}
    _, size = majority_answer(answers)
    distinct = {normalize_answer(a) for a in answers if a is not None} - {""}
    return {"dominance": size / len(answers), "distinct_answers": float(len(distinct))}


def rollout_metrics(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The per-step rollout monitors under their logged names, from one row per completion (the keys of
    :func:`repetition_stats`, the extracted ``answer``, and ``boxed``). An empty batch gives zeros."""
    if not rows:
        return dict.fromkeys(ROLLOUT_METRICS, 0.0)
    shares = [r["repeated_ngram_share"] for r in rows]
    spans = [r["longest_repeated_span"] for r in rows]
    dominance = answer_dominance([r["answer"] for r in rows])
    return {
        "monitor/repetition": sum(shares) / len(shares),
        "monitor/repetition_max": max(shares),
        "monitor/longest_repeated_span": sum(spans) / len(spans),
        "monitor/dominance": dominance["dominance"],
        "monitor/distinct_answers": dominance["distinct_answers"],
        "completions/answer_rate": sum(r["answer"] is not None for r in rows) / len(rows),
        "completions/boxed_rate": sum(bool(r["boxed"]) for r in rows) / len(rows),
    }
