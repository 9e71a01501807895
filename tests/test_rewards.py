"""The label-free rewards (``rewards.py``) against hand-computed values; the logit rewards against float64."""

import math
import random
from collections import Counter

import pytest
import torch

from zerosiam_llm.grading import Grader
from zerosiam_llm.objectives import sequence_scores
from zerosiam_llm.rewards import VoteReward, vote_rewards


@pytest.fixture(scope="module")
def grader():
    with Grader(num_workers=1) as g:
        yield g


# ---------------------------------------------------------------------------------------------------------------
# The votes against transcriptions of their authors' code
# ---------------------------------------------------------------------------------------------------------------


def _ttrl_reference(keys, grade):
    """TTRL's reward of one group: PRIME-RL/TTRL @ 3e2cc9376dc7486256f6021b37c4353d0e1abe2b,
    ``verl/verl/utils/reward_score/ttrl/ttt_metrics.py`` L18-27: ``Counter(model_answers).most_common(1)`` over the
    extracted answer strings ('' included), then ``auto_verify`` = ``grade_answer(answer_i, label)`` for each rollout
    (``qwen/math_grade.py`` L234-286: equal normalised strings, '' == '' included, else math equivalence)."""
    label = Counter(keys).most_common(1)[0][0]
    return [1.0 if grade(key, label) else 0.0 for key in keys]


def _empo_reference(preds, same):
    """EMPO's reward of one group: QingyangZhang/EMPO @ c5eccd400ba7a7a1685dedf25eab03780aad855f,
    ``trl/src/open_r1/rewards.py`` L150-215 and ``semantic_uncertainty.py`` L108-133: greedy semantic ids (each
    new item's id given to every later item the rule joins; the rule never joins ''), p = counts / n, and
    ``if total_entropy < math.log(n)``: '' -> 0, else p of its cluster; otherwise every rollout 0. The comparison is
    made with a 1e-9 margin: EMPO's float64 sum rounds below ln n for some all-distinct groups (n = 7), an accident
    the project does not reproduce."""
    n, ids, nxt = len(preds), [-1] * len(preds), 0
    for i, s in enumerate(preds):
        if ids[i] == -1:
            ids[i] = nxt
            for j in range(i + 1, n):
                if same(s, preds[j]):
                    ids[j] = nxt
            nxt += 1
    counts = Counter(ids)
    p = [counts[c] / n for c in sorted(counts)]
    entropy = -sum(q * math.log(q) for q in p)
    if not entropy < math.log(n) - 1e-9:
        return [0.0] * n
    return [0.0 if preds[k] == "" else counts[ids[k]] / n for k in range(n)]


POOL = ["4", "4", "5", "1/2", "0.5", "\\frac{1}{2}", "\\dfrac12", "5.0", "x=5", None, None, "7", "10\\text{ cm}", "10"]


def _groups(n_groups, size, seed):
    rng = random.Random(seed)
    groups = [[rng.choice(POOL) for _ in range(size)] for _ in range(n_groups)]
    groups += [[None] * size, ["1", "2", "3", "4"] + [None] * (size - 4), ["3", "4", "4", "3"] + ["9"] * (size - 4)]
    return groups


@pytest.mark.parametrize("size", [4, 7, 8])
def test_majority_vote_matches_ttrl(size, grader):
    """Random groups with ties, equivalent spellings, empty answers and all-distinct groups: the project's
    majority-vote equals the transcription; the project's earlier cluster vote (``vote_clustering: equivalence``)
    is a wrong variant of TTRL and must differ on some group."""
    from zerosiam_llm.rewards import vote_key

    def grade(given, label):
        return given == label or bool(given and label and grader.equivalent(label, given))

    differ = 0
    for group in _groups(40, size, seed=size):
        ours = vote_rewards(group, size, "majority-vote", grader.equivalent)
        assert ours == _ttrl_reference([vote_key(a) for a in group], grade), group
        differ += ours != vote_rewards(group, size, "majority-vote", grader.equivalent, clustering="equivalence")
    assert differ > 0


def test_majority_vote_by_hand(grader):
    eq = grader.equivalent
    # '' votes and wins: its rollouts get 1 (TTRL's grade_answer('', '') is True)
    assert vote_rewards([None, None, "3"], 3, "majority-vote", eq) == [1, 1, 0]
    # a tie goes to the string seen first
    assert vote_rewards(["3", "4", "4", "3"], 4, "majority-vote", eq) == [1, 0, 0, 1]
    assert vote_rewards(["4", "3", "3", "4"], 4, "majority-vote", eq) == [1, 0, 0, 1]
    # spellings split the string vote; the winner is graded against each rollout
    group = ["0.5", "0.5", "\\frac12", "\\frac12", "3", "3", "3"]
    assert vote_rewards(group, 7, "majority-vote", eq) == [0, 0, 0, 0, 1, 1, 1]
    assert vote_rewards(group, 7, "majority-vote", eq, "equivalence") == [1, 1, 1, 1, 0, 0, 0]
    # the winner "0.5" (first seen of a 2-2 tie) grades equal to \\frac{1}{2} too
    assert vote_rewards(["0.5", "\\frac{1}{2}", "\\frac{1}{2}", "0.5", "2"], 5, "majority-vote", eq) == [1] * 4 + [0]
    # the project's earlier rule: no-answer rollouts neither vote nor win
    assert vote_rewards([None, None, "3"], 3, "majority-vote", eq, "equivalence") == [0, 0, 1]


def test_vote_key_follows_ttrl_normalisation():
    """The strings TTRL's ``strip_string`` gives (PRIME-RL/TTRL @ 3e2cc937, ``qwen/qwen_math_parser.py`` L238-376),
    as run on the reference; its number words are not reproduced."""
    from zerosiam_llm.rewards import vote_key

    expected = {"\\dfrac12": "\\frac{1}{2}", "1/2": "\\frac{1}{2}", "0.5": "0.5", "5.0": "5", "5.": "5",
                "x=5": "5", "10\\text{ cm}": "10", "\\{1,2\\}": "{1,2}", "\\frac{1}{2}": "\\frac{1}{2}",
                "3.50": "3.50"}  # fmt: skip
    assert {a: vote_key(a) for a in expected} == expected
    assert vote_key(None) == "" and vote_key("five") == "five"  # TTRL's w2n would give "5"


@pytest.mark.parametrize("clustering", ["string", "equivalence"])
@pytest.mark.parametrize("size", [4, 7, 8])
def test_semantic_vote_matches_empo(size, clustering, grader):
    """EMPO's threshold (0 for a group whose answers are all distinct), '' -> 0 as a cluster of its own, shares over
    the whole group; the rule without the threshold is the wrong variant and must differ on some group."""
    from zerosiam_llm.grading import normalize_answer

    def same(a, b):
        if not a or not b:
            return False
        return normalize_answer(a) == normalize_answer(b) if clustering == "string" else grader.equivalent(a, b)

    differ = 0
    for group in _groups(40, size, seed=10 + size):
        ours = vote_rewards(group, size, "semantic-vote", grader.equivalent, clustering)
        assert ours == pytest.approx(_empo_reference([a or "" for a in group], same)), group
        shares = [0.0 if a is None else sum(same(a, b) or a == b for b in group) / size for a in group]
        differ += ours != pytest.approx(shares)
    assert differ > 0


def test_semantic_vote_by_hand(grader):
    eq = grader.equivalent
    answers = ["4", "5", "4", None, "7", "8", None, None, None]
    # group 2 ("7", "8", '') is all distinct: every rollout 0; group 3: all ''
    assert vote_rewards(answers, 3, "semantic-vote", eq) == pytest.approx([2 / 3, 1 / 3, 2 / 3, 0, 0, 0, 0, 0, 0])
    # clusters by math equivalence (the default) or by string
    group = ["1/2", "0.5", "\\frac{1}{2}", "2"]
    assert vote_rewards(group, 4, "semantic-vote", eq) == [0.75, 0.75, 0.75, 0.25]
    assert vote_rewards(group, 4, "semantic-vote", eq, "string") == [0.0] * 4  # four strings: all distinct
    assert vote_rewards(["5", "5", "5.0", None, None], 5, "semantic-vote", eq, "string") == [0.4, 0.4, 0.2, 0, 0]


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


def test_semantic_vote_reads_boxed_answers_only():
    """EMPO's math-verify parse needs an anchor (a box): "the answer is 7" is no answer for semantic-vote."""
    reward = VoteReward("semantic-vote", k=4)
    completions = ["the answer is 7", "\\boxed{7}", "so \\boxed{7}", "\\boxed{2}"]
    assert reward(prompts=[""] * 4, completions=completions) == pytest.approx([0, 0.5, 0.5, 0.25])


def _direct_rl_trainer(model_dir, out, **overrides):
    from zerosiam_llm.testing import direct_trainer

    return direct_trainer(model_dir, out, **{"num_rollouts": 2, "per_device_train_batch_size": 4, **overrides})


def _rollouts(trainer):
    g = torch.Generator().manual_seed(7)
    vocab = trainer.processing_class.vocab_size
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (5, 3, 4)]
    completions = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (4, 6, 2)]
    return prompts, completions


def _full_logits(trainer, prompts, completions):
    """Per rollout, the policy's full logits at every position of prompt + completion (no padding)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    with torch.no_grad():
        return [model(input_ids=torch.tensor([p + c])).logits[0].double()
                for p, c in zip(prompts, completions, strict=True)]  # fmt: skip


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_entropy_reward_is_rents(temperature, tiny_model_dir, tmp_path):
    """RENT (satrams/rent-rl @ 5d4d38a7ea91fc23636f10d63084fe4f910423b5): ``verl/workers/actor/dp_actor.py`` L118
    divides the logits by the rollout temperature, ``torch_functional.py`` L110-114 takes the entropy, and
    ``ray_trainer.py`` L1031-1044 rewards minus its mean over the response tokens, or minus ``entropy_base`` (7.0)
    when no ``\\boxed`` / ``\\fbox`` answer is found (``base_format``, its ``format`` experiment)."""
    trainer = _direct_rl_trainer(tiny_model_dir, tmp_path, method="entropy-reward", temperature=temperature)
    prompts, completions = _rollouts(trainer)
    trainer._rollout_ids, trainer._scores = (prompts, completions), {}
    texts = ["so \\boxed{3}", "no answer here", "\\fbox{2}"]
    got = trainer._logit_rewards(texts)
    want = []
    for logits, p, c, text in zip(_full_logits(trainer, prompts, completions), prompts, completions, texts,
                                  strict=True):
        z = logits[len(p) - 1 : len(p) - 1 + len(c)] / temperature  # the distributions that chose each token
        entropy = (torch.logsumexp(z, -1) - (z.softmax(-1) * z).sum(-1)).mean()
        want.append(-7.0 if "boxed" not in text and "fbox" not in text else -entropy.item())
    assert got.tolist() == pytest.approx(want, rel=1e-5)
    if temperature != 1.0:  # the wrong variant: the loss temperature (1.0) instead of the rollout's
        trainer._scores = {}
        trainer.args.reward_temperature = 1.0
        assert trainer._logit_rewards(texts)[0].item() != pytest.approx(want[0], rel=1e-3)
    trainer.args.no_answer_reward, trainer._scores = None, {}  # no format rule: the entropy for every one
    assert trainer._logit_rewards(texts)[1].item() > -7.0


@pytest.mark.parametrize("positions", ["shifted", "aligned"])
def test_self_certainty_is_intuitors(positions, tiny_model_dir, tmp_path):
    """Intuitor's TRL code (sunblaze-ucb/Intuitor @ 3f0cdd7b8b5e2377d5388806edc45ba5b8b7e12e,
    ``open-r1-intuitor/src/open_r1/intuitor_trainer.py`` L850-855): raw logits (no temperature), ``logits[:,
    -logits_to_keep:]`` (the logits at each completion token's own position), ``logsumexp - mean`` averaged over the
    completion mask (L882-887); here minus ln V, so the value is KL(U || p) (a constant that GRPO's group
    normalisation removes). ``aligned``: the distribution that generated each token, as Intuitor's verl code."""
    trainer = _direct_rl_trainer(tiny_model_dir, tmp_path, method="self-certainty", temperature=0.8,
                                 self_certainty_positions=positions)  # fmt: skip
    prompts, completions = _rollouts(trainer)
    trainer._rollout_ids, trainer._scores = (prompts, completions), {}
    got = trainer._logit_rewards(["", "", ""])
    want, other = [], []
    for logits, p, c in zip(_full_logits(trainer, prompts, completions), prompts, completions, strict=True):
        vocab = logits.shape[-1]
        for rows, out in ((slice(len(p), len(p) + len(c)), want), (slice(len(p) - 1, len(p) - 1 + len(c)), other)):
            z = logits[rows]
            out.append((torch.logsumexp(z, -1) - z.mean(-1)).mean().item() - math.log(vocab))
    if positions == "aligned":
        want, other = other, want
    assert got.tolist() == pytest.approx(want, rel=1e-5)
    assert got.tolist() != pytest.approx(other, rel=1e-4)  # the other alignment is a different reward
    # the wrong variant: logits / the rollout temperature
    trainer._scores, trainer.args.reward_temperature = {}, 0.8
    assert trainer._logit_rewards(["", "", ""]).tolist() != pytest.approx(want, rel=1e-4)


def test_vote_over_more_rollouts_than_trained(tiny_model_dir, tmp_path):
    """TTRL's m votes / k trained (``ray_trainer.py`` L874-883, ``_select_top_k_per_prompt``: the first k of each
    group): the vote-only rollouts get a NaN reward (out of GRPO's baseline, advantage 0) and leave the batch."""
    trainer = _direct_rl_trainer(tiny_model_dir, tmp_path, method="majority-vote", num_vote_rollouts=4,
                                 per_device_train_batch_size=8)  # fmt: skip
    assert (trainer.args.num_generations, trainer.args.rollouts_per_prompt, trainer.args.num_rollouts) == (4, 4, 2)
    rows = 8
    output = {"prompt_ids": torch.arange(rows)[:, None].repeat(1, 3), "completion_mask": torch.ones(rows, 5),
              "advantages": torch.arange(rows, dtype=torch.float32), "num_items_in_batch": torch.tensor(40.0)}
    kept = trainer._drop_vote_only_rollouts(output, rows)
    assert kept["prompt_ids"][:, 0].tolist() == [0, 1, 4, 5] and kept["advantages"].tolist() == [0, 1, 4, 5]
    assert float(kept["num_items_in_batch"]) == 20.0
    from zerosiam_llm.errors import UserInputError
    from zerosiam_llm.parser import build_config

    with pytest.raises(UserInputError, match="num_vote_rollouts .1. must be >= num_rollouts .2."):
        build_config("smollm2-135m-cpu", {"method": "majority-vote", "num_rollouts": 2, "num_vote_rollouts": 1})
    with pytest.raises(UserInputError, match="num_vote_rollouts is read by method .* only, not by entropy-reward"):
        build_config("smollm2-135m-cpu", {"method": "entropy-reward", "num_rollouts": 2, "num_vote_rollouts": 4})


def _rl_args(model_dir, out, method, *extra):
    return ["--recipe", "smollm2-135m-cpu", "--model", str(model_dir), "--output_dir", str(out), "--method", method,
            "--num_rollouts", "4", "--per_device_train_batch_size", "8", "--max_steps", "2", "--save_steps", "2",
            "--max_completion_length", "12", "--num_problems", "16", "--disable_tqdm", "true",
            *map(str, extra)]  # fmt: skip


OPTION_CASES = [
    ("majority-vote", ()),
    ("majority-vote", ("--vote_clustering", "equivalence", "--num_vote_rollouts", 8)),
    ("semantic-vote", ()),
    ("semantic-vote", ("--vote_clustering", "string")),
    ("entropy-reward", ()),
    ("entropy-reward", ("--no_answer_reward", "null", "--reward_temperature", 0.9)),
    ("self-certainty", ()),
    ("self-certainty", ("--self_certainty_positions", "aligned")),
]


@pytest.mark.parametrize(("method", "options"), OPTION_CASES)
def test_rl_method_offline_records_rewards_and_gold_changes_nothing(method, options, tiny_model_dir, tmp_path,
                                                                     grader):  # fmt: skip
    """Offline GRPO with each reward and option: samples.jsonl holds each rollout's reward (the vote rewards
    recomputed from the recorded completions), the collapse monitors are logged, and the same run without the gold
    column ends in the same adapter bit for bit."""
    from safetensors.torch import load_file

    from zerosiam_llm.cli import train_main
    from zerosiam_llm.files import read_jsonl

    gold, plain = tmp_path / "gold", tmp_path / "plain"
    assert train_main(_rl_args(tiny_model_dir, gold, method, "--answer_field", "answer", *options)) == 0
    assert train_main(_rl_args(tiny_model_dir, plain, method, "--answer_field", "null", *options)) == 0
    rows = read_jsonl(gold / "samples.jsonl")
    assert len(rows) == 16 and all(isinstance(r["reward"], float) for r in rows)
    if method in ("majority-vote", "semantic-vote"):
        m = 8 if "--num_vote_rollouts" in options else 4
        clustering = options[1] if "--vote_clustering" in options else None
        reward = VoteReward(method, m, grader.equivalent, clustering)
        assert [r["reward"] for r in rows] == pytest.approx(reward([""] * 16, [r["completion"] for r in rows]))
    if method == "entropy-reward" and not options:  # the tiny model never writes a box: RENT's -7 for all
        assert {r["reward"] for r in rows} == {-7.0}
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
    """majority-vote, 4 steps straight == 2 steps, SIGKILL, resume: the same rollouts, rewards and losses. The kill
    lands right after checkpoint-2 is written, whatever the load (the file-polling kill it replaces could land while
    HF was writing trainer_state.json, and the resume then read a torn file)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from zerosiam_llm.files import read_jsonl
    from zerosiam_llm.testing import run_killed_after_checkpoint

    train = Path(__file__).resolve().parents[1] / "train.py"

    def args(out):
        extra = ["--max_steps", 4, "--max_completion_length", 40, "--monitor_every", 1000]
        return _rl_args(tiny_model_dir, out, "majority-vote", *extra)

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    subprocess.run([sys.executable, str(train), *args(straight)], check=True, env=env, capture_output=True)
    run_killed_after_checkpoint(args(resumed), env, step=2)
    assert not (resumed / "summary.json").exists() and not (resumed / "checkpoint-3").exists()
    subprocess.run([sys.executable, str(train), *args(resumed)], check=True, env=env, capture_output=True)

    def record(out):
        return [(s["step"], s["id"], s["completion"], s["reward"]) for s in read_jsonl(out / "samples.jsonl")]

    assert record(straight) == record(resumed) and {r[0] for r in record(resumed)} == {1, 2, 3, 4}
    losses = [[m["loss"] for m in read_jsonl(out / "metrics.jsonl") if "loss" in m] for out in (straight, resumed)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-9)
