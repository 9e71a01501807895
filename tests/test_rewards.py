"""The label-free rewards (``rewards.py``) against hand-computed values; the logit rewards against float64."""

import math

import pytest
import torch

from zerosiam_llm.grading import Grader
from zerosiam_llm.objectives import sequence_scores
from zerosiam_llm.rewards import VoteReward, vote_rewards


@pytest.fixture(scope="module")
def grader():
    with Grader(num_workers=1) as g:
        yield g


def test_majority_vote_by_hand():
    # group 1: "4" x2 beats "5"; group 2: a 1-1 tie goes to the answer seen first, None gets 0; group 3: no answer
    answers = ["4", "5", "4", None, "7", "8", None, None, None]
    assert vote_rewards(answers, 3, "majority-vote") == [1, 0, 1, 0, 1, 0, 0, 0, 0]


def test_semantic_vote_by_hand():
    answers = ["4", "5", "4", None, "7", "8", None, None, None]
    assert vote_rewards(answers, 3, "semantic-vote") == pytest.approx([2 / 3, 1 / 3, 2 / 3, 0, 1 / 3, 1 / 3, 0, 0, 0])


def test_equivalent_forms_share_one_cluster(grader):
    """1/2, 0.5 and \\frac{1}{2} are one answer for both votes (the project's grader); without it, three."""
    answers = ["1/2", "0.5", "\\frac{1}{2}", "2"]
    assert vote_rewards(answers, 4, "majority-vote", grader.equivalent) == [1, 1, 1, 0]
    assert vote_rewards(answers, 4, "semantic-vote", grader.equivalent) == [0.75, 0.75, 0.75, 0.25]
    assert vote_rewards(answers, 4, "semantic-vote") == [0.25] * 4
    assert vote_rewards(answers, 4, "majority-vote") == [1, 0, 0, 0]  # a 4-way tie: the first answer


def test_vote_reward_reads_text_never_the_gold_answer():
    reward = VoteReward("majority-vote", k=2)
    completions = [[{"role": "assistant", "content": "so \\boxed{3}"}], [{"role": "assistant", "content": "7"}],
                   "\\boxed{6}", "it is \\boxed{6}"]  # fmt: skip
    with_gold = reward(prompts=[""] * 4, completions=completions, answer=["7", "7", "1", "1"])
    assert with_gold == reward(prompts=[""] * 4, completions=completions) == [1, 0, 1, 1]
    assert reward.__name__ == "majority_vote"
    with pytest.raises(ValueError, match="groups of k = 2"):
        reward(prompts=[""] * 3, completions=completions[:3])


def test_logit_rewards_match_float64_full_logits():
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(3, 6, 16, generator=g, dtype=torch.float64) * 2
    weight = torch.randn(53, 16, generator=g, dtype=torch.float64)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, :2] = False  # a left-padded row
    mask[2] = False  # an empty completion
    entropy, certainty = sequence_scores(hidden, mask, weight, temperature=0.8, token_chunk=4, vocab_chunk=7)
    log_p = (hidden @ weight.T / 0.8).log_softmax(-1)
    token_entropy = -(log_p.exp() * log_p).sum(-1)
    token_certainty = -log_p.mean(-1) - math.log(53)  # KL(U || p) = sum_c (1/V) log((1/V) / p_c)
    n = mask.sum(-1)
    torch.testing.assert_close(entropy[:2], ((token_entropy * mask).sum(-1) / n)[:2], rtol=1e-12, atol=0)
    torch.testing.assert_close(certainty[:2], ((token_certainty * mask).sum(-1) / n)[:2], rtol=1e-12, atol=0)
    assert math.isnan(entropy[2]) and math.isnan(certainty[2])
    assert (certainty[:2] > 0).all()  # a KL divergence
