"""Label-free rewards of the RL methods, one per rollout, computed from each group of k rollouts of one prompt.

- ``majority-vote`` (TTRL, Zuo et al. 2025): 1 when the rollout's answer is math-equivalent to the majority answer of
  its group, else 0; ties go to the answer cluster seen first; a rollout without an answer gets 0.
- ``semantic-vote`` (EMPO, Zhang et al. 2025): the share of the group in the rollout's answer cluster (clusters by
  math equivalence); 0 without an answer.
- ``entropy-reward`` (RENT / EM-RL): minus the mean token entropy of the rollout under the policy that generated it.
- ``self-certainty`` (Intuitor, Zhao et al. 2025): the mean over tokens of ``KL(U || p_t)``.

The vote rewards read only the completions' text (TRL's reward-function API); the logit rewards read the policy's
hidden states (``objectives.sequence_scores``). None of them ever reads a gold answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from zerosiam_llm.grading import answer_clusters, extract_answer, majority_answer

VOTE_METHODS = ("majority-vote", "semantic-vote")
LOGIT_METHODS = ("entropy-reward", "self-certainty")
RL_METHODS = VOTE_METHODS + LOGIT_METHODS


def vote_rewards(
    answers: Sequence[str | None], k: int, method: str, equivalent: Callable[[str, str], bool] | None = None
) -> list[float]:
    """The vote reward of each answer, ``answers`` being consecutive groups of ``k`` (one group per prompt)."""
    if method not in VOTE_METHODS:
        raise ValueError(f"not a vote method: {method!r}")
    if len(answers) % k:
        raise ValueError(f"{len(answers)} answers do not split into groups of k = {k}")
    rewards: list[float] = []
    for start in range(0, len(answers), k):
        group = list(answers[start : start + k])
        clusters = answer_clusters(group, equivalent)
        if method == "majority-vote":
            winner, _ = majority_answer(group, equivalent)
            best = clusters[winner] if winner is not None else None
            rewards += [1.0 if c is not None and c == best else 0.0 for c in clusters]
        else:
            rewards += [0.0 if c is None else clusters.count(c) / k for c in clusters]
    return rewards


def completion_text(completion: Any) -> str:
    """A TRL completion as text: a string, or a conversational list of messages (the assistant's content)."""
    if isinstance(completion, str):
        return completion
    return "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))


class VoteReward:
    """A TRL reward function (``reward(prompts, completions, **kwargs) -> list[float]``) for a vote method.

    The rollouts of one prompt must be consecutive groups of ``k`` in each call (each process holds whole groups).
    Extra data columns arrive as keyword arguments; the gold ``answer`` column is among them and is never read.
    """

    def __init__(self, method: str, k: int, equivalent: Callable[[str, str], bool] | None = None) -> None:
        if method not in VOTE_METHODS:
            raise ValueError(f"not a vote method: {method!r}")
        self.method, self.k, self.equivalent = method, k, equivalent
        self.__name__ = method.replace("-", "_")  # TRL names the logged reward column after it

    def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float]:
        answers = [extract_answer(completion_text(c)).answer for c in completions]
        return vote_rewards(answers, self.k, self.method, self.equivalent)
