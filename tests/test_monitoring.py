"""Collapse metrics on hand-made inputs, the base-model NLL on the tiny model, and the collapse guard."""

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from zerosiam_llm.errors import UserInputError
from zerosiam_llm.modeling import apply_lora, attach_predictor, load_policy, make_lora_config
from zerosiam_llm.monitoring import (
    DEFAULT_GUARD_RULES,
    KNOWN_METRICS,
    CollapseGuard,
    answer_dominance,
    base_model_nll,
    longest_repeated_span,
    parse_guard_rules,
    repeated_ngram_share,
    repetition_stats,
    rollout_metrics,
)
from zerosiam_llm.predictor import Predictor

# ------------------------------------------------------------------------------------------- repetition


def test_one_looped_4gram_scores_one_and_distinct_ngrams_zero():
    assert repeated_ngram_share([1, 2, 3, 4] * 3) == 1.0
    assert repeated_ngram_share([1, 2, 3, 4] * 25) == 1.0
    assert repeated_ngram_share([7] * 10) == 1.0
    assert repeated_ngram_share(list(range(50))) == 0.0
    assert repeated_ngram_share([1, 2, 3]) == 0.0  # shorter than n: no n-gram
    assert repeated_ngram_share([]) == 0.0


def test_repeated_ngram_share_counts_every_occurrence_of_a_repeated_ngram():
    # 4-grams of 1234 5 1234: 1234, 2345, 3451, 4512, 5123, 1234 -> 2 of 6 occurrences belong to a repeat
    assert repeated_ngram_share([1, 2, 3, 4, 5, 1, 2, 3, 4]) == pytest.approx(2 / 6)
    assert repeated_ngram_share(torch.tensor([1, 2, 1, 2]), n=2) == pytest.approx(2 / 3)  # 12, 21, 12
    with pytest.raises(UserInputError, match="n-gram size"):
        repeated_ngram_share([1, 2], n=0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("banana", 3), ("abcd", 0), ("abcabc", 3), ("aaaa", 3), ("", 0), ("a", 0), ("abxabyab", 2), ("mississippi", 4)],
)
def test_longest_repeated_span_exact(text, expected):
    assert longest_repeated_span([ord(c) for c in text]) == expected


def _naive_longest_repeat(s):
    best = 0
    for length in range(1, len(s)):
        seen = set()
        for i in range(len(s) - length + 1):
            t = tuple(s[i : i + length])
            if t in seen:
                best = length
                break
            seen.add(t)
    return best


def test_longest_repeated_span_matches_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        s = [rng.randrange(3) for _ in range(rng.randrange(0, 40))]
        assert longest_repeated_span(s) == _naive_longest_repeat(s), s


def test_long_loop_is_fast_and_exact():
    ids = [5, 9, 2, 7] * 1024  # 4096 tokens, worst case for prefix doubling
    assert longest_repeated_span(ids) == 4096 - 4
    assert repetition_stats(ids) == {"repeated_ngram_share": 1.0, "longest_repeated_span": 4092.0}


def rows_of(completions, answers, boxed=None):
    """One row per completion, as the trainer builds them."""
    boxed = boxed or [False] * len(completions)
    triples = zip(completions, answers, boxed, strict=True)
    return [{**repetition_stats(ids), "answer": a, "boxed": b} for ids, a, b in triples]


def test_rollout_metrics_means_and_max():
    out = rollout_metrics(rows_of([[1, 2, 3, 4] * 3, list(range(12))], ["5", None], [True, False]))
    assert out["monitor/repetition"] == 0.5 and out["monitor/repetition_max"] == 1.0
    assert out["monitor/longest_repeated_span"] == (8 + 0) / 2
    assert out["completions/answer_rate"] == 0.5 and out["completions/boxed_rate"] == 0.5
    assert rollout_metrics([])["monitor/repetition"] == 0.0


# ------------------------------------------------------------------------------------------- answers, lengths


def test_answer_dominance():
    assert answer_dominance(["4", "4", " 4 ", "4."]) == {"dominance": 1.0, "distinct_answers": 1.0}
    assert answer_dominance(["1", "2", "2", None]) == {"dominance": 0.5, "distinct_answers": 2.0}
    # None answers count in the denominator but are never the dominant answer
    assert answer_dominance([None, None, None, "7"]) == {"dominance": 0.25, "distinct_answers": 1.0}
    assert answer_dominance([None, None]) == {"dominance": 0.0, "distinct_answers": 0.0}
    assert answer_dominance([]) == {"dominance": 0.0, "distinct_answers": 0.0}


def test_rollout_metrics_names_are_known():
    out = rollout_metrics(rows_of([[1, 2, 3, 4] * 3, [1, 2, 3, 4] * 3], ["3", "3"]))
    assert out["monitor/repetition"] == 1.0 and out["monitor/dominance"] == 1.0
    assert set(out) <= set(KNOWN_METRICS)


# ------------------------------------------------------------------------------------------- base-model NLL


def _reference_nll(model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """Plain full-logits cross-entropy of the completions."""
    ids = torch.cat([prompt_ids, completion_ids], 1)
    logits = model(input_ids=ids, attention_mask=torch.cat([prompt_mask, completion_mask], 1)).logits
    logits = logits[:, prompt_ids.shape[1] - 1 : -1]
    mask = completion_mask.bool()
    return F.cross_entropy(logits[mask].double(), completion_ids[mask]).item()


@pytest.fixture(scope="module")
def lora_batch(tiny_model_dir):
    model, tok = load_policy(str(tiny_model_dir))
    model = apply_lora(model, make_lora_config(4))
    prompts = tok(["Tom has 3 apples and buys 7 more.", "2 + 2 ="], return_tensors="pt", padding=True)
    torch.manual_seed(0)
    completion_ids = torch.randint(3, len(tok), (2, 9))
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[1, 5:] = 0  # right padding
    completion_ids[1, 5:] = tok.pad_token_id
    return model, (prompts["input_ids"], prompts["attention_mask"], completion_ids, completion_mask)


def test_base_model_nll_is_the_frozen_base_models_cross_entropy(lora_batch):
    model, batch = lora_batch
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # the adapter now changes the model
    predictor = Predictor(model.config.hidden_size, "full", seed=0)
    with torch.no_grad():
        predictor.delta.add_(torch.randn_like(predictor.delta))
    attach_predictor(model, predictor)
    model.train()
    got = base_model_nll(model, *batch)
    chunked = base_model_nll(model, *batch, token_chunk=3, vocab_chunk=37)
    with torch.no_grad(), model.disable_adapter():
        base = _reference_nll(model, *batch)
    with torch.no_grad():
        adapted = _reference_nll(model, *batch)
    assert got == pytest.approx(base, abs=1e-5)
    assert chunked == pytest.approx(base, abs=1e-5)
    assert abs(adapted - base) > 1e-2  # the LoRA weights moved: only the base score stays put
    assert model.training  # the training mode is restored
    assert all(p.grad is None for p in model.parameters())
    empty = torch.zeros_like(batch[3])
    assert math.isnan(base_model_nll(model, batch[0], batch[1], batch[2], empty))


# ------------------------------------------------------------------------------------------- guard rules


def test_default_rules_parse_and_cover_the_design_signals():
    rules = parse_guard_rules(None)
    assert len(rules) == len(DEFAULT_GUARD_RULES) == 7
    assert {r.metric for r in rules} == {
        "zerosiam/entropy_target", "monitor/repetition", "completions/answer_rate", "coherence/base_nll",
        "train/nonfinite_skipped", "zerosiam/logit_norm_mean", "zerosiam/top1_above_099",
    }  # fmt: skip
    assert [r.action for r in rules].count("stop") == 1
    assert parse_guard_rules([]) == []


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        (
            [{"metric": "zerosiam/entropy", "below": 0.1}],
            r"guard_rules\[0\]\.metric 'zerosiam/entropy' .*known: loss,",
        ),
        ([{"below": 0.1}], r"guard_rules\[0\]\.metric is missing"),
        (
            [{"metric": "loss", "non_finite": True}, {"metric": "loss", "below": 1, "action": "halt"}],
            r"guard_rules\[1\]\.action 'halt' is not allowed; allowed: warn, stop, rollback",
        ),
        ([{"metric": "loss", "below": "0.1"}], r"guard_rules\[0\]\.below must be a finite number, got '0.1' \(str\)"),
        ([{"metric": "loss", "above": True}], r"guard_rules\[0\]\.above must be a finite number"),
        ([{"metric": "loss", "action": "warn"}], r"guard_rules\[0\] has no condition; give one of below, above"),
        ([{"metric": "loss", "below": 1, "above": 2}], r"guard_rules\[0\] has several conditions \(below, above\)"),
        ([{"metric": "loss", "non_finite": False}], r"guard_rules\[0\]\.non_finite must be true"),
        ([{"metric": "loss", "below": 1, "for_steps": 0}], r"guard_rules\[0\]\.for_steps must be an integer >= 1"),
        (
            [{"metric": "loss", "below": 1, "lr_factor": 0.5}],
            r"guard_rules\[0\]\.lr_factor applies to action rollback",
        ),
        (
            [{"metric": "loss", "below": 1, "action": "rollback", "lr_factor": 2}],
            r"guard_rules\[0\]\.lr_factor must be a number in \(0, 1\]",
        ),
        ([{"metric": "loss", "belw": 1}], r"guard_rules\[0\]\.belw is not a rule field; allowed: metric,"),
        ([{"metric": "coherence/base_nll", "above_first_times": 0}], r"above_first_times must be > 0"),
        (["loss < 1"], r"guard_rules\[0\] must be a mapping"),
        ({"metric": "loss"}, r"guard_rules must be a list of rules, got dict"),
    ],
)
def test_bad_rules_are_refused_with_one_line(rules, message):
    with pytest.raises(UserInputError, match=message) as err:
        parse_guard_rules(rules)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------- the guard


def _feed(guard, metric, values, start=1):
    return {step: guard.update(step, {metric: v}) for step, v in enumerate(values, start=start)}


def test_below_for_steps_fires_on_the_third_consecutive_step_and_resets_when_cleared():
    guard = CollapseGuard(parse_guard_rules([{"metric": "zerosiam/entropy_target", "below": 0.1, "for_steps": 3}]))
    #               1    2     3     4    5     6     7     8     9     10
    values = [1.1, 0.05, 0.04, 0.5, 0.09, 0.08, 0.07, 0.06, 0.05, 0.04]
    events = _feed(guard, "zerosiam/entropy_target", values)
    fired = [step for step, evs in events.items() if evs]
    assert fired == [7, 10]  # 2-3 cleared at 4; 5-6-7 fires; the streak restarts: 8-9-10 fires again
    event = events[7][0]
    assert event.action == "warn" and event.step == 7 and event.value == pytest.approx(0.07)
    assert "zerosiam/entropy_target = 0.07 below 0.1 for 3 steps" in event.message
    assert json.loads(json.dumps(event.to_dict()))["step"] == 7


def test_missing_metric_neither_grows_nor_breaks_a_streak():
    guard = CollapseGuard(parse_guard_rules([{"metric": "monitor/repetition", "above": 0.5, "for_steps": 2}]))
    assert guard.update(1, {"monitor/repetition": 0.6}) == []
    assert guard.update(2, {"loss": 1.0}) == []  # not computed this step
    assert guard.update(3, {"monitor/repetition": float("nan")}) == []  # no evidence either
    [event] = guard.update(4, {"monitor/repetition": 0.7})
    assert event.step == 4


def test_above_first_times_is_relative_to_the_first_value():
    rule = {"metric": "coherence/base_nll", "above_first_times": 3.0, "action": "rollback", "lr_factor": 0.5}
    guard = CollapseGuard(parse_guard_rules([rule]))
    events = _feed(guard, "coherence/base_nll", [0.43, 0.9, 1.29, 1.3, 3.9])
    assert [s for s, e in events.items() if e] == [4, 5]  # 1.29 = 3 x 0.43 is not above
    event = events[4][0]
    assert event.action == "rollback" and event.rule.lr_factor == 0.5
    assert "above 3x its first value (first 0.43)" in event.message and "lr x 0.5" in event.message
    assert guard.first_values == {"coherence/base_nll": 0.43}


def test_non_finite_loss_rule_stops_at_once():
    guard = CollapseGuard(parse_guard_rules([{"metric": "loss", "non_finite": True, "action": "stop"}]))
    assert guard.update(1, {"loss": 2.1, "zerosiam/entropy_target": 1.1}) == []
    [event] = guard.update(2, {"loss": float("nan")})
    assert event.action == "stop" and event.rule.metric == "loss" and "non-finite" in event.message
    assert [e.action for e in guard.update(3, {"loss": float("inf")})] == ["stop"]
    assert [e.action for e in guard.update(4, {"loss": None})] == ["stop"]  # TRL logs an all-NaN metric as None
    assert guard.update(5, {"loss": 1.0}) == []


def test_default_rules_stop_after_three_skipped_non_finite_steps():
    guard = CollapseGuard(parse_guard_rules(None))
    assert guard.update(1, {"train/nonfinite_skipped": 1.0}) == []
    assert guard.update(2, {"train/nonfinite_skipped": 1.0}) == []
    [event] = guard.update(3, {"train/nonfinite_skipped": 1.0})
    assert event.action == "stop" and "non-finite" in event.message


def test_default_rules_on_a_collapsing_tent_run():
    # the Tent lr 3e-4 shape of DESIGN.md: entropy -> 0, loops, answers vanish
    guard = CollapseGuard()
    steps = [
        {"loss": 1.1, "zerosiam/entropy_target": 1.11, "monitor/repetition": 0.15, "completions/answer_rate": 1.0},
        {"loss": 0.5, "zerosiam/entropy_target": 0.50, "monitor/repetition": 0.31, "completions/answer_rate": 0.75},
        {"loss": 0.2, "zerosiam/entropy_target": 0.09, "monitor/repetition": 0.52, "completions/answer_rate": 0.2},
        {"loss": 0.1, "zerosiam/entropy_target": 0.05, "monitor/repetition": 0.58, "completions/answer_rate": 0.1},
        {"loss": 0.1, "zerosiam/entropy_target": 0.03, "monitor/repetition": 0.40, "completions/answer_rate": 0.04},
    ]
    fired = {step: [e.rule.metric for e in guard.update(step, m)] for step, m in enumerate(steps, start=1)}
    assert fired == {
        1: [], 2: [], 3: [], 4: ["monitor/repetition"], 5: ["zerosiam/entropy_target", "completions/answer_rate"],
    }  # fmt: skip


def test_state_round_trip_keeps_streaks_and_first_values_across_resume():
    rules = parse_guard_rules(
        [
            {"metric": "zerosiam/entropy_target", "below": 0.1, "for_steps": 3, "action": "stop"},
            {"metric": "coherence/base_nll", "above_first_times": 2.0},
        ]
    )
    guard = CollapseGuard(rules)
    guard.update(1, {"zerosiam/entropy_target": 0.05, "coherence/base_nll": 0.5})
    guard.update(2, {"zerosiam/entropy_target": 0.05, "coherence/base_nll": 0.6})
    state = json.loads(json.dumps(guard.state_dict()))  # what a checkpoint stores

    resumed = CollapseGuard(rules)
    resumed.load_state_dict(state)
    assert resumed.update(2, {"zerosiam/entropy_target": 0.01}) == []  # a replayed step is ignored
    events = resumed.update(3, {"zerosiam/entropy_target": 0.05, "coherence/base_nll": 1.1})
    assert sorted(e.action for e in events) == ["stop", "warn"]  # streak 3 reached; 1.1 > 2 x 0.5 (first)

    other = CollapseGuard(rules[:1])  # a rule set that changed: unknown keys are dropped, known ones kept
    other.load_state_dict(state)
    assert other.counters == {rules[0].key: 2}
    resumed.reset_counters()
    assert set(resumed.counters.values()) == {0} and resumed.first_values
    resumed.reset()  # a new online stream: first values are measured again
    assert resumed.first_values == {} and resumed.update(3, {"zerosiam/entropy_target": 0.01}) == []
