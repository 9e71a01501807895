"""The online protocol: predict each stream batch with the current model, record it, then adapt."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from zerosiam_llm.cli import train_main
from zerosiam_llm.compare import comparison_table
from zerosiam_llm.data import generate_arithmetic_problems
from zerosiam_llm.errors import UserInputError
from zerosiam_llm.files import read_jsonl
from zerosiam_llm.modeling import load_tokenizer, resolve_model
from zerosiam_llm.online import run_streams, stream_accuracy
from zerosiam_llm.parser import build_config
from zerosiam_llm.testing import kill_when

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"


def online_args(model_dir, out, *extra):
    return [
        "--recipe", "smollm2-135m-online-cpu", "--model", str(model_dir), "--output_dir", str(out),
        "--max_completion_length", "10", "--num_problems", "12", "--stream_batch_size", "4", *map(str, extra),
    ]  # fmt: skip


def predictions(out, stream="arithmetic"):
    return read_jsonl(Path(out) / stream / "predictions.jsonl")


def run(argv):
    return train_main(argv)


def test_predictions_precede_updates(tiny_model_dir, tmp_path):
    """lr = 0: tent and zerosiam predict exactly what none predicts; lr > 0: the first batch still does."""
    runs = {}
    for name, extra in {
        "none": ["--method", "none"],
        "tent0": ["--method", "tent", "--learning_rate", 0],
        "zs0": ["--method", "zerosiam", "--learning_rate", 0],
        "zs_hot": ["--method", "zerosiam", "--learning_rate", 5e-2],
        "tent_hot": ["--method", "tent", "--learning_rate", 5e-2],
    }.items():
        assert run(online_args(tiny_model_dir, tmp_path / name, *extra)) == 0
        runs[name] = predictions(tmp_path / name)
    none = runs["none"]
    assert len(none) == 12 and len({p["id"] for p in none}) == 12
    assert [p["step"] for p in none] == [1] * 4 + [2] * 4 + [3] * 4
    for name in ("tent0", "zs0"):
        assert [p["completion"] for p in runs[name]] == [p["completion"] for p in none]
    for name in ("zs_hot", "tent_hot"):
        assert [p["completion"] for p in runs[name][:4]] == [p["completion"] for p in none[:4]]
        assert [p["id"] for p in runs[name]] == [p["id"] for p in none]  # same stream order
    # the hot runs really adapted: later predictions moved for at least one method
    assert any(
        [p["completion"] for p in runs[name][4:]] != [p["completion"] for p in none[4:]]
        for name in ("zs_hot", "tent_hot")
    )
    summary = json.loads((tmp_path / "none" / "summary.json").read_text())
    assert summary["streams"]["arithmetic"]["problems"] == 12


def test_reset_between_streams_restores_the_base_model(tiny_model_dir, tmp_path):
    """Stream B after an adapted stream A predicts exactly what a fresh run on B alone predicts."""
    source = resolve_model(str(tiny_model_dir))
    tokenizer = load_tokenizer(source)
    stream_a = generate_arithmetic_problems(8, seed=1)
    stream_b = generate_arithmetic_problems(8, seed=2)
    overrides = {"model": str(tiny_model_dir), "max_completion_length": "10", "stream_batch_size": "4",
                 "learning_rate": "0.05"}  # fmt: skip
    both = build_config("smollm2-135m-online-cpu", {**overrides, "output_dir": str(tmp_path / "both")}, RECIPES)
    run_streams(both, [("a", stream_a), ("b", stream_b)], source, tokenizer)
    alone = build_config("smollm2-135m-online-cpu", {**overrides, "output_dir": str(tmp_path / "alone")}, RECIPES)
    run_streams(alone, [("b", stream_b)], source, tokenizer)
    after_a = predictions(tmp_path / "both", "b")
    fresh = predictions(tmp_path / "alone", "b")
    assert [p["completion"] for p in after_a] == [p["completion"] for p in fresh]
    assert [p["id"] for p in after_a] == [p["id"] for p in fresh]


def _cmd(model_dir, out):
    return [sys.executable, str(REPO / "train.py"), *online_args(model_dir, out, "--num_problems", 24,
            "--max_completion_length", 40, "--stream_batch_size", 4)]  # fmt: skip


@pytest.mark.parametrize(("k", "steps"), [(1, 1), (2, 2)])
def test_every_problem_is_scored_last_batch_included(k, steps, tiny_model_dir, tmp_path):
    """10 problems in batches of 4: 10 predictions and 3 batches (the last of 2), each trained on steps_per_batch
    times; `problems` in the summary is the stream's length."""
    out = tmp_path / f"k{k}-s{steps}"
    assert run(online_args(tiny_model_dir, out, "--num_problems", 10, "--num_rollouts", k, "--steps_per_batch", steps,
                           "--temperature", 1.0 if k > 1 else 0)) == 0  # fmt: skip
    recorded = predictions(out)
    assert len(recorded) == 10 and len({p["id"] for p in recorded}) == 10
    assert [p["step"] for p in recorded] == [1] * 4 + [1 + steps] * 4 + [1 + 2 * steps] * 2
    updates = [m["step"] for m in read_jsonl(out / "arithmetic" / "metrics.jsonl") if "loss" in m]
    assert updates == list(range(1, 3 * steps + 1))
    assert json.loads((out / "arithmetic" / "stream_summary.json").read_text())["problems"] == 10


def test_two_processes_score_every_problem_once_like_one(tiny_model_dir, tmp_path):
    """accelerate launch with 2 CPU processes (gloo): each stream batch of 3 is split 2 + 2 (one problem repeated as
    padding, the last batch of 1 too), every problem is recorded exactly once, at the same step and with the same
    prompt and answer as the one-process run at lr 0."""
    common = ["--num_problems", 10, "--stream_batch_size", 3, "--learning_rate", 0, "--answer_field", "answer",
              "--disable_tqdm", "true"]  # fmt: skip
    single, double = tmp_path / "one", tmp_path / "two"
    assert run(online_args(tiny_model_dir, single, *common)) == 0
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--main_process_port", "0", str(REPO / "train.py")]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launch, *online_args(tiny_model_dir, double, *common, "--use_cpu", "true")], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("predictions: ") == 1  # only the main process reports

    def record(out):
        return [(p["id"], p["step"], p["prompt"], p["completion"], p["correct"]) for p in predictions(out)]

    assert len(record(double)) == 10 and len({r[0] for r in record(double)}) == 10
    assert record(double) == record(single)
    assert [r[1] for r in record(double)] == [1] * 3 + [2] * 3 + [3] * 3 + [4]
    one, two = (json.loads((out / "arithmetic" / "stream_summary.json").read_text()) for out in (single, double))
    assert (two["problems"], two["graded"], two["accuracy"]) == (one["problems"], one["graded"], one["accuracy"])
    assert [m["step"] for m in read_jsonl(double / "arithmetic" / "metrics.jsonl") if "loss" in m] == [1, 2, 3, 4]


def test_stream_batches_split_across_processes():
    from zerosiam_llm.trainers.base import StreamBatchSampler

    def batches(process, processes, k=1, repeats=1):
        return list(StreamBatchSampler(7, 4, k, repeats, process, processes))

    assert batches(0, 1) == [[0, 1, 2, 3], [4, 5, 6]]
    assert batches(0, 2) == [[0, 1], [4, 5]] and batches(1, 2) == [[2, 3], [6, 4]]  # 3 problems: 4 is repeated
    assert batches(2, 3) == [[0, 1], [6]]  # 4 problems over 3 processes: 2 each (0, 1 repeated); then 3: 1 each
    assert batches(1, 2, k=2, repeats=2) == [[2, 2, 3, 3]] * 2 + [[6, 6, 4, 4]] * 2
    assert len(StreamBatchSampler(7, 4, 1, 2, 0, 2)) == 4


def test_killed_stream_resumes_at_first_unscored_batch(tiny_model_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_cmd(tiny_model_dir, straight), check=True, env=env, capture_output=True)
    # two batches scored, four more to come
    kill_when(_cmd(tiny_model_dir, killed), env, lambda: len(predictions(killed)) >= 8, what="the stream")
    partial = len(predictions(killed))
    assert 8 <= partial < 24
    subprocess.run(_cmd(tiny_model_dir, killed), check=True, env=env, capture_output=True)
    got = predictions(killed)
    assert sorted(p["id"] for p in got) == sorted({p["id"] for p in got}) and len(got) == 24
    want = {p["id"]: p["completion"] for p in predictions(straight)}
    assert {p["id"]: p["completion"] for p in got} == want


def test_compare_methods_writes_the_table(tiny_model_dir, tmp_path, capsys):
    """The paper's five methods on one stream: one row each, every problem scored by each."""
    out = tmp_path / "cmp"
    methods = ["none", "tent", "come", "sar", "zerosiam"]
    assert run(online_args(tiny_model_dir, out, "--compare_methods", ",".join(methods), "--num_problems", 6,
                           "--answer_field", "answer")) == 0  # fmt: skip
    table = (out / "comparison.md").read_text()
    for method in methods:
        assert f"| {method} | 0.0 (0/6) [0.0, 39.0] |" in table
    data = json.loads((out / "comparison.json").read_text())
    assert list(data["results"]) == methods
    assert all(data["results"][m]["arithmetic"]["problems"] == 6 for m in methods)


def test_accuracy_unavailable_without_gold_and_table_shape():
    assert stream_accuracy([{"id": "1", "correct": None}])["accuracy"] is None
    acc = stream_accuracy([{"correct": True}, {"correct": False}, {"correct": True}, {"correct": True}])
    assert acc["accuracy"] == 0.75 and acc["ci95"][0] < 0.75 < acc["ci95"][1]
    table = comparison_table({"none": {"math500": acc}, "zerosiam": {"math500": {"problems": 3, "accuracy": None}}},
                             "t")  # fmt: skip
    assert "| none | 75.0 (3/4)" in table and "n/a (3 problems, no gold)" in table


def test_bad_online_input(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(UserInputError, match="stream_batch_size must be >= 1"):
        build_config("smollm2-135m-online-cpu", {"stream_batch_size": "0"}, RECIPES)
    with pytest.raises(UserInputError, match="method: none .* only with protocol: online"):
        build_config("smollm2-135m-cpu", {"method": "none"}, RECIPES)
    with pytest.raises(UserInputError, match="max_steps must be -1 with protocol: online"):
        build_config("smollm2-135m-cpu", {"protocol": "online"}, RECIPES)  # that recipe sets max_steps: 12
    with pytest.raises(UserInputError, match="compare_methods: 'em' is not allowed"):
        build_config("smollm2-135m-online-cpu", {"compare_methods": "none,em"}, RECIPES)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code = run(online_args(tiny_model_dir, tmp_path / "o", "--dataset", empty))
    assert code == 2 and "is empty" in capsys.readouterr().err


def test_benchmark_streams_from_local_files(tiny_model_dir, tmp_path, shared_data):
    out = tmp_path / "bench"
    argv = online_args(tiny_model_dir, out, "--benchmarks", "aime24,math500", "--data_dir", shared_data,
                       "--num_problems", 4, "--stream_batch_size", 2, "--max_completion_length", 6)  # fmt: skip
    assert run(argv) == 0
    for stream in ("aime24", "math500"):
        rows = predictions(out, stream)
        assert len(rows) == 4 and all(r["gold"] and r["correct"] is not None for r in rows)
        assert all(r["benchmark"] == stream for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["streams"]) == {"aime24", "math500"}


def test_pool_comparisons_counts_runs_together(tmp_path, capsys):
    from zerosiam_llm.compare import pool_main

    def cell(correct, graded):
        return {"problems": graded, "graded": graded, "correct": correct, "accuracy": correct / graded}

    for seed, counts in ((0, (1, 3)), (1, (2, 5))):
        folder = tmp_path / f"seed{seed}"
        folder.mkdir()
        results = {"none": {"gsm8k": cell(counts[0], 64)}, "tent": {"gsm8k": cell(counts[1], 64)}}
        (folder / "comparison.json").write_text(json.dumps({"model": "m", "results": results}))
    assert pool_main([str(tmp_path / "pooled"), str(tmp_path / "seed0"), str(tmp_path / "seed1")]) == 0
    pooled = json.loads((tmp_path / "pooled" / "comparison.json").read_text())["results"]
    assert (pooled["none"]["gsm8k"]["correct"], pooled["none"]["gsm8k"]["graded"]) == (3, 128)
    assert pooled["tent"]["gsm8k"]["accuracy"] == 8 / 128 and len(pooled["tent"]["gsm8k"]["ci95"]) == 2
    assert "| tent | 6.2 (8/128) [" in (tmp_path / "pooled" / "comparison.md").read_text()
    with pytest.raises(UserInputError, match="does not exist"):
        pool_main([str(tmp_path / "p2"), str(tmp_path / "missing")])


def test_compare_entropy_and_rl_methods_in_one_command(tiny_model_dir, tmp_path):
    """compare_overrides gives the RL methods their sampled rollouts while the others stay greedy."""
    out = tmp_path / "mixed"
    overrides = '{"rl": {"temperature": 1.0, "num_rollouts": 2}}'
    assert run(online_args(tiny_model_dir, out, "--compare_methods", "none,majority-vote", "--num_problems", 4,
                           "--answer_field", "answer", "--compare_overrides", overrides)) == 0  # fmt: skip
    data = json.loads((out / "comparison.json").read_text())
    assert list(data["results"]) == ["none", "majority-vote"]
    greedy, sampled = predictions(out / "none"), predictions(out / "majority-vote")
    assert "answers" not in greedy[0] and len(sampled[0]["answers"]) == 2 and len(sampled[0]["rewards"]) == 2
    with pytest.raises(UserInputError, match="compare_overrides: 'rll' is not a method"):
        build_config("smollm2-135m-online-cpu", {"compare_methods": "none", "compare_overrides": '{"rll": {}}'})
