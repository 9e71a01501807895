"""The collapse guard: rules over logged metrics -> warn / stop / rollback events.

:class:`CollapseGuard` turns the logged metrics into events from rules such as
``{"metric": "zerosiam/entropy_target", "below": 0.1, "for_steps": 3, "action": "warn"}``
(:func:`parse_guard_rules`, :data:`DEFAULT_GUARD_RULES`). It is pure logic with a serialisable state; what a ``stop``
or ``rollback`` does is the trainer's business (``callbacks.CollapseGuardCallback``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from zerosiam_llm.errors import UserInputError
from zerosiam_llm.monitoring.metrics import KNOWN_METRICS

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
