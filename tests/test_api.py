"""The library API (``zerosiam_llm/__init__.py``): TRL's import style, a model id string, TRL's field names, and the
README's "Use it from Python" script, run as written."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import zerosiam_llm
from zerosiam_llm.errors import UserInputError

REPO = Path(__file__).resolve().parents[1]


def test_the_public_names_import_from_the_package():
    from zerosiam_llm import LabelFreeConfig, LabelFreeTrainer, ZeroSiamConfig, ZeroSiamTrainer, zerosiam_loss

    assert sorted(zerosiam_llm.__all__) == sorted(zerosiam_llm._EXPORTS)
    for name in zerosiam_llm.__all__:
        assert getattr(zerosiam_llm, name) is not None
    assert ZeroSiamTrainer.__module__ == "zerosiam_llm.trainers.entropy"
    assert LabelFreeTrainer.__module__ == "zerosiam_llm.trainers.grpo"
    assert {ZeroSiamConfig.__name__, LabelFreeConfig.__name__, zerosiam_loss.__name__}
    with pytest.raises(AttributeError, match="no attribute 'ZeroSiam'"):
        zerosiam_llm.ZeroSiam  # noqa: B018


def test_importing_a_subpackage_does_not_load_torch():
    code = "import sys, zerosiam_llm.grading, zerosiam_llm.methods; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"


def test_trl_field_names_are_aliases(tmp_path):
    from zerosiam_llm import LabelFreeConfig, ZeroSiamConfig

    config = ZeroSiamConfig(output_dir=str(tmp_path), model_name_or_path="Qwen/Qwen2.5-0.5B-Instruct",
                            dataset_name="HuggingFaceH4/MATH-500", dataset_train_split="test")  # fmt: skip
    assert (config.model, config.dataset, config.dataset_split) == (
        "Qwen/Qwen2.5-0.5B-Instruct", "HuggingFaceH4/MATH-500", "test")  # fmt: skip
    assert "model_name_or_path" not in config.resolved_dict()  # one spelling recorded: the same run either way
    assert ZeroSiamConfig(output_dir=str(tmp_path)).model_name_or_path == "embedded:smollm2-135m"
    with pytest.raises(UserInputError, match="model_name_or_path is TRL's name for model: give one of them"):
        ZeroSiamConfig(output_dir=str(tmp_path), model="a/b", model_name_or_path="c/d")
    rl = LabelFreeConfig(output_dir=str(tmp_path), num_generations=8, temperature=1.0)
    assert (rl.num_rollouts, rl.num_generations) == (8, 8)
    with pytest.raises(UserInputError, match=r"num_generations \(8\) is TRL's name"):
        LabelFreeConfig(output_dir=str(tmp_path), num_generations=8, num_rollouts=2, temperature=1.0)


@pytest.mark.parametrize(("method", "field", "value"), [
    ("tent", "alpha", 2.0), ("tent", "predictor_lr_ratio", 3.0), ("sar", "predictor", "lora"),
    ("zerosiam", "sar_margin", 0.5), ("come", "alpha", 0.5),
])  # fmt: skip
def test_a_field_the_method_does_not_read_is_refused(tmp_path, method, field, value):
    from zerosiam_llm import ZeroSiamConfig

    with pytest.raises(UserInputError, match=f"{field} is read by method .* only, not by {method}; remove it"):
        ZeroSiamConfig(output_dir=str(tmp_path), method=method, **{field: value})


def test_rl_configs_refuse_the_entropy_methods_fields_and_each_others(tmp_path):
    from zerosiam_llm import LabelFreeConfig

    cases = (("majority-vote", "predictor_lr_ratio", 3.0), ("self-certainty", "num_vote_rollouts", 8),
             ("majority-vote", "no_answer_reward", None), ("entropy-reward", "optimizer", "sgd"))  # fmt: skip
    for method, field, value in cases:
        with pytest.raises(UserInputError, match=f"{field} is read by method"):
            LabelFreeConfig(output_dir=str(tmp_path), method=method, temperature=1.0, **{field: value})


def test_a_recipe_shared_by_the_methods_keeps_working(capsys):
    """A ZeroSiam recipe with --method tent: the recipe's predictor fields are left out with a note (the command
    line's own are refused, as in Python)."""
    from zerosiam_llm.parser import parse_config

    config = parse_config(["--recipe", "smollm2-135m-online-cpu", "--method", "tent", "--output_dir", "/tmp/x"])
    assert config.method == "tent"
    note = capsys.readouterr().out
    assert re.search(r"note: method tent does not read .*predictor_lr_ratio.* \(set in .*online-cpu", note), note
    with pytest.raises(UserInputError, match="predictor_lr_ratio is read by method zerosiam only, not by tent"):
        parse_config(["--recipe", "smollm2-135m-online-cpu", "--method", "tent", "--predictor_lr_ratio", "3"])


def test_the_online_batch_is_refused_rather_than_rewritten(tmp_path):
    from zerosiam_llm import ZeroSiamConfig

    with pytest.raises(UserInputError, match=r"per_device_train_batch_size \(3\) is set by protocol: online"):
        ZeroSiamConfig(output_dir=str(tmp_path), protocol="online", per_device_train_batch_size=3)
    online = ZeroSiamConfig(output_dir=str(tmp_path), protocol="online", stream_batch_size=4)
    assert online.per_device_train_batch_size == 4


def test_the_config_docstrings_carry_a_parameters_section():
    from zerosiam_llm import LabelFreeConfig, ZeroSiamConfig

    for config_class in (ZeroSiamConfig, LabelFreeConfig):
        doc = config_class.__doc__
        assert "    Parameters:" in doc and "> Parameters that control" in doc
        for name in config_class.__dict__["__annotations__"]:
            assert re.search(rf"^        {name} \(`", doc, re.M), f"{config_class.__name__}.{name} is not documented"
    assert "> Parameters that control the online protocol" in ZeroSiamConfig.__doc__


def readme_python_script() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Use it from Python", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the section holds one python block"
    return blocks[0]


@pytest.mark.slow
def test_the_readme_python_script_runs_as_written(tmp_path):
    """The README's script on the real embedded model, unchanged: it trains 2 steps from a model id string and writes
    the adapter and the predictor."""
    script = readme_python_script()
    assert len(script.strip().splitlines()) <= 20
    (tmp_path / "example.py").write_text(script)
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", "HOME": str(Path.home()),
           "PYTHONPATH": str(REPO)}  # fmt: skip
    proc = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "zerosiam-smollm2"
    for name in ("adapter_model.safetensors", "zerosiam_predictor.safetensors", "metrics.jsonl", "README.md"):
        assert (out / name).is_file(), name


def test_a_trainer_takes_a_model_path_and_a_default_config(tiny_model_dir, tmp_path, monkeypatch):
    from datasets import Dataset

    from zerosiam_llm import LabelFreeConfig, ZeroSiamTrainer

    monkeypatch.chdir(tmp_path)
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": "What is 1 + 1?"}]] * 2})
    trainer = ZeroSiamTrainer(model=str(tiny_model_dir), train_dataset=dataset)  # the tokenizer: the model's
    assert trainer.args.output_dir == f"{Path(tiny_model_dir).name}-ZeroSiam"
    assert trainer.processing_class.pad_token_id is not None and trainer.predictor is not None
    with pytest.raises(TypeError, match="ZeroSiamTrainer needs a ZeroSiamConfig"):
        ZeroSiamTrainer(model=str(tiny_model_dir), args=LabelFreeConfig(output_dir="x", temperature=1.0))
