"""Tests for zerosiam_llm.evaluation and evals/: benchmark definitions, outputs, metrics, resume, compare, bad input.

Most tests drive the evaluation in-process with a scripted generator (exact, known completions) over small JSONL
files written here; the tiny random model covers the real HF path, the embedded SmolLM2 the must-show command.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zerosiam_llm.errors import UserInputError
from zerosiam_llm.evaluation import (
    compare_runs,
    grade_records,
    load_benchmark_problems,
    load_benchmarks,
    main,
    parse_args,
    read_results,
    run_evaluation,
    select_benchmarks,
)
from zerosiam_llm.evaluation.generation import Completion, Generator
from zerosiam_llm.grading import Grader, bootstrap_ci, pass_at_k
from zerosiam_llm.modeling import load_tokenizer
from zerosiam_llm.prompts import build_messages, render_prompt

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS_FILE = REPO / "evals" / "benchmarks.yaml"
RECORD_KEYS = {
    "benchmark", "problem_id", "sample", "fingerprint", "prompt", "completion", "completion_tokens", "truncated",
    "extracted", "extraction_source", "gold", "correct",
}  # fmt: skip


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def gsm8k_rows(count: int) -> list[dict]:
    return [{"question": f"Tom has {i} apples and buys {i} more. How many apples?", "answer": f"{i}+{i}\n#### {2 * i}"}
            for i in range(1, count + 1)]  # fmt: skip


class ScriptedGenerator(Generator):
    """Completions from ``script(prompt, sample index)``; records the prompts it was asked for."""

    def __init__(self, tokenizer, script):
        self.tokenizer = tokenizer
        self.script = script
        self.prompts: list[str] = []

    def _generate(self, prompts, sampling):
        for i, prompt in enumerate(prompts):
            self.prompts.append(prompt)
            yield i, [self.script(prompt, s) for s in range(sampling.n)]


def scripted(script):
    made: list[ScriptedGenerator] = []

    def factory(args, tokenizer):
        made.append(ScriptedGenerator(tokenizer, script))
        return made[-1]

    factory.made = made
    return factory


def never(args, tokenizer):
    raise AssertionError("no generation expected")


def answer_gold(prompt: str, sample: int) -> Completion:
    """Correct for every problem: 'Tom has i apples and buys i more' -> \\boxed{2i}."""
    i = int(prompt.split("Tom has ")[1].split(" ")[0])
    return Completion(f"So he has \\boxed{{{2 * i}}} apples.", 9, False)


def run(tmp_path, data, out, *extra, factory=None):
    args = parse_args(["--model", str(run.model), "--benchmarks", "gsm8k", "--data_file", f"gsm8k={data}",
                       "--output_dir", str(out), "--no_progress", "--grader_workers", "1", *extra])  # fmt: skip
    return run_evaluation(args, BENCHMARKS_FILE, generator_factory=factory)


@pytest.fixture(autouse=True)
def _model_for_run(tiny_model_dir):
    run.model = tiny_model_dir


def cli(argv, capsys):
    code = main([str(a) for a in argv], benchmarks_file=BENCHMARKS_FILE)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------------------------------------------------
# Benchmark definitions and data
# ---------------------------------------------------------------------------------------------------------------


def test_benchmark_definitions_read_every_shared_file(shared_data):
    benchmarks = load_benchmarks(BENCHMARKS_FILE)
    assert list(benchmarks) == ["math500", "aime24", "aime25", "amc23", "gsm8k", "collegemath", "minerva"]
    sizes = {"math500": 500, "aime24": 30, "aime25": 30, "amc23": 40, "gsm8k": 1319}
    for name, bench in benchmarks.items():
        if name not in sizes:  # the paper's CollegeMath and Minerva: Hub only here (see the next test)
            continue
        problems, source = load_benchmark_problems(bench, data_dir=str(shared_data))
        assert len(problems) == sizes[name] and source.endswith(bench.local_file)
        assert len({p["id"] for p in problems}) == len(problems) and all(p["answer"] for p in problems)
        sampled = name in ("aime24", "aime25", "amc23")
        assert (bench.n, bench.temperature, bench.top_p) == ((16, 0.6, 0.95) if sampled else (1, 0.0, 1.0))
    problems, _ = load_benchmark_problems(benchmarks["amc23"], data_dir=str(shared_data))
    assert problems[0]["answer"] == "27"  # float 27.0 in the file
    problems, _ = load_benchmark_problems(benchmarks["math500"], data_dir=str(shared_data))
    assert (
        problems[0]["id"] == "test/precalculus/807.json"
        and problems[0]["answer"] == r"\left( 3, \frac{\pi}{2} \right)"
    )


def test_known_equivalences_through_extraction_and_grader():
    """Equivalences not covered in test_grading, end to end: completion -> extracted answer -> grade."""
    cases = [  # (gold, completion, correct)
        ("50", r"The rate is $\boxed{50\%}$.", True),  # percent
        ("0.5", r"That is $\boxed{50\%}$.", True),
        ("30", r"The angle is $\boxed{30^\circ}$.", True),  # degrees
        ("12", r"The side is $\boxed{12\text{ cm}}$.", True),  # units in \text{}
        ("12", r"\boxed{12 \text{ inches}}", True),
        ("5", r"Solving, $\boxed{x = 5}$.", True),  # x = 5 vs 5
        ("1234", r"She pays \boxed{1,234} dollars.", True),  # comma in a number (GSM8K gold has no comma)
        (r"(-\infty, 3]", r"\boxed{(-\infty,3]}", True),  # intervals
        (r"(-\infty,-2)\cup(3,\infty)", r"\boxed{(3,\infty)\cup(-\infty,-2)}", True),
        ("[2,5)", r"\boxed{(2, 5)}", False),  # open vs half-open is a different interval
        ("5", "", False),  # empty completion: wrong, not a crash
        ("5", "I do not know.", False),
    ]
    for fast_path in (True, False):
        records = [{"gold": g, "completion": c} for g, c, _ in cases]
        with Grader(num_workers=1, timeout_s=10.0, fast_path=fast_path) as grader:
            assert grade_records(records, grader) == len(cases)
            assert grade_records(records, grader) == 0  # already graded
        assert [r["correct"] for r in records] == [ok for _, _, ok in cases], fast_path
    assert records[-2]["extracted"] is None and records[-2]["extraction_source"] == "none"


# ---------------------------------------------------------------------------------------------------------------
# Outputs and metrics
# ---------------------------------------------------------------------------------------------------------------

SCRIPT = {  # problem i -> its 4 samples (gold is 2i)
    1: [r"\boxed{2}", "The answer is 2.", r"\boxed{3}", ""],
    2: [r"\boxed{5}", r"\boxed{8/2}", r"\boxed{4.0}", r"\boxed{\frac{16}{4}}"],  # majority only by equivalence
    3: ["no idea"] * 4,
}


SAMPLED = ("--n", "4", "--temperature", "0.6", "--top_p", "0.95", "--max_new_tokens", "16")


def sample_script(prompt, sample):
    i = int(prompt.split("Tom has ")[1].split(" ")[0])
    return Completion(SCRIPT[i][sample], 16 if i == 3 else 10, i == 3)


def test_outputs_fields_and_metrics(tmp_path):
    data = write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_rows(3))
    out = tmp_path / "run"
    factory = scripted(sample_script)
    summary = run(tmp_path, data, out, *SAMPLED, factory=factory)
    assert sorted(p.name for p in out.iterdir()) == ["gsm8k.jsonl", "run_config.json", "summary.json", "summary.md"]

    records = read_results(out / "gsm8k.jsonl")
    assert [(r["problem_id"], r["sample"]) for r in records] == [(str(i), s) for i in range(3) for s in range(4)]
    assert all(set(r) == RECORD_KEYS for r in records)
    tokenizer = load_tokenizer(str(run.model))
    question = gsm8k_rows(1)[0]["question"]
    assert records[0]["prompt"] == render_prompt(tokenizer, build_messages(question))  # verbatim rendered prompt
    assert records[0]["gold"] == "2" and len({r["fingerprint"] for r in records}) == 1
    assert [r["correct"] for r in records] == [True, True, False, False, False, True, True, True] + [False] * 4
    empty = records[3]
    assert empty["completion"] == "" and empty["extracted"] is None and empty["correct"] is False

    m = summary["benchmarks"]["gsm8k"]
    avg = [0.5, 0.75, 0.0]
    assert m["n_problems"] == 3 and m["n_samples"] == 4 and m["headline"] == "avg@4"
    assert math.isclose(m["accuracy"], 1 / 3) and math.isclose(m["avg@4"], sum(avg) / 3)
    assert math.isclose(m["score"], sum(avg) / 3) and m["ci95"] == list(bootstrap_ci(avg, seed=0))
    assert math.isclose(m["pass@k"]["2"], (pass_at_k(4, 2, 2) + pass_at_k(4, 3, 2) + 0) / 3)
    assert math.isclose(m["pass@k"]["4"], 2 / 3) and list(m["pass@k"]) == ["1", "2", "4"]
    assert math.isclose(m["maj@4"], 2 / 3)  # problem 2: {8/2, 4.0, 16/4} outvote "5" only as one cluster
    assert math.isclose(m["extraction_failure_rate"], 5 / 12) and math.isclose(m["truncation_rate"], 4 / 12)
    assert math.isclose(m["mean_completion_tokens"], (8 * 10 + 4 * 16) / 12)
    assert m["protocol"]["temperature"] == 0.6 and m["protocol"]["max_new_tokens"] == 16
    assert summary["grader"]["name"] == "math-verify" and summary["this_invocation"]["generated"] == {"gsm8k": 12}
    md = (out / "summary.md").read_text()
    assert "| GSM8K | 3 / 3 | T=0.6, top_p=0.95, n=4, max_new_tokens=16 | avg@4 41.7 |" in md
    assert json.loads((out / "summary.json").read_text())["benchmarks"] == summary["benchmarks"]

    # The same command again: nothing generated (the model is never loaded), same files, same metrics.
    before = (out / "gsm8k.jsonl").read_bytes()
    again = run(tmp_path, data, out, *SAMPLED, factory=never)
    assert (out / "gsm8k.jsonl").read_bytes() == before
    assert again["benchmarks"] == summary["benchmarks"] and again["this_invocation"]["generated"] == {"gsm8k": 0}

    # Lines without grades (e.g. written by an interrupted run) are graded on the next run, without generation.
    stripped = [
        {k: v for k, v in r.items() if k not in ("correct", "extracted", "extraction_source")} for r in records
    ]
    write_jsonl(out / "gsm8k.jsonl", stripped)
    regraded = run(tmp_path, data, out, *SAMPLED, factory=never)
    assert regraded["this_invocation"]["graded"] == 12 and (out / "gsm8k.jsonl").read_bytes() == before


def test_resume_generates_only_what_is_missing(tmp_path):
    data = write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_rows(4))
    out = tmp_path / "run"
    first = scripted(answer_gold)
    run(tmp_path, data, out, "--limit", "2", factory=first)
    assert len(first.made[0].prompts) == 2
    with open(out / "gsm8k.jsonl", "a", encoding="utf-8") as f:
        f.write('{"benchmark": "gsm8k", "problem_id": "2", "sam')  # a line torn by a kill mid-write
    second = scripted(answer_gold)
    summary = run(tmp_path, data, out, "--limit", "4", factory=second)
    assert len(second.made[0].prompts) == 2  # problems 2 and 3 only
    keys = [(r["problem_id"], r["sample"]) for r in read_results(out / "gsm8k.jsonl")]
    assert keys == [(str(i), 0) for i in range(4)]  # each once, torn line gone, data set order
    assert summary["benchmarks"]["gsm8k"]["accuracy"] == 1.0 and summary["benchmarks"]["gsm8k"]["n_problems"] == 4


def test_other_settings_in_the_same_output_dir_are_refused(tmp_path, capsys):
    data = write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_rows(2))
    out = tmp_path / "run"
    run(tmp_path, data, out, "--max_new_tokens", "16", factory=scripted(answer_gold))
    before = (out / "gsm8k.jsonl").read_bytes()
    code, _, err = cli(["--model", run.model, "--benchmarks", "gsm8k", "--data_file", f"gsm8k={data}",
                        "--max_new_tokens", "32", "--output_dir", out], capsys)  # fmt: skip
    assert code == 2 and "differs in gsm8k.max_new_tokens" in err and "--overwrite" in err
    assert (out / "gsm8k.jsonl").read_bytes() == before
    code, _, err = cli(["--model", run.model, "--benchmarks", "gsm8k", "--data_dir", tmp_path / "typo",
                        "--overwrite", "--output_dir", out], capsys)  # fmt: skip
    assert code == 2 and (out / "gsm8k.jsonl").read_bytes() == before  # refused input deletes nothing
    redo = scripted(answer_gold)
    run(tmp_path, data, out, "--max_new_tokens", "32", "--overwrite", factory=redo)
    assert len(redo.made[0].prompts) == 2


def test_compare_runs(tmp_path, capsys):
    data = write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_rows(6))
    base, adapted = tmp_path / "base", tmp_path / "adapted"
    run(tmp_path, data, base, factory=scripted(lambda p, s: Completion(r"\boxed{0}", 5, False)))
    run(tmp_path, data, adapted, factory=scripted(answer_gold))
    result = compare_runs([base, adapted])
    (row,) = result["rows"]
    assert (row["benchmark"], row["metric"], row["shared_problems"]) == ("gsm8k", "accuracy", 6)
    assert (row["score_a"], row["score_b"], row["diff"], row["ci95"]) == (0.0, 1.0, 1.0, [1.0, 1.0])
    code, stdout, _ = cli(["--compare", base, adapted, "--output_dir", tmp_path / "cmp"], capsys)
    assert code == 0 and "| gsm8k | accuracy | 6 | base | 0.0 | adapted | 100.0 | +100.0 |" in stdout
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())["rows"] == result["rows"]
    code, _, err = cli(["--compare", base, tmp_path], capsys)
    assert code == 2 and "is not an evaluation run" in err
    script = subprocess.run([sys.executable, str(REPO / "evals" / "compare.py"), str(base), str(adapted)],
                            capture_output=True, text=True)  # fmt: skip
    assert script.returncode == 0 and "| +100.0 | +100.0 … +100.0 |" in script.stdout


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one `error:` line, exit code 2, nothing written
# ---------------------------------------------------------------------------------------------------------------


def test_paper_benchmarks_collegemath_and_minerva(tmp_path, shared_data, capsys):
    """No local copy ships: without network the error names the Hub id and what to pass instead; a local file with
    the declared fields loads; `all` with --data_dir runs what the folder holds and says what it skipped."""
    benchmarks = load_benchmarks(BENCHMARKS_FILE)
    for name, hub_id in (("collegemath", "realtreetune/college_math"), ("minerva", "math-ai/minervamath")):
        with pytest.raises(UserInputError, match=f"benchmark {name}: cannot load data set '{hub_id}'") as err:
            load_benchmark_problems(benchmarks[name])
        assert f"--data_file {name}=PATH" in str(err.value) and "\n" not in str(err.value)
    local = tmp_path / "minerva_test.jsonl"
    local.write_text('{"question": "What is 2 km in m?", "answer": "2000"}\n{"question": "Half?", "answer": "0.5"}\n')
    problems, _ = load_benchmark_problems(benchmarks["minerva"], data_dir=str(tmp_path))
    assert [(p["id"], p["answer"]) for p in problems] == [("0", "2000"), ("1", "0.5")]
    chosen = select_benchmarks("all", benchmarks, str(shared_data))
    assert [b.name for b in chosen] == ["math500", "aime24", "aime25", "amc23", "gsm8k"]
    note = capsys.readouterr().out
    assert "skipping collegemath (no collegemath_test.jsonl), minerva (no minerva_test.jsonl)" in note
    assert [b.name for b in select_benchmarks("all", benchmarks, str(tmp_path))] == ["minerva"]
    assert len(select_benchmarks("all", benchmarks)) == 7  # no --data_dir: every benchmark, from the Hub
    with pytest.raises(UserInputError, match="holds none of the benchmark files"):
        select_benchmarks("all", benchmarks, str(tmp_path / "empty"))


def test_unknown_benchmark_lists_the_known_ones(tmp_path, capsys):
    code, _, err = cli(["--model", run.model, "--benchmarks", "gsm8k,math5000", "--output_dir", tmp_path / "o"],
                       capsys)  # fmt: skip
    assert code == 2
    assert err.strip() == ("error: unknown benchmark 'math5000'; known benchmarks: math500, aime24, aime25, amc23, "
                           "gsm8k, collegemath, minerva (or all)")  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_missing_data_file_says_where_it_looked(tmp_path, capsys):
    code, _, err = cli(["--model", run.model, "--benchmarks", "gsm8k", "--data_dir", tmp_path / "nodata",
                        "--output_dir", tmp_path / "o"], capsys)  # fmt: skip
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert str(tmp_path / "nodata" / "gsm8k_test.jsonl") in err and "--data_dir" in err and "network" in err
    assert not (tmp_path / "o").exists()
    # No --data_dir and no network (HF_HUB_OFFLINE=1 in tests): the Hub id fails, and the message says what to pass
    code, _, err = cli(["--model", run.model, "--benchmarks", "gsm8k", "--output_dir", tmp_path / "o"], capsys)
    assert code == 2 and "openai/gsm8k" in err and "--data_dir" in err


@pytest.mark.parametrize(
    ("line", "message"),
    [(b"\xff\xfe not utf-8\n", "line 2: not UTF-8"), (b'{"question": "x", "answer": \n', "line 2: not valid JSON")],
)
def test_bad_data_line_is_named_by_line_number(tmp_path, capsys, line, message):
    data = tmp_path / "gsm8k_test.jsonl"
    good = json.dumps(gsm8k_rows(1)[0]).encode() + b"\n"
    data.write_bytes(good + line + good)
    code, _, err = cli(["--model", run.model, "--benchmarks", "gsm8k", "--data_dir", tmp_path,
                        "--output_dir", tmp_path / "o"], capsys)  # fmt: skip
    assert code == 2 and message in err and str(data) in err


def test_damaged_results_line_is_named_by_line_number(tmp_path, capsys):
    data = write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_rows(3))
    out = tmp_path / "run"
    run(tmp_path, data, out, factory=scripted(answer_gold))
    lines = (out / "gsm8k.jsonl").read_text().splitlines(keepends=True)
    (out / "gsm8k.jsonl").write_text(lines[0] + "{oops\n" + lines[2])
    code, _, err = cli(["--model", run.model, "--benchmarks", "gsm8k", "--data_file", f"gsm8k={data}",
                        "--output_dir", out], capsys)  # fmt: skip
    assert code == 2 and "gsm8k.jsonl, line 2: not valid JSON" in err


def test_read_results_torn_multibyte_tail_and_bad_bytes(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": "\xc3\xa9"}\n{"c": "\xc3')  # killed in the middle of a 2-byte character
    assert read_results(path) == [{"a": 1}, {"b": "\u00e9"}]
    path.write_bytes(b'{"a": 1}\n{"b": "\xff"}\n{"c": 2}\n')
    with pytest.raises(UserInputError, match="line 2: not UTF-8"):
        read_results(path)


def test_bad_flags(tmp_path, capsys):
    code, _, err = cli(["--model", run.model, "--bogus"], capsys)
    assert code == 2 and err.startswith("error: unknown field 'bogus' in the command line; see `zerosiam-eval --help`")
    code, _, err = cli(["--model", run.model, "--max_new_token", "8"], capsys)
    assert code == 2 and "did you mean max_new_tokens?" in err
    code, _, err = cli(["--model", run.model, "--data_file", "math5000=x.jsonl", "--output_dir", tmp_path], capsys)
    assert code == 2 and "known benchmarks: math500" in err
    code, _, err = cli(["--model", run.model, "--n", "0", "--benchmarks", "gsm8k", "--output_dir", tmp_path], capsys)
    assert code == 2 and "n must be an integer >= 1, got 0" in err


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--temperature", "nan", "temperature: expected a finite number, got 'nan'"),
        ("--top_p", "inf", "top_p: expected a finite number, got 'inf'"),
        ("--grader_timeout", "inf", "grader_timeout: expected a finite number, got 'inf'"),
        ("--grader_timeout", "0", "grader_timeout must be a number > 0, got 0.0"),
        ("--gpu_memory_utilization", "nan", "gpu_memory_utilization: expected a finite number"),
        ("--max_new_tokens", "0", "max_new_tokens must be an integer >= 1, got 0"),
        ("--batch_size", "-1", "batch_size must be an integer >= 1, got -1"),
    ],
)
def test_non_finite_and_zero_numbers_are_refused_before_anything_is_written(flag, value, message, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = cli(["--model", run.model, "--benchmarks", "gsm8k", flag, value, "--output_dir", out], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# Real generation: the tiny random model in-process, the kill test, and the must-show command on SmolLM2
# ---------------------------------------------------------------------------------------------------------------


def test_tiny_model_end_to_end_in_process(tmp_path, capsys):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: threads only add barrier waits on a busy CPU
    try:
        _tiny_model_end_to_end(tmp_path, capsys)
    finally:
        torch.set_num_threads(threads)


def _tiny_model_end_to_end(tmp_path, capsys):
    data = write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_rows(3))
    out = tmp_path / "run"
    code, stdout, _ = cli(["--model", run.model, "--benchmarks", "gsm8k", "--data_file", f"gsm8k={data}",
                           "--max_new_tokens", "8", "--batch_size", "2", "--dtype", "float32", "--no_progress",
                           "--grader_workers", "1", "--output_dir", out], capsys)  # fmt: skip
    assert code == 0 and "generated 3 new samples" in stdout
    records = read_results(out / "gsm8k.jsonl")
    assert len(records) == 3 and all(r["completion_tokens"] <= 8 and isinstance(r["correct"], bool) for r in records)
    config = json.loads((out / "run_config.json").read_text())
    assert config["generation"] == {"backend": "hf", "dtype": "float32", "device": "cpu", "batch_size": 2}


def _evaluate_cmd(model, data, out):
    return [sys.executable, str(REPO / "evals" / "evaluate.py"), "--model", str(model), "--benchmarks", "gsm8k",
            "--data_file", f"gsm8k={data}", "--max_new_tokens", "32", "--batch_size", "1", "--dtype", "float32",
            "--no_progress", "--grader_workers", "1", "--output_dir", str(out)]  # fmt: skip


def test_kill_during_generation_then_rerun_loses_and_duplicates_nothing(tmp_path, tiny_model_dir):
    """Must-show 5: SIGKILL mid-generation, re-run: every (problem, sample) exactly once, and the same results file
    and metrics as an uninterrupted run (greedy, batch 1: deterministic)."""
    problems = 60
    data = write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_rows(problems))
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # tiny model: threads only add waits
    proc = subprocess.Popen(_evaluate_cmd(tiny_model_dir, data, killed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    results = killed / "gsm8k.jsonl"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if results.is_file() and results.read_bytes().count(b"\n") >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the evaluation finished before it could be killed; raise `problems`"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group this test started
        proc.wait()
    done = results.read_bytes().count(b"\n")
    assert 3 <= done < problems
    with open(results, "a", encoding="utf-8") as f:
        f.write('{"benchmark": "gsm8k", "problem_id": "')  # as if the kill landed mid-write

    for out in (killed, clean):
        finished = subprocess.run(_evaluate_cmd(tiny_model_dir, data, out), env=env, capture_output=True, text=True)
        assert finished.returncode == 0, finished.stderr[-2000:]
    resumed = json.loads((killed / "summary.json").read_text())
    assert resumed["this_invocation"]["generated"] == {"gsm8k": problems - done}
    keys = [(r["problem_id"], r["sample"]) for r in read_results(results)]
    assert sorted(keys) == sorted((str(i), 0) for i in range(problems)) and len(set(keys)) == len(keys)
    assert results.read_bytes() == (clean / "gsm8k.jsonl").read_bytes()
    assert resumed["benchmarks"] == json.loads((clean / "summary.json").read_text())["benchmarks"]


@pytest.mark.slow
def test_must_show_embedded_smollm2_gsm8k_and_no_new_generation_on_rerun(tmp_path, shared_data):
    """Must-show 4: the documented command on the embedded SmolLM2 (CPU), then the same command again."""
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "evals" / "evaluate.py"), "--model", "embedded:smollm2-135m", "--benchmarks",
           "gsm8k", "--data_dir", str(shared_data), "--limit", "8", "--max_new_tokens", "32", "--no_progress",
           "--output_dir", str(out)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["gsm8k.jsonl", "run_config.json", "summary.json", "summary.md"]
    records = read_results(out / "gsm8k.jsonl")
    assert len(records) == 8 and all(set(r) == RECORD_KEYS for r in records)
    assert all(r["prompt"].startswith("<|im_start|>system") and r["prompt"].endswith("<|im_start|>assistant\n")
               for r in records)  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["benchmarks"]["gsm8k"]["n_problems"] == 8 and summary["this_invocation"]["generated"]["gsm8k"] == 8
    assert "| GSM8K | 8 / 1319 | greedy, n=1, max_new_tokens=32 |" in (out / "summary.md").read_text()

    before = (out / "gsm8k.jsonl").read_bytes()
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "8 samples done, 0 to generate" in second.stdout and "generated 0 new samples" in second.stdout
    assert (out / "gsm8k.jsonl").read_bytes() == before
    again = json.loads((out / "summary.json").read_text())
    assert again["benchmarks"] == summary["benchmarks"] and again["this_invocation"]["generated"] == {"gsm8k": 0}


# ---------------------------------------------------------------------------------------------------------------
# Reliability through the real entry point: nothing is written until the model, adapter and folder are usable
# ---------------------------------------------------------------------------------------------------------------


def _evaluate(*argv):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "evals" / "evaluate.py"), *map(str, argv)], capture_output=True,
                          text=True, env=env, timeout=600)  # fmt: skip


def test_a_bad_model_or_adapter_writes_nothing_and_the_corrected_command_runs(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_rows(2))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"\x00" * 64)
    no_type = tmp_path / "no-type"
    no_type.mkdir()
    (no_type / "config.json").write_text("{}")
    bad_adapter = tmp_path / "bad-adapter"
    bad_adapter.mkdir()
    (bad_adapter / "adapter_config.json").write_text("{")
    out = tmp_path / "out"
    common = ["--benchmarks", "gsm8k", "--data_file", f"gsm8k={data}", "--max_new_tokens", 4, "--no_progress",
              "--grader_workers", 1, "--output_dir", out]  # fmt: skip
    cases = [
        (["--model", junk], "is not a GGUF model"),
        (["--model", no_type], "has no model_type"),
        (["--model", "no-such-org/no-such-model"], "tokenizer of no-such-org/no-such-model as a Hub id"),
        (["--model", tiny_model_dir, "--adapter", tmp_path / "missing"], "adapter path"),
        (["--model", tiny_model_dir, "--adapter", bad_adapter], f"cannot load adapter {bad_adapter}"),
        (["--model", tiny_model_dir, "--adapter", "no-such-org/no-such-adapter"], "cannot load adapter no-such-org"),
    ]
    for argv, message in cases:
        proc = _evaluate(*argv, *common)
        assert proc.returncode == 2 and proc.stderr.startswith("error:") and message in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1 and not out.exists(), argv
    fixed = _evaluate("--model", tiny_model_dir, *common)
    assert fixed.returncode == 0 and "generated 2 new samples" in fixed.stdout, fixed.stderr[-2000:]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    overwrite = _evaluate("--model", tiny_model_dir, "--adapter", bad_adapter, "--overwrite", *common)
    assert overwrite.returncode == 2 and {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_evaluation_refuses_a_read_only_output_dir_and_warns_about_remote_code(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_rows(1))
    out = Path("/sys/zerosiam-test-eval") if os.geteuid() == 0 else tmp_path / "locked" / "out"
    if os.geteuid() != 0:
        out.parent.mkdir()
        out.parent.chmod(0o555)
    proc = _evaluate("--model", tiny_model_dir, "--benchmarks", "gsm8k", "--data_file", f"gsm8k={data}",
                     "--output_dir", out, "--trust_remote_code")  # fmt: skip
    assert proc.returncode == 2 and f"error: output_dir {out} is not writable" in proc.stderr, proc.stderr
    assert not out.exists()
    warned = _evaluate("--model", tiny_model_dir, "--benchmarks", "gsm8k", "--data_file", f"gsm8k={data}",
                       "--max_new_tokens", 2, "--no_progress", "--grader_workers", 1, "--output_dir", tmp_path / "ok",
                       "--trust_remote_code")  # fmt: skip
    assert warned.returncode == 0, warned.stderr[-2000:]
    assert f"warning: trust_remote_code is true: loading {tiny_model_dir} will run the Python files" in warned.stderr
