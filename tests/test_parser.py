"""Recipes, overrides, types and validation: every bad value is one clear line naming the field."""

from pathlib import Path

import pytest

from zerosiam_llm.errors import UserInputError
from zerosiam_llm.parser import build_config, coerce_value, parse_overrides, resolve_recipe
from zerosiam_llm.zerosiam_config import ZeroSiamConfig

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPES.glob("*.yaml")))
def test_every_recipe_is_a_valid_config(name):
    # vLLM / bf16 need a GPU machine; the schema check must not
    config = build_config(name, {"use_vllm": "false", "bf16": "false"}, RECIPES)
    assert config.recipe == name and config.output_dir
    assert config.method in ("zerosiam", "tent")


def test_overrides_and_types():
    config = build_config("smollm2-135m-cpu", {"learning_rate": "3e-4", "method": "tent", "lora_r": "8"}, RECIPES)
    assert config.learning_rate == 3e-4 and config.lora_r == 8
    assert config.method == "tent" and config.alpha == 0.0 and not config.uses_predictor
    assert build_config(None, {"predictor_learning_rate": "null"}, RECIPES).resolved_predictor_learning_rate == 3e-3
    assert build_config(None, {"lora_target_modules": "q_proj,v_proj"}, RECIPES).lora_target_modules == "q_proj,v_proj"
    assert parse_overrides(["--a", "1", "--b=2", "--push_to_hub"])[0] == {"a": "1", "b": "2", "push_to_hub": "true"}


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
        ({"method": "em"}, "method: 'em' is not allowed; allowed: zerosiam, tent"),
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
