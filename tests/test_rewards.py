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
    scores = sequence_scores(hidden, mask, weight, temperature=0.8, token_chunk=4, vocab_chunk=7)
    entropy, certainty = scores.entropy, scores.self_certainty
    log_p = (hidden @ weight.T / 0.8).log_softmax(-1)
    token_entropy = -(log_p.exp() * log_p).sum(-1)
    token_certainty = -log_p.mean(-1) - math.log(53)  # KL(U || p) = sum_c (1/V) log((1/V) / p_c)
    n = mask.sum(-1)
    torch.testing.assert_close(entropy[:2], ((token_entropy * mask).sum(-1) / n)[:2], rtol=1e-12, atol=0)
    torch.testing.assert_close(certainty[:2], ((token_certainty * mask).sum(-1) / n)[:2], rtol=1e-12, atol=0)
    assert math.isnan(entropy[2]) and math.isnan(certainty[2])
    assert (certainty[:2] > 0).all()  # a KL divergence
    # the monitors cover every selected token, as the losses' statistics do
    assert scores.monitors.num_tokens == int(n.sum())
    assert scores.monitors.entropy_target == pytest.approx(token_entropy[mask].mean().item(), rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# LabelFreeTrainer (GRPO) end to end on the tiny model
# ---------------------------------------------------------------------------------------------------------------

RL_METHODS = ["majority-vote", "semantic-vote", "entropy-reward", "self-certainty"]


def _rl_args(model_dir, out, method, *extra):
    return ["--recipe", "smollm2-135m-cpu", "--model", str(model_dir), "--output_dir", str(out), "--method", method,
            "--num_rollouts", "4", "--per_device_train_batch_size", "8", "--max_steps", "2", "--save_steps", "2",
            "--max_completion_length", "12", "--num_problems", "16", "--disable_tqdm", "true",
            *map(str, extra)]  # fmt: skip


@pytest.mark.parametrize("method", RL_METHODS)
def test_rl_method_offline_records_rewards_and_gold_changes_nothing(method, tiny_model_dir, tmp_path):
    """Offline GRPO with each reward: samples.jsonl holds each rollout's reward (the vote rewards by hand from the
    recorded answers), the collapse monitors are logged, and the same run without the gold column ends in the same
    adapter bit for bit."""
    from safetensors.torch import load_file

    from zerosiam_llm.cli import train_main
    from zerosiam_llm.files import read_jsonl

    gold, plain = tmp_path / "gold", tmp_path / "plain"
    assert train_main(_rl_args(tiny_model_dir, gold, method, "--answer_field", "answer")) == 0
    assert train_main(_rl_args(tiny_model_dir, plain, method, "--answer_field", "null")) == 0
    rows = read_jsonl(gold / "samples.jsonl")
    assert len(rows) == 16 and all(isinstance(r["reward"], float) for r in rows)
    if method in ("majority-vote", "semantic-vote"):
        answers = [r["answer"] for r in rows]
        assert [r["reward"] for r in rows] == pytest.approx(vote_rewards(answers, 4, method))
    metrics = [m for m in read_jsonl(gold / "metrics.jsonl") if "loss" in m]
    key = "rewards/" + method.replace("-", "_") + "/mean"
    assert all(key in m and "zerosiam/logit_norm_mean" in m and "monitor/repetition" in m for m in metrics)
    a, b = load_file(str(gold / "adapter_model.safetensors")), load_file(str(plain / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["reward"] for r in rows] == [r["reward"] for r in read_jsonl(plain / "samples.jsonl")]


@pytest.mark.parametrize("method", RL_METHODS)
def test_rl_method_online_two_batches(method, tiny_model_dir, tmp_path):
    """Online: each stream batch is predicted (majority of the k sampled answers) before its one GRPO update."""
    from zerosiam_llm.cli import train_main
    from zerosiam_llm.files import read_jsonl

    out = tmp_path / "online"
    argv = ["--recipe", "smollm2-135m-online-cpu", "--model", str(tiny_model_dir), "--output_dir", str(out),
            "--method", method, "--num_rollouts", "2", "--temperature", "1.0", "--max_completion_length", "10",
            "--num_problems", "7", "--stream_batch_size", "4", "--answer_field", "answer",
            "--disable_tqdm", "true"]  # fmt: skip
    assert train_main(argv) == 0
    predictions = read_jsonl(out / "arithmetic" / "predictions.jsonl")
    assert [p["step"] for p in predictions] == [1] * 4 + [2] * 3  # 2 batches, the last of 3
    assert all(len(p["answers"]) == 2 and len(p["rewards"]) == 2 for p in predictions)
    assert [m["step"] for m in read_jsonl(out / "arithmetic" / "metrics.jsonl") if "loss" in m] == [1, 2]


def test_rl_config_errors():
    from zerosiam_llm.errors import UserInputError
    from zerosiam_llm.parser import build_config

    with pytest.raises(UserInputError, match="num_rollouts must be >= 2 for method majority-vote"):
        build_config("smollm2-135m-cpu", {"method": "majority-vote", "num_rollouts": 1})
    with pytest.raises(UserInputError, match="temperature must be > 0 for method self-certainty"):
        build_config("smollm2-135m-online-cpu", {"method": "self-certainty", "num_rollouts": 2})
    config = build_config("smollm2-135m-cpu", {"method": "semantic-vote", "num_rollouts": 4, "loss_type": "grpo",
                                               "epsilon": 0.3})  # fmt: skip
    assert (type(config).__name__, config.num_generations, config.loss_type, config.epsilon, config.beta) == (
        "LabelFreeConfig", 4, "grpo", 0.3, 0.0)
    with pytest.raises(UserInputError, match="unknown field 'loss_type'"):  # a GRPO field means nothing to Tent
        build_config("smollm2-135m-cpu", {"method": "tent", "loss_type": "grpo"})


def test_rl_method_resumes_after_sigkill(tiny_model_dir, tmp_path):
    """majority-vote, 4 steps straight == 2 steps, SIGKILL, resume: the same rollouts, rewards and losses."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from zerosiam_llm.files import read_jsonl
    from zerosiam_llm.testing import kill_when

    train = Path(__file__).resolve().parents[1] / "train.py"

    def cmd(out):
        extra = ["--max_steps", 4, "--max_completion_length", 40, "--monitor_every", 1000]
        return [sys.executable, str(train), *_rl_args(tiny_model_dir, out, "majority-vote", *extra)]

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    subprocess.run(cmd(straight), check=True, env=env, capture_output=True)
    kill_when(cmd(resumed), env, (resumed / "checkpoint-2" / "trainer_state.json").is_file)
    assert not (resumed / "summary.json").exists()
    subprocess.run(cmd(resumed), check=True, env=env, capture_output=True)

    def record(out):
        return [(s["step"], s["id"], s["completion"], s["reward"]) for s in read_jsonl(out / "samples.jsonl")]

    assert record(straight) == record(resumed) and {r[0] for r in record(resumed)} == {1, 2, 3, 4}
    losses = [[m["loss"] for m in read_jsonl(out / "metrics.jsonl") if "loss" in m] for out in (straight, resumed)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-9)
