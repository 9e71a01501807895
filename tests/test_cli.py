"""train.py as a user runs it: exit code 2, one stderr line, nothing written, for each bad input."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from zerosiam_llm.cli import train_main
from zerosiam_llm.errors import UserInputError
from zerosiam_llm.files import read_jsonl
from zerosiam_llm.parser import build_config

REPO = Path(__file__).resolve().parents[1]


def run_inprocess(argv, capsys):
    code = train_main(argv)
    return code, capsys.readouterr()


def test_subprocess_bad_field_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--learnin_rate", "1e-4"], capture_output=True,
                          text=True, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown field 'learnin_rate' in the command line; did you mean learning_rate, em_inf_learning_rate, "
        "predictor_learning_rate?"
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
    from zerosiam_llm.run_dir import last_complete_checkpoint

    for step, complete in ((2, True), (4, True), (6, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    assert last_complete_checkpoint(tmp_path / "missing") is None
    # killed while HF wrote trainer_state.json (opened, not yet or not fully written): not complete either
    for step, text in ((8, ""), (10, '{"global_step": 1')):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(text)
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")


# ---------------------------------------------------------------------------------------------------------------------
# Reliability: each case through the real entry point (a subprocess running train.py), as a user meets it
# ---------------------------------------------------------------------------------------------------------------------

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # tiny model: threads only add waits


def train_py(*argv, cwd=None):
    return subprocess.run([sys.executable, str(REPO / "train.py"), *map(str, argv)], capture_output=True, text=True,
                          cwd=cwd, env=ENV, timeout=600)  # fmt: skip


def tiny_args(model_dir, out, *extra):
    return ["--model", model_dir, "--output_dir", out, "--num_problems", 16, "--max_completion_length", 8,
            "--answer_field", "null", "--save_steps", 2, *extra]  # fmt: skip


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with a hash of its bytes: equal snapshots = nothing deleted, added or changed."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def steps_logged(out: Path) -> list[int]:
    return [m["step"] for m in read_jsonl(out / "metrics.jsonl") if "loss" in m]


def assert_one_error_line(proc, message):
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A finished 4-step offline run of the tiny model (checkpoints at 2 and 4); tests copy it before touching it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    proc = train_py(*tiny_args(tiny_model_dir, out, "--max_steps", 4))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def copy_run(finished_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def test_rerunning_a_finished_run_is_a_no_op_and_a_larger_max_steps_continues(finished_run, tmp_path, tiny_model_dir):
    out = copy_run(finished_run, tmp_path)
    before = snapshot(out)
    again = train_py(*tiny_args(tiny_model_dir, out, "--max_steps", 4))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "holds a finished run: it finished 4 of 4 steps; nothing to do" in again.stdout
    assert snapshot(out) == before  # no checkpoint-5, same adapter, no appended metrics
    # the trainer alone (no summary.json to tell the command line): resuming at the last step trains nothing either
    (out / "summary.json").unlink()
    library = train_py(*tiny_args(tiny_model_dir, out, "--max_steps", 4))
    assert library.returncode == 0, library.stderr[-3000:]
    assert not (out / "checkpoint-5").exists() and steps_logged(out) == [1, 2, 3, 4]
    assert snapshot(out)["adapter_model.safetensors"] == before["adapter_model.safetensors"]
    more = train_py(*tiny_args(tiny_model_dir, out, "--max_steps", 6))
    assert more.returncode == 0, more.stderr[-3000:]
    assert steps_logged(out) == [1, 2, 3, 4, 5, 6] and (out / "checkpoint-6").is_dir()


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (["--dataset", "missing.jsonl"], "data file missing.jsonl does not exist"),
        (["--model", "junk.gguf"], "is not a GGUF model"),
        (["--num_problems", 2], "the data set has 2 usable prompts but one batch needs 4"),
    ],
)
def test_overwrite_deletes_nothing_until_every_input_is_valid(bad, message, finished_run, tmp_path, tiny_model_dir):
    out = copy_run(finished_run, tmp_path)
    (tmp_path / "junk.gguf").write_bytes(b"\x00" * 64)
    before = snapshot(out)
    proc = train_py(*tiny_args(tiny_model_dir, out, "--overwrite_output_dir", "true", *bad), cwd=tmp_path)
    assert_one_error_line(proc, message)
    assert snapshot(out) == before


def test_a_data_set_smaller_than_one_batch_is_an_error(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    proc = train_py(*tiny_args(tiny_model_dir, out, "--num_problems", 3))
    assert_one_error_line(proc, "the data set has 3 usable prompts but one batch needs 4 (per_device_train_batch_size "
                                "8 x gradient_accumulation_steps 1 / num_rollouts 2)")  # fmt: skip
    assert not out.exists()
    # the same when skipping over-long prompts leaves too few
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"problem": q}) + "\n" for q in ["1+1?"] * 3 + ["apples " * 400] * 5))
    proc = train_py(*tiny_args(tiny_model_dir, out, "--dataset", data, "--max_prompt_length", 120))
    assert_one_error_line(proc, "the data set has 3 usable prompts but one batch needs 4")
    assert "3 kept, 5 skipped" in proc.stdout and not out.exists()
    # an online stream keeps its last, shorter batch: 3 problems in batches of 4 are one batch of 3, all scored
    online = train_py(*tiny_args(tiny_model_dir, out, "--protocol", "online", "--num_problems", 3,
                                 "--stream_batch_size", 4, "--max_steps", -1))  # fmt: skip
    assert online.returncode == 0, online.stderr[-3000:]
    assert "the last batch has 3 (answered, scored and trained on like the others)" in online.stdout
    assert len(read_jsonl(out / "arithmetic" / "predictions.jsonl")) == 3


def test_training_shows_a_step_bar_and_no_raw_dicts(tmp_path, tiny_model_dir):
    proc = train_py(*tiny_args(tiny_model_dir, tmp_path / "bar", "--max_steps", 2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"zerosiam: 100%\|.*\| 2/2 \[\d\d:\d\d<\d\d:\d\d, .*step.*H\(p_r\)=", proc.stderr), proc.stderr
    assert "{'" not in proc.stdout + proc.stderr and "train_runtime" not in proc.stdout + proc.stderr
    lines = train_py(*tiny_args(tiny_model_dir, tmp_path / "lines", "--max_steps", 2, "--disable_tqdm", "true"))
    assert lines.returncode == 0, lines.stderr[-3000:]
    assert re.search(r"^step 2/2: loss [\d.]+, H\(p_r\) [\d.]+$", lines.stdout, re.M), lines.stdout
    online = train_py(*tiny_args(tiny_model_dir, tmp_path / "online", "--protocol", "online", "--num_problems", 8,
                                 "--stream_batch_size", 4, "--temperature", 0, "--max_steps", -1))  # fmt: skip
    assert online.returncode == 0, online.stderr[-3000:]
    assert re.search(r"zerosiam arithmetic: 100%\|.*\| 2/2 \[", online.stderr), online.stderr


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: (d / "junk.gguf").write_bytes(b"\x00" * 64) and d / "junk.gguf", "is not a GGUF model (it does not "
         "start with the GGUF magic bytes)"),
        (lambda d: (d / "config.json").write_text("{}") and d, "has no model_type (expected a config.json written by "
         "save_pretrained"),
        (lambda d: (d / "config.json").write_text("{oops") and d, "is not valid JSON"),
    ],
)  # fmt: skip
def test_model_load_failures_are_one_line(make, message, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    model = make(folder)
    out = tmp_path / "out"
    assert_one_error_line(train_py("--model", model, "--output_dir", out), message)
    assert not out.exists()


@pytest.mark.parametrize("damage", ["junk weights", "weights of another shape"])
def test_unloadable_weights_are_one_line(damage, tmp_path, tiny_model_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    if damage == "junk weights":
        (model / "model.safetensors").write_bytes(b"\xff" * 100)
    else:
        config = json.loads((model / "config.json").read_text())
        config["intermediate_size"] *= 2
        (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    proc = train_py(*tiny_args(model, out))
    assert_one_error_line(proc, f"cannot load model {model} from the folder {model} (expected a save_pretrained")
    assert not out.exists()


def test_a_read_only_output_dir_is_refused_before_the_model_loads(tmp_path, tiny_model_dir):
    if os.geteuid() == 0:  # root writes through chmod: use a folder the kernel refuses
        out = Path("/sys/zerosiam-test-out")
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        out = locked / "out"
    proc = train_py(*tiny_args(tiny_model_dir, out))
    assert_one_error_line(proc, f"output_dir {out} is not writable")
    assert "Loading weights" not in proc.stderr and not out.exists()


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--learning_rate", "nan", "learning_rate: expected a finite number, got 'nan'"),
        ("--alpha", "inf", "alpha: expected a finite number, got 'inf'"),
        ("--adam_epsilon", "-inf", "adam_epsilon: expected a finite number, got '-inf'"),
        ("--max_steps", "0", "max_steps must be > 0, or -1 to train num_train_epochs; got 0"),
    ],
)
def test_non_finite_and_zero_values_are_refused(flag, value, message, tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    assert_one_error_line(train_py(*tiny_args(tiny_model_dir, out, flag, value)), message)
    assert not out.exists()


def test_non_finite_values_in_a_recipe_are_refused(tmp_path):
    from zerosiam_llm.configs import ZeroSiamConfig

    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rate: .nan\n")  # YAML's own NaN
    with pytest.raises(UserInputError, match="learning_rate: expected a finite number"):
        build_config(str(recipe), {}, REPO / "recipes")
    with pytest.raises(UserInputError, match="predictor_lr_ratio must be a finite number, got inf"):
        ZeroSiamConfig(output_dir=str(tmp_path), predictor_lr_ratio=float("inf"))


def test_a_moved_run_folder_resumes(finished_run, tmp_path, tiny_model_dir):
    out = copy_run(finished_run, tmp_path)
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    out.rename(moved)
    proc = train_py(*tiny_args(tiny_model_dir, moved, "--max_steps", 6))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert steps_logged(moved) == [1, 2, 3, 4, 5, 6] and (moved / "checkpoint-6").is_dir()


def test_trust_remote_code_warns_naming_the_code(tmp_path, tiny_model_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "modeling_custom.py").write_text("# would run\n")
    proc = train_py(*tiny_args(model, tmp_path / "out", "--max_steps", 1, "--trust_remote_code", "true"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    warning = [line for line in proc.stderr.splitlines() if line.startswith("warning: trust_remote_code")]
    assert warning == [f"warning: trust_remote_code is true: loading {model} will run the Python files of "
                       f"{model} (modeling_custom.py)"]  # fmt: skip
    quiet = train_py(*tiny_args(model, tmp_path / "quiet", "--max_steps", 1))
    assert quiet.returncode == 0 and "trust_remote_code" not in quiet.stderr


def test_short_help_card_scheduler_and_tent_summary(tmp_path, tiny_model_dir):
    short = train_py("-h")
    assert short.returncode == 0 and short.stdout.startswith("usage: zerosiam-train") and "--alpha" in short.stdout
    out = tmp_path / "tent"
    proc = train_py(*tiny_args(tiny_model_dir, out, "--max_steps", 1, "--method", "tent", "--lr_scheduler_type",
                               "linear"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"  adapter + card: {out}" in proc.stdout and "predictor" not in proc.stdout.split("steps")[-1]
    card = (out / "README.md").read_text()
    assert "linear schedule" in card and "SchedulerType" not in card
    assert "trained with Tent" in card and "@inproceedings{wang2021tent" in card and "2509.23183" not in card


def test_declared_extras_exist():
    """Every extra the package asks of a dependency is one that dependency provides (pip warns on the others)."""
    import importlib.metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    for spec in importlib.metadata.requires("zerosiam-llm"):
        req = Requirement(spec)
        if req.marker is not None or not req.extras:
            continue
        provided = importlib.metadata.metadata(req.name).get_all("Provides-Extra") or []
        for extra in req.extras:
            assert extra in provided, f"{req.name} provides no extra {extra!r} (it has {provided})"
            assert canonicalize_name(extra) == extra


# ---------------------------------------------------------------------------------------------------------------------
# The installed package: console scripts from an empty folder (recipes and benchmark definitions ship inside)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A plain (not editable) install of this checkout into a folder of its own."""
    source, target = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("site")
    # built from a copy: setuptools writes build/ next to the sources
    shutil.copytree(REPO / "zerosiam_llm", source / "zerosiam_llm", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target",
                           str(target), str(source)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return target


def test_console_scripts_work_from_an_empty_folder(installed, tmp_path, tiny_model_dir):
    here = tmp_path / "empty"
    here.mkdir()
    env = {**ENV, "PYTHONPATH": str(installed)}

    def script(name, *argv):
        return subprocess.run([str(installed / "bin" / name), *map(str, argv)], capture_output=True, text=True,
                              cwd=here, env=env, timeout=600)  # fmt: skip

    where = subprocess.run([sys.executable, "-c", "import zerosiam_llm; print(zerosiam_llm.__file__)"], cwd=here,
                           env=env, capture_output=True, text=True)  # fmt: skip
    assert where.stdout.startswith(str(installed))  # the installed copy, not this checkout
    assert {p.name for p in (installed / "zerosiam_llm" / "recipes").glob("*.yaml")} >= {"smollm2-135m-cpu.yaml"}
    helped = script("zerosiam-train", "--help")
    help_text = " ".join(helped.stdout.split())  # argparse wraps lines
    assert helped.returncode == 0 and "--recipe NAME starts from a bundled recipe (" in help_text
    assert "smollm2-135m-cpu" in help_text and "--predictor_lr_ratio" in help_text
    trained = script("zerosiam-train", "--recipe", "smollm2-135m-cpu", "--max_steps", 1, "--model", tiny_model_dir,
                     "--num_problems", 8, "--max_completion_length", 8, "--output_dir", "run")  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert yaml.safe_load((here / "run" / "resolved_config.yaml").read_text())["recipe"] == "smollm2-135m-cpu"
    own = here / "mine.yaml"
    own.write_text(f"model: {tiny_model_dir}\nmethod: tent\nmax_steps: 1\nnum_problems: 8\nmax_completion_length: 8\n")
    configured = script("zerosiam-train", "--config", own, "--output_dir", "mine")
    assert configured.returncode == 0, configured.stderr[-3000:]
    assert yaml.safe_load((here / "mine" / "resolved_config.yaml").read_text())["method"] == "tent"
    data = tmp_path / "data"
    data.mkdir()
    (data / "gsm8k_test.jsonl").write_text(json.dumps({"question": "1 + 1?", "answer": "1+1\n#### 2"}) + "\n")
    evaluated = script("zerosiam-eval", "--benchmarks", "gsm8k", "--data_dir", data, "--limit", 1, "--model",
                       tiny_model_dir, "--max_new_tokens", 4, "--no_progress", "--output_dir", "eval")  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert (here / "eval" / "summary.json").is_file()
    missing = script("zerosiam-train", "--config", "nope.yaml")
    assert missing.returncode == 2 and missing.stderr.startswith("error: config file nope.yaml does not exist")
