"""One finished cell read from its ``metrics.jsonl``: healthy, degraded or collapsed (the collapse guard's rules
replayed), and the figures the reports print."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from zerosiam_llm.errors import UserInputError
from zerosiam_llm.experiments.plots import series
from zerosiam_llm.monitoring import DEFAULT_GUARD_RULES, GuardEvent, parse_guard_rules, replay_guard

FINAL_WINDOW = 3  # "final" values: the mean over the last 3 updates (one update is 8 answers: noisy)

# The signs of a collapsed run, each with the threshold of the default guard rule on the same metric.
ENTROPY, DOMINANT = "zerosiam/entropy_target", "zerosiam/top1_above_099"
ANSWERS, REPETITION = "completions/answer_rate", "monitor/repetition"


def _rule_threshold(metric: str) -> tuple[str, float]:
    rule = next(r for r in DEFAULT_GUARD_RULES if r["metric"] == metric)
    return ("below", rule["below"]) if "below" in rule else ("above", rule["above"])


def _numbers(rows: Sequence[Mapping[str, Any]], metric: str) -> list[float]:
    return series(rows, metric)[1]  # the finite values, in order


def _final(values: list[float]) -> float | None:
    return statistics.fmean(values[-FINAL_WINDOW:]) if values else None


def _ratio(values: list[float]) -> float | None:
    if not values or values[0] == 0:
        return None
    return statistics.fmean(values[-FINAL_WINDOW:]) / values[0]


def classify_run(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Verdict of one run from its logged step lines (``metrics.jsonl`` rows with ``step`` and ``loss``).

    Returns ``{"verdict", "rule", "update", "events"}``: ``rule`` / ``update`` name the first guard rule that fired
    and the update (step) at which it fired (None when healthy); ``events`` lists every event's message.
    """
    steps = [r for r in rows if "loss" in r and "step" in r]
    if not steps:
        raise UserInputError("no logged updates to classify (metrics.jsonl has no step lines)")
    events: list[GuardEvent] = replay_guard(steps, parse_guard_rules(DEFAULT_GUARD_RULES))
    window = steps[-FINAL_WINDOW:]
    signs = {}
    for metric in (ENTROPY, DOMINANT, ANSWERS, REPETITION):
        kind, threshold = _rule_threshold(metric)
        value = _final(_numbers(window, metric))
        signs[metric] = value is not None and (value < threshold if kind == "below" else value > threshold)
    if signs[ENTROPY] and signs[DOMINANT] and (signs[ANSWERS] or signs[REPETITION]):
        verdict = "collapsed"
    elif events:
        verdict = "degraded"
    else:
        verdict = "healthy"
    first = events[0] if events else None
    return {
        "verdict": verdict,
        "rule": f"{first.rule.metric} {first.rule.condition}" if first else None,
        "update": first.step if first else None,
        "events": [e.message for e in events],
    }


def _grad_norm_max(steps: Sequence[Mapping[str, Any]]) -> float | None:
    """The largest gradient norm of any update; None unless every update logged a finite one. 0.0 means no update
    had a gradient (GRPO whose every group had equal rewards): the adapter never moved, whatever the lr."""
    norms = [r.get("grad_norm") for r in steps]
    if not norms or not all(isinstance(n, int | float) and math.isfinite(n) for n in norms):
        return None
    return float(max(norms))


def run_metrics(rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any] | None) -> dict[str, Any]:
    """The figures a cell reports: final values (mean of the last updates), last/first ratios, stream accuracy."""
    steps = [r for r in rows if "loss" in r and "step" in r]
    out = {
        "updates": len(steps),
        "entropy_first": (_numbers(steps, ENTROPY) or [None])[0],
        "entropy_final": _final(_numbers(steps, ENTROPY)),
        "logit_norm_ratio": _ratio(_numbers(steps, "zerosiam/logit_norm_mean")),
        "repetition_final": _final(_numbers(steps, REPETITION)),
        "base_nll_ratio": _ratio(_numbers(steps, "coherence/base_nll")),
        "answer_rate_final": _final(_numbers(steps, ANSWERS)),
        "top1_above_099_final": _final(_numbers(steps, DOMINANT)),
        "predictor_deviation_final": _final(_numbers(steps, "zerosiam/predictor_deviation")),
        "grad_norm_max": _grad_norm_max(steps),
    }
    summary = summary or {}
    out["problems"] = summary.get("problems")
    out["graded"] = summary.get("graded")
    out["correct"] = summary.get("correct")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Running the cells
# ---------------------------------------------------------------------------------------------------------------
