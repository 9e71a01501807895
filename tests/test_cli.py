"""train.py as a user runs it: exit code 2, one stderr line, nothing written, for each bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from zerosiam_llm.cli import train_main

REPO = Path(__file__).resolve().parents[1]


def run_inprocess(argv, capsys):
    code = train_main(argv, recipes_dir=REPO / "recipes")
    return code, capsys.readouterr()


def test_subprocess_bad_field_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--learnin_rate", "1e-4"], capture_output=True,
                          text=True, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown field 'learnin_rate' in the command line; did you mean learning_rate, predictor_learning_rate?"
    ]
    assert "Traceback" not in proc.stderr and not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--recipe", "nope"], "available recipes:"),
        (["--lora_r", "0"], "lora_r must be > 0"),
        (["--model", "/no/such/folder"], "model path /no/such/folder does not exist"),
        (["--model", "missing.gguf"], "GGUF file missing.gguf does not exist"),
        (["--dataset", "/no/such/file.jsonl"], "data file /no/such/file.jsonl does not exist"),
        (["positional"], "unexpected argument 'positional'"),
    ],
)
def test_bad_input_in_process(argv, message, capsys, tmp_path):
    out = tmp_path / "out"
    code, captured = run_inprocess([*argv, "--output_dir", str(out)], capsys)
    assert code == 2
    assert captured.err.count("\n") == 1 and message in captured.err, captured.err
    assert not out.exists()


def test_dataset_without_question_field_lists_columns(capsys, tmp_path, tiny_model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "solution": "2"}) + "\n")
    code, captured = run_inprocess(["--model", str(tiny_model_dir), "--dataset", str(data), "--output_dir",
                                    str(tmp_path / "o")], capsys)  # fmt: skip
    assert code == 2
    assert "question_field 'problem' is not a column of" in captured.err and "question, solution" in captured.err


def test_non_utf8_and_empty_data_files(capsys, tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"problem": "ok"}\n{"problem": "\xff"}\n')
    code, captured = run_inprocess(["--model", str(tiny_model_dir), "--dataset", str(bad), "--output_dir",
                                    str(tmp_path / "o")], capsys)  # fmt: skip
    assert code == 2 and "line 2: not UTF-8" in captured.err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, captured = run_inprocess(["--model", str(tiny_model_dir), "--dataset", str(empty), "--output_dir",
                                    str(tmp_path / "o")], capsys)  # fmt: skip
    assert code == 2 and "is empty" in captured.err


def test_non_empty_output_dir_is_refused_and_untouched(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, captured = run_inprocess(["--model", str(tiny_model_dir), "--output_dir", str(out)], capsys)
    assert code == 2 and "is not empty and holds no zerosiam-llm run" in captured.err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_help_lists_fields(capsys):
    code, captured = run_inprocess(["--help"], capsys)
    assert code == 0 and "--predictor_lr_ratio" in captured.out


@pytest.mark.parametrize("policy", ["skip", "truncate"])
def test_long_prompts_are_skipped_or_truncated_and_counted(policy, capsys, tmp_path, tiny_model_dir):
    data = tmp_path / "d.jsonl"
    rows = [{"problem": "What is 2 + 2?"}] * 8 + [{"problem": "apples " * 400 + "how many?"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / policy
    argv = ["--model", str(tiny_model_dir), "--dataset", str(data), "--output_dir", str(out), "--max_steps", "1",
            "--max_prompt_length", "120", "--long_prompt", policy, "--max_completion_length", "8", "--answer_field",
            "null"]  # fmt: skip
    code, captured = run_inprocess(argv, capsys)
    assert code == 0, captured.err
    summary = json.loads((out / "summary.json").read_text())
    if policy == "skip":
        assert summary["prompts"] == {"kept": 8, "skipped": 1, "truncated": 0}
        assert "8 kept, 1 skipped, 0 truncated" in captured.out
    else:
        assert summary["prompts"] == {"kept": 9, "skipped": 0, "truncated": 1}


def test_torn_checkpoint_is_ignored(tmp_path):
    from zerosiam_llm.trainer import last_complete_checkpoint

    for step, complete in ((2, True), (4, True), (6, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    assert last_complete_checkpoint(tmp_path / "missing") is None
