"""Tests for zerosiam_llm.grading: extraction, gold answers, the process-pool grader and its deadline, metrics."""

from __future__ import annotations

import itertools
import json
import math
import time
from pathlib import Path

import pytest

from zerosiam_llm.errors import UserInputError
from zerosiam_llm.grading import (
    Extraction,
    Grader,
    avg_at_n,
    bootstrap_ci,
    extract_answer,
    gold_answer,
    has_boxed,
    maj_at_k,
    majority_answer,
    normalize_answer,
    paired_bootstrap_diff,
    pass_at_k,
    wilson_interval,
)

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"

# A power tower: sympy tries to evaluate it exactly and never returns (checked: > 10 s with math-verify's
# timeouts off, at under 100 MB), so it really exercises the external deadline.
PATHOLOGICAL = "9^{9^{9^{9}}}"


@pytest.fixture(scope="module")
def grader():
    with Grader(num_workers=2, timeout_s=5.0) as g:
        yield g


# ---------------------------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so the answer is $\boxed{\frac{1}{2}}$.", Extraction(r"\frac{1}{2}", "boxed")),
        (r"first \boxed{3}, then corrected: \boxed{5}", Extraction("5", "boxed")),
        (r"We get \boxed{7}. Let me double check: \boxed{12", Extraction("7", "boxed")),  # truncated last box
        (r"\fbox{9} minutes", Extraction("9", "boxed")),
        (r"$\boxed 5$", Extraction("5", "boxed")),
        (r"\boxed{\{1,2\}}", Extraction(r"\{1,2\}", "boxed")),
        (r"\boxed{\left\{ x \right.}", Extraction(r"\left\{ x \right.", "boxed")),  # escaped brace not counted
        (r"\boxed{4} ... put your final answer within \boxed{}.", Extraction("4", "boxed")),  # echoed instruction
        ("The answer is 42.", Extraction("42", "answer_is")),
        (r"The final answer is $\frac{3}{4}$. I hope it is correct.", Extraction(r"\frac{3}{4}", "answer_is")),
        ("Final Answer: 3.5.", Extraction("3.5", "answer_is")),
        ("**Answer:** **73**", Extraction("73", "answer_is")),
        ("So the answer is 1,234 dollars.", Extraction("1234", "answer_is")),  # unit words dropped
        ("The answer is $18 per day.", Extraction("18", "answer_is")),
        ("The answer is 2 and 3", Extraction("2 and 3", "answer_is")),  # not a number with a unit: kept
        ("The answer is x = 5", Extraction("x = 5", "answer_is")),
        ("She has 3 boxes, so 1,234 apples in all", Extraction("1234", "last_number")),
        ("x equals -3 here", Extraction("-3", "last_number")),
        ("5-3=2", Extraction("2", "last_number")),
        ("a ratio of 3/4", Extraction("3/4", "last_number")),
        ("I do not know.", Extraction(None, "none")),
        ("", Extraction(None, "none")),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_has_boxed():
    assert has_boxed(r"x \boxed{1}")
    assert has_boxed(r"\fbox{1}")
    assert not has_boxed(r"truncated \boxed{1")
    assert not has_boxed(r"empty \boxed{}")
    assert not has_boxed("The answer is 1")


# ---------------------------------------------------------------------------------------------------------------
# Gold answers and normalisation
# ---------------------------------------------------------------------------------------------------------------


def test_gold_answer_styles():
    assert gold_answer(r"So $x=\boxed{2}$, or \boxed{\frac{\pi}{2}}.", "boxed") == r"\frac{\pi}{2}"
    assert gold_answer("She pays 1,000 + 234.\n#### 1,234", "gsm8k") == "1234"
    assert gold_answer("#### -5", "gsm8k") == "-5"
    assert gold_answer("3.0", "plain") == "3"
    assert gold_answer(" \\frac{1}{2} ", "plain") == r"\frac{1}{2}"
    assert gold_answer("2.5", "plain") == "2.5"
    assert gold_answer(27.0, "plain") == "27"  # AMC23 golds are JSON floats
    assert gold_answer(70, "plain") == "70"  # AIME25 golds are JSON ints


def test_gold_answer_bad_input():
    with pytest.raises(UserInputError, match="boxed, gsm8k, plain"):
        gold_answer("1", "latex")
    with pytest.raises(UserInputError):
        gold_answer("no marker", "gsm8k")
    with pytest.raises(UserInputError):
        gold_answer(r"unclosed \boxed{3", "boxed")


def test_normalize_answer():
    assert normalize_answer(r"\left( 3, \dfrac{\pi}{2} \right)") == r"(3,\frac{\pi}{2})"
    assert normalize_answer(r"30^\circ") == normalize_answer("30^{\\circ}") == "30"
    assert normalize_answer(r"50\%") == "50"
    assert normalize_answer(r"\text{Evelyn}") == "Evelyn"
    assert normalize_answer("12.") == "12"
    assert normalize_answer("x=5") == "x=5"  # assignments are math-verify's call, not stripped here
    assert normalize_answer(r"\rightarrow") == r"\rightarrow"


# ---------------------------------------------------------------------------------------------------------------
# Grader
# ---------------------------------------------------------------------------------------------------------------


def test_grader_wrong_and_equivalent(grader):
    golds = ["1/2", "12", r"\frac{1}{2}", "1/2", "1/2", "3/4", "1000", "5", "(1,2)", "1331, 1728"]
    preds = ["0.6", "13", "0.5", r"\frac12", "0.5", r"\dfrac{3}{4}", "1,000", "x=5", "1<x<2", "1728"]
    want = [False, False, True, True, True, True, True, True, False, False]
    assert grader.grade(golds, preds) == want


def test_grader_none_and_fast_path(grader):
    before = grader.stats
    assert grader.grade(["7", r"\frac{3}{4}", r"30^\circ"], [None, r"\dfrac{3}{4}", "30"]) == [False, True, True]
    after = grader.stats
    assert after.none_predictions == before.none_predictions + 1
    assert after.fast_path == before.fast_path + 2
    assert after.verified == before.verified  # no worker call for any of the three
    assert after.graded == before.graded + 3


def test_grader_equivalent_pairs_and_cache(grader):
    pairs = [("1/2", "0.5"), ("0.5", r"\frac{1}{2}"), ("2", "3"), ("1/2", "0.5")]
    before = grader.stats
    assert grader.equivalent_pairs(pairs) == [True, True, False, True]
    assert grader.stats.cached >= before.cached + 1  # the duplicate pair
    assert grader.equivalent("0.25", "1/4")


def test_grader_bad_arguments(grader):
    with pytest.raises(UserInputError):
        Grader(num_workers=0)
    with pytest.raises(UserInputError):
        Grader(timeout_s=0)
    with pytest.raises(UserInputError):
        grader.grade(["1", "2"], ["1"])


def test_grader_as_a_context_manager():
    with Grader(timeout_s=5.0) as grader:
        assert grader.grade(["1/2", "4"], ["0.5", "5"]) == [True, False]


def test_grader_closed():
    g = Grader(num_workers=1)
    g.close()
    g.close()  # idempotent
    with pytest.raises(RuntimeError):
        g.grade(["1"], ["2"])


def test_deadline_kills_pathological_answer_and_keeps_going():
    timeout_s = 1.0
    with Grader(num_workers=1, timeout_s=timeout_s) as g:
        assert g.grade(["1/2"], ["0.5"]) == [True]  # worker started and warm
        t0 = time.monotonic()
        out = g.grade(["5", "5", "7"], [PATHOLOGICAL, "5.0", "7.00"])
        wall = time.monotonic() - t0
        assert out == [False, True, True]
        assert wall < timeout_s + 3.0, wall  # one worker: the restart is on the critical path and still cheap
        stats = g.stats
        assert stats.timeouts == 1 and stats.worker_restarts == 1 and stats.errors == 0
        assert g.grade(["2", "2"], ["2.0", "3"]) == [True, False]  # the replacement worker grades normally
        t0 = time.monotonic()
        assert g.grade(["5"], [PATHOLOGICAL]) == [False]  # cached: costs nothing the second time
        assert time.monotonic() - t0 < 0.5
        assert g.stats.timeouts == 1


def test_deadline_with_two_workers_and_mixed_batch():
    timeout_s = 1.0
    golds = [str(i) for i in range(40)]
    preds = [f"{i}.0" if i % 3 else f"{i + 1}" for i in range(40)]
    want = [bool(i % 3) for i in range(40)]
    golds[5], preds[5], want[5] = "5", PATHOLOGICAL, False
    golds[30], preds[30], want[30] = "30", "10^{10^{10^{10}}}", False
    with Grader(num_workers=2, timeout_s=timeout_s) as g:
        g.grade(["1/2", "1/3"], ["0.5", "0.3"])  # warm both workers
        t0 = time.monotonic()
        assert g.grade(golds, preds, progress=True) == want
        wall = time.monotonic() - t0
        assert g.stats.timeouts == 2
        assert wall < 2 * timeout_s + 4.0, wall


def test_worker_that_died_is_replaced():
    with Grader(num_workers=1, timeout_s=5.0) as g:
        assert g.grade(["1/2"], ["0.5"]) == [True]
        worker = g._workers[0]  # white-box: simulate an OOM kill of the idle worker
        worker.process.kill()
        worker.process.join()
        assert g.grade(["1/2", "3"], ["0.5", "4"]) == [True, False]
        assert g.stats.worker_restarts == 1 and g.stats.errors == 0


@pytest.mark.slow
def test_every_gold_answer_grades_correct_against_itself():
    """Must-show: each gold of all five benchmark files, written in a sentence with \\boxed{}, is graded correct,
    both through the fast path and by math-verify alone (fast_path=False)."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"benchmark files not found at {DATA_DIR}")

    def rows(name):
        with open(DATA_DIR / name, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    files = {  # file: (gold field, gold style, expected rows)
        "math500_test.jsonl": ("answer", "plain", 500),
        "aime24_test.jsonl": ("answer", "plain", 30),
        "aime25_test.jsonl": ("answer", "plain", 30),
        "amc23_test.jsonl": ("answer", "plain", 40),
        "gsm8k_test.jsonl": ("answer", "gsm8k", 1319),
    }
    golds, preds, names = [], [], []
    for name, (field, style, _) in files.items():
        for row in rows(name):
            gold = gold_answer(row[field], style)
            completion = f"Putting it together, so the final answer is \\boxed{{{gold}}}."
            extraction = extract_answer(completion)
            assert extraction == Extraction(gold, "boxed"), (name, gold)
            golds.append(gold)
            preds.append(extraction.answer)
            names.append(name)
    # The "boxed" style on MATH-500 solutions reproduces the answer field exactly.
    math500 = rows("math500_test.jsonl")
    assert [gold_answer(r["solution"], "boxed") for r in math500] == [r["answer"] for r in math500]

    for fast_path in (True, False):
        with Grader(num_workers=2, timeout_s=10.0, fast_path=fast_path) as g:
            results = g.grade(golds, preds)
            stats = g.stats
        counts = {name: sum(ok for ok, n in zip(results, names, strict=True) if n == name) for name in files}
        assert counts == {name: spec[2] for name, spec in files.items()}, (fast_path, counts)
        assert stats.timeouts == 0 and stats.errors == 0 and stats.gold_unparsed == 0
        if not fast_path:
            assert stats.verified == len(set(zip(golds, preds, strict=True)))


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------


def _pass_at_k_brute(n: int, c: int, k: int) -> float:
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_brute(n, c, k), abs=1e-12)


def test_pass_at_k_edges_and_bad_args():
    assert pass_at_k(16, 4, 1) == pytest.approx(4 / 16)
    assert pass_at_k(1000, 1, 1000) == 1.0
    assert 0.0 < pass_at_k(1000, 1, 10) < 0.011  # large n: no overflow
    for args in [(0, 0, 1), (4, 5, 1), (4, 1, 0), (4, 1, 5)]:
        with pytest.raises(UserInputError):
            pass_at_k(*args)


def test_avg_at_n():
    assert avg_at_n([True, False, True, True]) == 0.75
    with pytest.raises(UserInputError):
        avg_at_n([])


def test_wilson_interval():
    lo, hi = wilson_interval(30, 100)
    assert lo < 0.3 < hi
    assert (lo, hi) == pytest.approx((0.2189, 0.3958), abs=1e-3)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    w90 = wilson_interval(30, 100, confidence=0.9)
    assert w90[0] > wilson_interval(30, 100)[0]


def test_bootstrap_ci():
    values = [float(i % 3 == 0) for i in range(200)]
    mean = sum(values) / len(values)
    lo, hi = bootstrap_ci(values, seed=1)
    assert lo < mean < hi
    assert bootstrap_ci(values, seed=1) == (lo, hi)  # deterministic per seed
    assert bootstrap_ci(values, seed=2) != (lo, hi)
    assert bootstrap_ci([0.5] * 10) == (0.5, 0.5)
    with pytest.raises(UserInputError):
        bootstrap_ci([])


def test_paired_bootstrap_diff():
    a = [float(i % 2) for i in range(100)]
    b = [1.0 if i % 4 else float(i % 2) for i in range(100)]
    diff, lo, hi = paired_bootstrap_diff(a, b, seed=0)
    assert diff == pytest.approx(sum(b) / 100 - sum(a) / 100)
    assert 0.0 < lo < diff < hi
    assert paired_bootstrap_diff(a, a) == (0.0, 0.0, 0.0)
    assert paired_bootstrap_diff(a, b, seed=0) == (diff, lo, hi)
    with pytest.raises(UserInputError):
        paired_bootstrap_diff([1.0], [1.0, 0.0])


def test_majority_answer_exact_and_by_equivalence(grader):
    answers = ["1/2", "3", "0.5", r"\frac{1}{2}", "3", None, None, None]
    assert majority_answer(answers) == (1, 2)  # exact strings: "3" wins
    assert majority_answer(answers, grader.equivalent) == (0, 3)  # 1/2, 0.5 and \frac{1}{2} are one cluster
    assert majority_answer([None, None, "4"]) == (2, 1)  # None never wins
    assert majority_answer([None, None]) == (None, 0)
    assert majority_answer(["7", "8", "8", "7"]) == (0, 2)  # tie: first occurrence
    assert majority_answer([r"\dfrac{1}{2}", r"\frac{1}{2}"]) == (0, 2)  # normalised strings


def test_maj_at_k(grader):
    answers = ["1/2", "3", "0.5", r"\frac{1}{2}", "3"]
    correct = [True, False, True, True, False]
    assert maj_at_k(answers, correct) == 0.0
    assert maj_at_k(answers, correct, grader.equivalent) == 1.0
    assert maj_at_k(answers, correct, k=2) == 1.0  # tie between the first two: first occurrence
    assert maj_at_k([None, None], [False, False]) == 0.0
    with pytest.raises(UserInputError):
        maj_at_k(answers, correct[:2])
    assert math.isclose(avg_at_n(correct), 0.6)
