"""Label-free rewards of the RL methods, one per rollout, computed from each group of k rollouts of one prompt.

Each default follows its authors' code (docs/methods.md, "Methods and their reference code"); the project's variants
are named options:

- ``majority-vote`` (TTRL, Zuo et al. 2025; PRIME-RL/TTRL ``verl/utils/reward_score/ttrl/ttt_metrics.py``): every
  rollout's answer string (the last box, else "the answer is", else the last number; ``''`` when there is none) is
  normalised (:func:`vote_key`), the most common string wins (``Counter.most_common``: the first seen among ties,
  ``''`` included), and each rollout gets 1 if its answer grades equal to the winner. ``vote_clustering:
  equivalence`` votes over math-equivalence clusters instead, without the no-answer rollouts (the project's earlier
  rule).
- ``semantic-vote`` (EMPO, Zhang et al. 2025; QingyangZhang/EMPO ``trl/src/open_r1/rewards.py``): the share of the
  group in the rollout's answer cluster (boxed answers; clusters by math equivalence as the paper and EMPO's verl
  code, or by string with ``vote_clustering: string``), ``''`` gets 0 and is a cluster of its own, and every rollout
  gets 0 when the group's semantic entropy is not below ln k (all answers distinct).
- ``entropy-reward`` (RENT, Prabhudesai et al. 2025 / EM-RL): minus the mean token entropy of the rollout, on
  logits / the rollout temperature; a rollout without a box gets ``no_answer_reward`` (RENT: -7) instead.
- ``self-certainty`` (Intuitor, Zhao et al. 2025): the mean over tokens of ``KL(U || p_t)`` on raw logits.

The vote rewards read only the completions' text (TRL's reward-function API); the logit rewards read the policy's
hidden states (``objectives.sequence_scores``). None of them ever reads a gold answer.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from zerosiam_llm.grading import answer_clusters, extract_answer, majority_answer, normalize_answer

VOTE_METHODS = ("majority-vote", "semantic-vote")
LOGIT_METHODS = ("entropy-reward", "self-certainty")
VOTE_CLUSTERINGS = ("string", "equivalence")
DEFAULT_CLUSTERING = {"majority-vote": "string", "semantic-vote": "equivalence"}  # each method's reference

Equivalent = Callable[[str, str], bool]

# TTRL's string normalisation (Qwen2.5-Math's ``strip_string``), the rules that change a vote: an assignment
# "x = 5" is its value, a trailing "\text{...}" unit and "^\circ" go, "\{" is "{", "5.0" / "5." is "5", "a/b" and
# "\frac12" are "\frac{a}{b}"; its list of unit words and its number words ("five") are not reproduced.
_ASSIGNMENT_RE = re.compile(r"^[a-zA-Z]\s*(?:=|\\in)\s*")
_TRAILING_TEXT_RE = re.compile(r"\\(?:text|mbox|mathrm)\{[^{}]*\}$")
_INTEGRAL_RE = re.compile(r"(\d+)\.0*(?=$|[^\d])")
_SLASH_FRACTION_RE = re.compile(r"^(-?\d+)/(\d+)$")
_SHORT_FRACTION_RE = re.compile(r"\\frac(\d)(\d)")
_SHORT_FRACTION_ARG_RE = re.compile(r"\\frac\{([^{}]*)\}(\d)")


def vote_key(answer: str | None) -> str:
    """The string TTRL votes on: ``''`` for no answer, else the answer after TTRL's normalisation rules."""
    if answer is None:
        return ""
    s = answer.strip().replace("\\!", "").replace("$", "").replace("\\{", "{").replace("\\}", "}")
    s = _ASSIGNMENT_RE.sub("", s)
    if _TRAILING_TEXT_RE.search(s) and _TRAILING_TEXT_RE.sub("", s).strip():
        s = _TRAILING_TEXT_RE.sub("", s)
    s = normalize_answer(s)
    s = _INTEGRAL_RE.sub(r"\1", s)
    s = _SLASH_FRACTION_RE.sub(r"\\frac{\1}{\2}", s)
    s = _SHORT_FRACTION_RE.sub(r"\\frac{\1}{\2}", s)
    s = _SHORT_FRACTION_ARG_RE.sub(r"\\frac{\1}{\2}", s)
    return s


def _grades_equal(given: str, label: str, equivalent: Equivalent | None) -> bool:
    """TTRL's ``grade_answer(given, label)`` on vote keys: equal strings (``''`` equals ``''``), else the grader's
    math equivalence with the label in the gold role; an empty answer never equals a non-empty label."""
    if given == label:
        return True
    if not given or not label or equivalent is None:
        return False
    return bool(equivalent(label, given))


def majority_vote_rewards(
    answers: Sequence[str | None], equivalent: Equivalent | None = None, clustering: str = "string"
) -> list[float]:
    """TTRL's reward for one group (``clustering="string"``), or the project's cluster vote (``"equivalence"``:
    clusters by the grader, ties to the cluster seen first, no-answer rollouts neither vote nor win)."""
    if clustering == "string":
        keys = [vote_key(a) for a in answers]
        label = Counter(keys).most_common(1)[0][0]  # the first key seen among the most common, '' included
        return [1.0 if _grades_equal(key, label, equivalent) else 0.0 for key in keys]
    clusters = answer_clusters(answers, equivalent)
    winner, _ = majority_answer(answers, equivalent)
    best = clusters[winner] if winner is not None else None
    return [1.0 if c is not None and c == best else 0.0 for c in clusters]


def semantic_vote_rewards(
    answers: Sequence[str | None], equivalent: Equivalent | None = None, clustering: str = "equivalence"
) -> list[float]:
    """EMPO's reward for one group of n: the rollout's cluster share ``count / n`` (``''`` rollouts: 0, each its own
    cluster), all 0 when the semantic entropy is not below ln n, i.e. when every rollout is in a cluster of its own.
    (EMPO computes ``-sum p log p < log n`` in float64, which rounds below ln n for some all-distinct groups, e.g.
    n = 7, so its rule never fires there; here the rule is the exact one.)"""
    n = len(answers)
    # string: the groups of equal normalised strings, no merging by equivalence
    clusters = answer_clusters(answers, equivalent if clustering == "equivalence" else None)
    counts = Counter(c for c in clusters if c is not None)
    distinct = len(counts) + sum(c is None for c in clusters)  # each '' is a singleton in the entropy
    if distinct == n:  # H = ln n: the group has no majority at all
        return [0.0] * n
    return [0.0 if c is None else counts[c] / n for c in clusters]


def vote_rewards(
    answers: Sequence[str | None],
    k: int,
    method: str,
    equivalent: Equivalent | None = None,
    clustering: str | None = None,
) -> list[float]:
    """The vote reward of each answer, ``answers`` being consecutive groups of ``k`` (one group per prompt);
    ``clustering`` None = the method's reference (:data:`DEFAULT_CLUSTERING`)."""
    if method not in VOTE_METHODS:
        raise ValueError(f"not a vote method: {method!r}")
    clustering = clustering or DEFAULT_CLUSTERING[method]
    if clustering not in VOTE_CLUSTERINGS:
        raise ValueError(f"vote_clustering must be one of {', '.join(VOTE_CLUSTERINGS)}, got {clustering!r}")
    if len(answers) % k:
        raise ValueError(f"{len(answers)} answers do not split into groups of k = {k}")
    rule = majority_vote_rewards if method == "majority-vote" else semantic_vote_rewards
    rewards: list[float] = []
    for start in range(0, len(answers), k):
        rewards += rule(answers[start : start + k], equivalent, clustering)
    return rewards


def completion_text(completion: Any) -> str:
    """A TRL completion as text: a string, or a conversational list of messages (the assistant's content)."""
    if isinstance(completion, str):
        return completion
    return "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))


def vote_answer(text: str, method: str) -> str | None:
    """The answer a vote method reads from a completion: TTRL's extraction order for ``majority-vote`` (box, "the
    answer is", last number), the last box only for ``semantic-vote`` (EMPO's math-verify parse needs an anchor)."""
    extraction = extract_answer(text)
    if method == "semantic-vote" and extraction.source != "boxed":
        return None
    return extraction.answer


class VoteReward:
    """A TRL reward function (``reward(prompts, completions, **kwargs) -> list[float]``) for a vote method.

    The rollouts of one prompt must be consecutive groups of ``k`` in each call (each process holds whole groups).
    Extra data columns arrive as keyword arguments; the gold ``answer`` column is among them and is never read.
    ``trained`` < k (TTRL's vote over m = k rollouts, training on the first ``trained`` of each group): the others
    vote but get None, which TRL turns into NaN, out of the group baseline and the advantages. ``last`` holds the
    last call's rewards, vote-only rollouts included (the run's ``samples.jsonl``).
    """

    def __init__(
        self,
        method: str,
        k: int,
        equivalent: Equivalent | None = None,
        clustering: str | None = None,
        trained: int | None = None,
    ) -> None:
        if method not in VOTE_METHODS:
            raise ValueError(f"not a vote method: {method!r}")
        self.method, self.k, self.equivalent, self.clustering = method, k, equivalent, clustering
        self.trained = k if trained is None else trained
        self.last: list[float] | None = None
        self.__name__ = method.replace("-", "_")  # TRL names the logged reward column after it

    def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
        answers = [vote_answer(completion_text(c), self.method) for c in completions]
        self.last = vote_rewards(answers, self.k, self.method, self.equivalent, self.clustering)
        return [r if i % self.k < self.trained else None for i, r in enumerate(self.last)]
