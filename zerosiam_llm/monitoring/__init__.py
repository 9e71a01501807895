"""Collapse monitoring: metrics on rollouts, coherence against the frozen base model, and the collapse guard.

Entropy minimisation fails in a few recognisable ways (``shared/DESIGN.md`` §1, measured on the embedded SmolLM2):
H(p_r) falls towards 0 and the logit norm grows (Tent from lr 3e-4), completions loop (repeated 4-grams 0.15 ->
0.58), answers disappear (answer rate 1.0 -> 0.04), or the model drifts incoherent without any entropy collapse
(the frozen base model's NLL of the completions 0.43 -> 3.9, ZeroSiam at lr 1e-3). The entropy and logit-norm
signals come from the loss (``objectives.py``); this package measures the rest and acts on all of them:

- ``metrics``: the logged metric names; repeated n-gram share, longest repeated span, answer dominance and rates;
- ``coherence``: :func:`base_model_nll`, the frozen base model's per-token NLL of the completions;
- ``guard``: :class:`CollapseGuard` and its rules (:data:`DEFAULT_GUARD_RULES`, :func:`parse_guard_rules`).
"""

from zerosiam_llm.monitoring.coherence import base_model_nll
from zerosiam_llm.monitoring.guard import (
    DEFAULT_GUARD_RULES,
    GUARD_ACTIONS,
    CollapseGuard,
    GuardEvent,
    GuardRule,
    parse_guard_rules,
    replay_guard,
)
from zerosiam_llm.monitoring.metrics import (
    KNOWN_METRICS,
    answer_dominance,
    longest_repeated_span,
    repeated_ngram_share,
    repetition_stats,
    rollout_metrics,
)

__all__ = [
    "DEFAULT_GUARD_RULES", "GUARD_ACTIONS", "KNOWN_METRICS", "CollapseGuard", "GuardEvent", "GuardRule",
    "answer_dominance", "base_model_nll", "longest_repeated_span", "parse_guard_rules", "repeated_ngram_share",
    "repetition_stats", "replay_guard", "rollout_metrics",
]  # fmt: skip
