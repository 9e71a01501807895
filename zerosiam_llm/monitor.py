"""Collapse metrics on rollouts, and the collapse guard.

Entropy minimisation fails in a few recognisable ways (``shared/DESIGN.md`` §1, measured on the embedded SmolLM2):
H(p_r) falls towards 0 and the logit norm grows (Tent from lr 3e-4), completions loop (repeated 4-grams 0.15 ->
0.58), answers disappear (answer rate 1.0 -> 0.04), or the model drifts incoherent without any entropy collapse
(the frozen base model's NLL of the completions 0.43 -> 3.9, ZeroSiam at lr 1e-3). The entropy and logit-norm
signals come from the loss (``objectives.py``); this module measures the rest on the decoded rollouts:

- :func:`repetition_stats` / :func:`batch_repetition`: repeated n-gram share and longest repeated span;
- :func:`answer_dominance`: how much of a batch one extracted answer holds;
- :func:`answer_rates`, :func:`length_stats`;
- :func:`base_model_nll`: the frozen base model's per-token NLL of the completions (coherence drift).

:class:`CollapseGuard` turns the logged metrics into warn / stop / rollback events from rules such as
``{"metric": "zerosiam/entropy_target", "below": 0.1, "for_steps": 3, "action": "warn"}``
(:func:`parse_guard_rules`, :data:`DEFAULT_GUARD_RULES`). It is pure logic with a serialisable state; what a
``stop`` or ``rollback`` does is the trainer's business.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from zerosiam_llm.errors import UserInputError
from zerosiam_llm.grading import extract_answer, has_boxed, majority_answer, normalize_answer
from zerosiam_llm.objectives import DEFAULT_VOCAB_CHUNK, siamese_entropy

__all__ = [
    "DEFAULT_GUARD_RULES",
    "GUARD_ACTIONS",
    "KNOWN_METRICS",
    "CollapseGuard",
    "GuardEvent",
    "GuardRule",
    "MonitorConfig",
    "answer_dominance",
    "answer_rates",
    "base_model_nll",
    "batch_repetition",
    "length_stats",
    "longest_repeated_span",
    "parse_guard_rules",
    "repeated_ngram_share",
    "repetition_stats",
    "rollout_metrics",
]

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


def batch_repetition(completions: Sequence[Sequence[int]], n: int = DEFAULT_NGRAM) -> dict[str, float]:
    """Batch means and maxima: ``repetition`` (mean repeated n-gram share), ``repetition_max``,
    ``longest_repeated_span`` (mean), ``longest_repeated_span_max``. An empty batch gives zeros."""
    stats = [repetition_stats(ids, n) for ids in completions]
    if not stats:
        return dict.fromkeys(
            ("repetition", "repetition_max", "longest_repeated_span", "longest_repeated_span_max"), 0.0
        )
    shares = [s["repeated_ngram_share"] for s in stats]
    spans = [s["longest_repeated_span"] for s in stats]
    return {
        "repetition": sum(shares) / len(shares),
        "repetition_max": max(shares),
        "longest_repeated_span": sum(spans) / len(spans),
        "longest_repeated_span_max": max(spans),
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


def answer_rates(completions: Sequence[str]) -> dict[str, float]:
    """``answer_rate``: share with an extractable answer (any :func:`extract_answer` source); ``boxed_rate``: share
    with a complete ``\\boxed{}``. An empty batch gives zeros."""
    if not completions:
        return {"answer_rate": 0.0, "boxed_rate": 0.0}
    n = len(completions)
    return {
        "answer_rate": sum(extract_answer(c).answer is not None for c in completions) / n,
        "boxed_rate": sum(has_boxed(c) for c in completions) / n,
    }


def length_stats(lengths: Sequence[int], max_new_tokens: int) -> dict[str, float]:
    """``mean_length``, ``max_length`` and ``truncation_rate`` (share that reached ``max_new_tokens``)."""
    if max_new_tokens < 1:
        raise UserInputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    lengths = [int(x) for x in _as_list(lengths)]
    if not lengths:
        return {"mean_length": 0.0, "max_length": 0.0, "truncation_rate": 0.0}
    return {
        "mean_length": sum(lengths) / len(lengths),
        "max_length": float(max(lengths)),
        "truncation_rate": sum(x >= max_new_tokens for x in lengths) / len(lengths),
    }


def rollout_metrics(
    completion_ids: Sequence[Sequence[int]], answers: Sequence[str | None], n: int = DEFAULT_NGRAM
) -> dict[str, float]:
    """The per-step rollout monitors under their logged names (``monitor/...``), from unpadded completion token
    ids and extracted answers."""
    rep = batch_repetition(completion_ids, n)
    dom = answer_dominance(answers)
    return {
        "monitor/repetition": rep["repetition"],
        "monitor/repetition_max": rep["repetition_max"],
        "monitor/longest_repeated_span": rep["longest_repeated_span"],
        "monitor/dominance": dom["dominance"],
        "monitor/distinct_answers": dom["distinct_answers"],
    }


# ---------------------------------------------------------------------------------------------------------------
# Coherence: the frozen base model's NLL of the completions
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _base_model_eval(model):
    """Adapters off (peft) and eval mode (no dropout), restored afterwards."""
    unwrapped = getattr(model, "module", model)  # DDP
    modes = [(m, m.training) for m in unwrapped.modules()]
    adapters_off = unwrapped.disable_adapter() if hasattr(unwrapped, "disable_adapter") else contextlib.nullcontext()
    try:
        unwrapped.eval()
        with adapters_off, torch.no_grad():
            yield unwrapped
    finally:
        for module, training in modes:
            module.training = training


def base_model_nll(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    token_chunk: int | None = None,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    gather: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> float:
    """Mean per-token NLL (nats) of the completions under the frozen base model: a coherence check.

    A peft model is run inside ``disable_adapter()`` (the base weights, whatever LoRA has learnt); the predictor is
    never involved (it only exists inside the loss). A model without adapters is scored as it is. Prompts are left-
    padded ``[B, P]`` and completions right-padded ``[B, C]``, as TRL's rollout batch holds them.

    Memory stays bounded: the backbone gives hidden states (no vocabulary projection), and the logsumexp comes from the
    loss's chunked projection (``objectives.siamese_entropy``, one ``[token_chunk, V]`` fp32 tile at a time).
    ``gather`` materialises a sharded head weight (DeepSpeed ZeRO-3), as in the loss. Returns NaN when no completion
    token is selected.
    """
    from zerosiam_llm.policy import final_hidden_states, lm_head_weight

    if prompt_ids.shape[1] < 1:
        raise UserInputError("base_model_nll needs at least one prompt token to predict the first completion token")
    mask = completion_mask.bool()
    if not bool(mask.any()):
        return math.nan
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    width = prompt_ids.shape[1]
    with _base_model_eval(model) as base, (gather or contextlib.nullcontext)():
        hidden = final_hidden_states(base, input_ids, attention_mask)
        # position P-1+t predicts completion token t
        hidden = hidden[:, width - 1 : width - 1 + completion_ids.shape[1]][mask.to(hidden.device)]
        weight = lm_head_weight(base)
        if hasattr(weight, "full_tensor"):  # FSDP2 DTensor: gather the head once
            weight = weight.full_tensor()
        hidden = hidden.to(weight.device)
        targets = completion_ids.to(weight.device)[mask.to(weight.device)]
        # the loss's own projection path (target branch only, no gradient work): row 6 is the logsumexp
        with torch.no_grad():
            _, stats = siamese_entropy(hidden, None, weight, (0.0, 0.0, 0.0), 1.0, token_chunk, vocab_chunk)
        dtype = stats.dtype
        # the target token's logit, a bounded slice of head rows at a time
        target_logit = torch.cat([
            (h.to(dtype) * weight[t].to(dtype)).sum(-1)
            for h, t in zip(hidden.split(4096), targets.split(4096), strict=True)
        ])  # fmt: skip
        total = (stats[6] - target_logit).double().sum()
    return float(total) / hidden.shape[0]


# ---------------------------------------------------------------------------------------------------------------
# Guard rules
# ---------------------------------------------------------------------------------------------------------------

GUARD_ACTIONS = ("warn", "stop", "rollback")
_CONDITIONS = ("below", "above", "above_first_times", "non_finite")
_RULE_FIELDS = ("metric", "action", "for_steps", "lr_factor", "note", *_CONDITIONS)

# Thresholds from DESIGN.md §1 (embedded SmolLM2, online protocol). Healthy runs: H(p_r) 0.9-1.1, repeated 4-gram
# share 0.11-0.18, answer rate 1.0, base NLL 0.43-0.48. Collapsing Tent: H(p_r) 0.01-0.09, repetition 0.48-0.58,
# answer rate 0.04-0.12. Incoherent drift (ZeroSiam lr 1e-3): base NLL 0.43 -> 3.86, i.e. 9x.
# All warn, except a non-finite loss, after which nothing the run does means anything.
DEFAULT_GUARD_RULES: list[dict[str, Any]] = [
    {
        "metric": "zerosiam/entropy_target",
        "below": 0.1,
        "for_steps": 3,
        "action": "warn",
        "note": "entropy collapse: lower learning_rate, or raise the predictor/LoRA lr ratio",
    },
    {
        "metric": "monitor/repetition",
        "above": 0.5,
        "for_steps": 2,
        "action": "warn",
        "note": "completions are looping",
    },
    {
        "metric": "completions/answer_rate",
        "below": 0.25,
        "for_steps": 3,
        "action": "warn",
        "note": "most completions hold no answer",
    },
    {
        "metric": "coherence/base_nll",
        "above_first_times": 3.0,
        "for_steps": 1,
        "action": "warn",
        "note": "completions drift away from what the base model finds plausible",
    },
    {
        "metric": "zerosiam/logit_norm_mean",
        "above_first_times": 1.5,
        "for_steps": 1,
        "action": "warn",
        "note": "logit inflation, the cheap route to low entropy (Tent from lr 1e-3 in the stability map)",
    },
    {
        "metric": "zerosiam/top1_above_099",
        "above": 0.5,
        "for_steps": 1,
        "action": "warn",
        "note": "over half the tokens predicted with p > 0.99: one dominant token",
    },
    {
        "metric": "train/nonfinite_skipped",
        "above": 0.5,
        "for_steps": 3,
        "action": "stop",
        "note": "3 consecutive non-finite losses or gradients (each update was skipped)",
    },
]


@dataclass(frozen=True)
class GuardRule:
    """One validated rule: exactly one condition, held for ``for_steps`` consecutive logged steps, fires ``action``.

    Conditions: ``below`` / ``above`` a number; ``above_first_times`` = above that multiple of the first value the
    guard saw for the metric; ``non_finite`` = NaN, inf, or None (TRL logs a metric whose every value was NaN as
    None). ``lr_factor`` (rollback only) scales the learning rates after the rollback.
    """

    metric: str
    action: str = "warn"
    below: float | None = None
    above: float | None = None
    above_first_times: float | None = None
    non_finite: bool = False
    for_steps: int = 1
    lr_factor: float | None = None
    note: str = ""

    @property
    def condition(self) -> str:
        if self.non_finite:
            return "non-finite"
        if self.below is not None:
            return f"below {self.below:g}"
        if self.above is not None:
            return f"above {self.above:g}"
        return f"above {self.above_first_times:g}x its first value"

    @property
    def key(self) -> str:
        """Identifies the rule in a saved guard state (stable across runs with the same rules)."""
        return f"{self.metric} {self.condition} for {self.for_steps} -> {self.action}"

    def holds(self, value: Any, first: float | None) -> bool | None:
        """Whether the condition holds for ``value``; None when the step says nothing about it (no value)."""
        if self.non_finite:
            return value is None or (isinstance(value, (int, float)) and not math.isfinite(value))
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return None
        if self.below is not None:
            return value < self.below
        if self.above is not None:
            return value > self.above
        return first is not None and value > self.above_first_times * first


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _parse_rule(i: int, raw: Any) -> GuardRule:
    where = f"guard_rules[{i}]"
    if not isinstance(raw, Mapping):
        raise UserInputError(f"{where} must be a mapping such as {{metric: ..., below: ..., action: warn}}")
    unknown = [k for k in raw if k not in _RULE_FIELDS]
    if unknown:
        raise UserInputError(f"{where}.{unknown[0]} is not a rule field; allowed: {', '.join(_RULE_FIELDS)}")
    metric = raw.get("metric")
    if metric is None:
        raise UserInputError(f"{where}.metric is missing; known metrics: {', '.join(KNOWN_METRICS)}")
    if metric not in KNOWN_METRICS:
        raise UserInputError(f"{where}.metric {metric!r} is not a known metric; known: {', '.join(KNOWN_METRICS)}")
    action = raw.get("action", "warn")
    if action not in GUARD_ACTIONS:
        raise UserInputError(f"{where}.action {action!r} is not allowed; allowed: {', '.join(GUARD_ACTIONS)}")
    given = [c for c in _CONDITIONS if raw.get(c) is not None]
    if not given:
        raise UserInputError(f"{where} has no condition; give one of {', '.join(_CONDITIONS)}")
    if len(given) > 1:
        raise UserInputError(f"{where} has several conditions ({', '.join(given)}); give exactly one per rule")
    condition = given[0]
    value = raw[condition]
    if condition == "non_finite":
        if value is not True:
            raise UserInputError(f"{where}.non_finite must be true, got {value!r}")
    elif not _is_number(value):
        raise UserInputError(f"{where}.{condition} must be a finite number, got {value!r} ({type(value).__name__})")
    elif condition == "above_first_times" and value <= 0:
        raise UserInputError(f"{where}.above_first_times must be > 0, got {value!r}")
    for_steps = raw.get("for_steps", 1)
    if isinstance(for_steps, bool) or not isinstance(for_steps, int) or for_steps < 1:
        raise UserInputError(f"{where}.for_steps must be an integer >= 1, got {for_steps!r}")
    lr_factor = raw.get("lr_factor")
    if lr_factor is not None:
        if action != "rollback":
            raise UserInputError(f"{where}.lr_factor applies to action rollback only (action is {action!r})")
        if not _is_number(lr_factor) or not 0 < lr_factor <= 1:
            raise UserInputError(f"{where}.lr_factor must be a number in (0, 1], got {lr_factor!r}")
    note = raw.get("note", "")
    if not isinstance(note, str):
        raise UserInputError(f"{where}.note must be a string, got {type(note).__name__}")
    return GuardRule(
        metric=metric,
        action=action,
        for_steps=for_steps,
        lr_factor=float(lr_factor) if lr_factor is not None else None,
        note=note,
        **{condition: True if condition == "non_finite" else float(value)},
    )


def parse_guard_rules(raw: Sequence[Mapping[str, Any]] | None) -> list[GuardRule]:
    """Validate guard rules before any work. ``None`` -> :data:`DEFAULT_GUARD_RULES`; ``[]`` -> no guard.

    Raises :class:`UserInputError` with one line naming the rule index and field.
    """
    if raw is None:
        raw = DEFAULT_GUARD_RULES
    if isinstance(raw, (str, bytes, Mapping)) or not isinstance(raw, Sequence):
        raise UserInputError(f"guard_rules must be a list of rules, got {type(raw).__name__}")
    return [_parse_rule(i, rule) for i, rule in enumerate(raw)]


@dataclass(frozen=True)
class MonitorConfig:
    """Rollout-monitor settings: n-gram size of the repetition metric, how often the base-model NLL is computed
    (0 = never; it costs one extra no-grad forward of the batch), and the guard rules."""

    repetition_ngram: int = DEFAULT_NGRAM
    base_nll_every: int = 1
    guard_rules: tuple[GuardRule, ...] = field(default_factory=lambda: tuple(parse_guard_rules(None)))

    @classmethod
    def build(
        cls,
        repetition_ngram: int = DEFAULT_NGRAM,
        base_nll_every: int = 1,
        guard_rules: Sequence[Mapping[str, Any]] | None = None,
    ) -> MonitorConfig:
        if isinstance(repetition_ngram, bool) or not isinstance(repetition_ngram, int) or repetition_ngram < 1:
            raise UserInputError(f"repetition_ngram must be an integer >= 1, got {repetition_ngram!r}")
        if isinstance(base_nll_every, bool) or not isinstance(base_nll_every, int) or base_nll_every < 0:
            raise UserInputError(f"base_nll_every must be an integer >= 0 (0 = off), got {base_nll_every!r}")
        return cls(repetition_ngram, base_nll_every, tuple(parse_guard_rules(guard_rules)))


# ---------------------------------------------------------------------------------------------------------------
# The guard
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GuardEvent:
    """A rule that fired: ``action`` is the rule's; ``message`` is one line for the log."""

    rule: GuardRule
    step: int
    value: float | None
    action: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "metric": self.rule.metric,
            "condition": self.rule.condition,
            "value": self.value,
            "action": self.action,
            "lr_factor": self.rule.lr_factor,
            "message": self.message,
        }


class CollapseGuard:
    """Feeds on one dict of logged metrics per step and returns the events of the rules that fire.

    A rule's counter counts consecutive steps on which its condition holds; a step where it does not hold resets
    it, a step without the metric (not computed that step) leaves it as it is. The rule fires when the counter
    reaches ``for_steps``, and then restarts counting, so a condition that persists fires again every
    ``for_steps`` steps. ``above_first_times`` compares with the first finite value the guard saw for the metric.
    Steps at or before the last step seen are ignored, so a resumed run can replay its log safely.
    """

    def __init__(self, rules: Sequence[GuardRule] | None = None) -> None:
        self.rules: list[GuardRule] = list(parse_guard_rules(None) if rules is None else rules)
        self.counters: dict[str, int] = {rule.key: 0 for rule in self.rules}
        self.first_values: dict[str, float] = {}
        self.last_step: int | None = None

    def update(self, step: int, metrics: Mapping[str, Any]) -> list[GuardEvent]:
        if self.last_step is not None and step <= self.last_step:
            return []
        self.last_step = step
        # first values are recorded before the rules look at this step: the first step compares with itself
        for rule in self.rules:
            value = metrics.get(rule.metric)
            if rule.above_first_times is not None and rule.metric not in self.first_values and _is_number(value):
                self.first_values[rule.metric] = float(value)
        events = []
        for rule in self.rules:
            if rule.metric not in metrics:  # not computed this step: the streak neither grows nor breaks
                continue
            value = metrics[rule.metric]
            holds = rule.holds(value, self.first_values.get(rule.metric))
            if holds is None:
                continue
            count = self.counters.get(rule.key, 0) + 1 if holds else 0
            if count >= rule.for_steps:
                events.append(self._event(rule, step, value))
                count = 0
            self.counters[rule.key] = count
        return events

    def _event(self, rule: GuardRule, step: int, value: Any) -> GuardEvent:
        shown = "None" if value is None else f"{value:.4g}"
        streak = f" for {rule.for_steps} steps" if rule.for_steps > 1 else ""
        first = self.first_values.get(rule.metric)
        ref = f" (first {first:.4g})" if rule.above_first_times is not None and first is not None else ""
        action = rule.action + (f" (lr x {rule.lr_factor:g})" if rule.lr_factor is not None else "")
        note = f": {rule.note}" if rule.note else ""
        message = f"collapse guard at step {step}: {rule.metric} = {shown} {rule.condition}{ref}{streak} -> {action}"
        number = float(value) if isinstance(value, (int, float)) else None
        return GuardEvent(rule, step, number, rule.action, message + note)

    def reset_counters(self) -> None:
        """Forget the streaks (e.g. after a rollback restored earlier weights); first values are kept."""
        self.counters = {rule.key: 0 for rule in self.rules}

    def reset(self) -> None:
        """Start over (counters and first values), e.g. when the online protocol starts a new stream from the base
        model; steps already seen stay ignored."""
        self.reset_counters()
        self.first_values = {}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state, to save next to a checkpoint."""
        return {"counters": dict(self.counters), "first_values": dict(self.first_values), "last_step": self.last_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore counters of the rules that still exist (matched by :attr:`GuardRule.key`) and the first values."""
        counters = state.get("counters", {})
        self.counters = {rule.key: int(counters.get(rule.key, 0)) for rule in self.rules}
        self.first_values = {k: float(v) for k, v in state.get("first_values", {}).items()}
        self.last_step = state.get("last_step")


def replay_guard(
    metric_rows: Sequence[Mapping[str, Any]], rules: Sequence[GuardRule] | None = None
) -> list[GuardEvent]:
    """The events a guard with ``rules`` raises over a run's logged step lines (``metrics.jsonl`` rows with a
    ``loss``): the guard only reads logged metrics, so a replay equals what it would have done live."""
    guard = CollapseGuard(rules)
    events: list[GuardEvent] = []
    for row in metric_rows:
        if "loss" in row and "step" in row:
            events.extend(guard.update(int(row["step"]), row))
    return events
