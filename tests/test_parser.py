"""Recipes, overrides, types and validation: every bad value is one clear line naming the field."""

import os
from pathlib import Path

import pytest

from zerosiam_llm.configs import ZeroSiamConfig
from zerosiam_llm.errors import UserInputError
from zerosiam_llm.parser import build_config, coerce_value, parse_config, resolve_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPES.glob("*.yaml")))
def test_every_recipe_is_a_valid_config(name):
    # vLLM / bf16 need a GPU machine; the schema check must not
    config = build_config(name, {"use_vllm": "false", "bf16": "false"}, RECIPES)
    assert config.recipe == name and config.output_dir
    rl = name.startswith(("label-free", "ttrl"))
    assert config.method == ("majority-vote" if rl else "zerosiam")
    assert type(config).__name__ == ("LabelFreeConfig" if rl else "ZeroSiamConfig")


def test_overrides_and_types():
    config = build_config("smollm2-135m-cpu", {"learning_rate": "3e-4", "method": "tent", "lora_r": "8"}, RECIPES)
    assert config.learning_rate == 3e-4 and config.lora_r == 8
    assert config.method == "tent" and not config.uses_predictor
    assert config.alpha == 1.0  # kept as given (the default): Tent never reads it, so it is not rewritten to 0
    assert build_config(None, {"predictor_learning_rate": "null"}, RECIPES).resolved_predictor_learning_rate == 3e-3
    assert build_config(None, {"lora_target_modules": "q_proj,v_proj"}, RECIPES).lora_target_modules == [
        "q_proj", "v_proj"]  # fmt: skip


def test_trl_parser_command_line():
    """The TRL command line: --field value, --field=value, a bare flag, several values, JSON for structured fields."""
    rules = '[{"metric": "loss", "non_finite": true, "action": "stop"}]'
    config = parse_config(["--learning_rate=2e-4", "--push_to_hub", "--hub_model_id", "me/x", "--lora_target_modules",
                           "q_proj", "v_proj", "--guard_rules", rules, "--answer_field", "null", "--max_steps", "-1",
                           "--num_train_epochs", "2"])  # fmt: skip
    assert config.learning_rate == 2e-4 and config.push_to_hub and config.lora_target_modules == ["q_proj", "v_proj"]
    assert config.guard_rules == [{"metric": "loss", "non_finite": True, "action": "stop"}]
    assert config.answer_field is None and config.recipe == "smollm2-135m-cpu" and config.max_steps == -1
    with pytest.raises(UserInputError, match="guard_rules: expected a JSON list"):
        parse_config(["--guard_rules", "[{oops"])
    with pytest.raises(UserInputError, match="^unexpected argument 'stray'"):
        parse_config(["stray"])
    with pytest.raises(UserInputError, match="--recipe needs a value"):
        parse_config(["--recipe"])


def test_config_file_like_trl(tmp_path, monkeypatch):
    """--config FILE.yaml as in `trl grpo --config`: the file's values, the command line over them, TRL's env:."""
    own = tmp_path / "mine.yaml"
    own.write_text("method: tent\nlearning_rate: 5.0e-5\nenv:\n  ZEROSIAM_TEST_VAR: set\n")
    monkeypatch.delenv("ZEROSIAM_TEST_VAR", raising=False)
    config = parse_config(["--config", str(own), "--learning_rate", "1e-4"])
    assert config.method == "tent" and config.learning_rate == 1e-4 and config.recipe == "mine"
    assert os.environ["ZEROSIAM_TEST_VAR"] == "set"
    with pytest.raises(UserInputError, match="not both"):
        parse_config(["--config", str(own), "--recipe", "smollm2-135m-cpu"])


def test_resolved_dict_has_no_token():
    config = build_config(None, {"hub_token": "hf_secret"}, RECIPES)
    assert "hf_secret" not in str(config.resolved_dict())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"learnin_rate": "1"}, "unknown field 'learnin_rate' in the command line; did you mean learning_rate"),
        ({"learning_rate": "fast"}, "learning_rate: expected a number, got 'fast'"),
        ({"learning_rate": "-1"}, "learning_rate must be >= 0"),
        ({"num_rollouts": "0"}, "num_rollouts must be > 0"),
        ({"alpha": "-0.5"}, "alpha must be >= 0"),
        ({"lora_r": "2.5"}, "lora_r: expected an integer"),
        ({"method": "em"}, "method: 'em' is not allowed; allowed: zerosiam, tent, come, sar, none, majority-vote"),
        ({"predictor": "mlp"}, "predictor: 'mlp' is not allowed; allowed: full, lora"),
        ({"push_to_hub": "maybe"}, "push_to_hub: expected true or false"),
        ({"use_vllm": "true"}, "pip install 'zerosiam-llm[vllm]'"),
        ({"beta": "0.5"}, "beta is a distillation setting"),
    ],
)
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(UserInputError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        build_config(None, overrides, RECIPES)


def test_recipe_errors(tmp_path):
    with pytest.raises(UserInputError, match="recipe 'nope' not found; available recipes: .*smollm2-135m-cpu"):
        resolve_recipe("nope", RECIPES)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(UserInputError, match=r"is not valid YAML at line \d+"):
        build_config(str(bad), {}, RECIPES)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("learning_rat: 1e-4\n")
    with pytest.raises(UserInputError, match="unknown field 'learning_rat' in recipe .*did you mean learning_rate"):
        build_config(str(unknown), {}, RECIPES)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(UserInputError, match="must be a mapping"):
        build_config(str(listy), {}, RECIPES)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"model: \xff\xfe\n")
    with pytest.raises(UserInputError, match="not UTF-8"):
        build_config(str(binary), {}, RECIPES)
    python_tag = tmp_path / "unsafe.yaml"
    python_tag.write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(UserInputError, match="not valid YAML"):  # safe_load refuses python tags
        build_config(str(python_tag), {}, RECIPES)


def test_coerce_value_unions():
    assert coerce_value("x", "5", int | None) == 5
    assert coerce_value("x", "null", int | None) is None
    assert coerce_value("x", "none", list[str] | str | None) == "none"
    assert coerce_value("x", 3, str) == "3"
    assert ZeroSiamConfig.__dataclass_fields__["alpha"].metadata["help"]


def test_the_rl_config_parses_the_inherited_fields_as_the_entropy_one_does():
    """LabelFreeConfig inherits ZeroSiamConfig's structured fields: `null` and lists convert the same (a stability
    cell passes --compare_methods null to every method)."""
    for method in ("tent", "majority-vote"):
        config = build_config("smollm2-135m-online-cpu", {"method": method, "num_rollouts": 4, "temperature": 1.0,
                                                          "compare_methods": "null", "benchmarks": "gsm8k,math500"})
        assert config.compare_methods is None and config.benchmarks == ["gsm8k", "math500"], method


def test_the_one_argv_scanner():
    """option_spans serves --recipe / --config (pop_option), the method before parsing, and --compare_methods'
    child commands (strip_options): both spellings, =, a flag with no value, repeats."""
    from zerosiam_llm.parser import _method_in, option_spans, pop_option, strip_options

    argv = ["--recipe", "r", "--method=tent", "--output-dir", "o", "--resume", "--method", "sar", "--lr", "1"]
    spans = [(2, 3, "method", "tent"), (3, 5, "output_dir", "o"), (5, 6, "resume", None), (6, 8, "method", "sar")]
    assert option_spans(argv, ("method", "output_dir", "resume")) == spans
    assert _method_in(argv, "zerosiam") == "sar" and _method_in(["--lr", "1"], "zerosiam") == "zerosiam"
    assert strip_options(argv, ("method", "output_dir")) == ["--recipe", "r", "--resume", "--lr", "1"]
    rest = list(argv)
    assert pop_option(rest, "recipe") == "r" and rest == argv[2:] and pop_option(rest, "config") is None
    with pytest.raises(UserInputError, match="--recipe needs a value"):
        pop_option(["--recipe", "--method", "tent"], "recipe")
