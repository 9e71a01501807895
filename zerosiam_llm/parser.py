"""Recipes and the command line -> a validated :class:`ZeroSiamConfig`.

``--recipe NAME`` resolves in the bundled ``recipes/`` (``.yaml`` optional; a path works too), ``--config FILE.yaml``
reads your own YAML; any field can be overridden as ``--field value``. Every bad field is one line naming it.
"""

from __future__ import annotations

import difflib
import enum
import math
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from zerosiam_llm.errors import UserInputError
from zerosiam_llm.files import load_yaml
from zerosiam_llm.zerosiam_config import ZeroSiamConfig, config_fields

# --------------------------------------------------------------------------------------------------------------------
# recipes and CLI
# --------------------------------------------------------------------------------------------------------------------


def _type_hints() -> dict[str, Any]:
    return typing.get_type_hints(ZeroSiamConfig)


RECIPES_DIR = Path(__file__).resolve().parent / "recipes"  # shipped in the package: works from any folder


def available_recipes(recipes_dir: str | os.PathLike = RECIPES_DIR) -> list[str]:
    recipes_dir = Path(recipes_dir)
    return sorted(p.stem for p in recipes_dir.glob("*.yaml")) if recipes_dir.is_dir() else []


def resolve_recipe(name_or_path: str, recipes_dir: str | os.PathLike = RECIPES_DIR) -> Path:
    """A recipe path: an existing file, else the bundled ``recipes_dir/NAME`` or ``recipes_dir/NAME.yaml``."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    recipes_dir = Path(recipes_dir)
    for candidate in (recipes_dir / name_or_path, recipes_dir / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    names = available_recipes(recipes_dir)
    raise UserInputError(f"recipe {name_or_path!r} not found; available recipes: {', '.join(names) or '(none)'}")


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Safe-load a recipe YAML into a dict of raw values."""
    data = load_yaml(path, "recipe")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserInputError(f"recipe {path} must be a mapping of field: value, got a {type(data).__name__}")
    return data


def _unknown_field_error(name: str, source: str) -> UserInputError:
    close = difflib.get_close_matches(name, list(config_fields()), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `python train.py --help` for the fields"
    return UserInputError(f"unknown field {name!r} in {source}{hint}")


def _describe(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce_value(name: str, value: Any, tp: Any) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise a one-line error naming the field."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        # "none" stays a string (report_to: none); null / ~ / None mean None
        if value is None or (isinstance(value, str) and value in ("null", "~", "None")):
            if type(None) in args:
                return None
        if isinstance(value, str) and str in args:
            return value  # "all-linear", "none": strings stay strings when the field allows one
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce_value(name, value, arg)
            except UserInputError as err:
                errors.append(err)
        allowed = " or ".join(_describe(a) for a in args)
        raise UserInputError(f"{name}: expected {allowed}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise UserInputError(f"{name}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise UserInputError(f"{name}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UserInputError(f"{name}: expected an integer, got {value!r}") from None
        if not number.is_integer():
            raise UserInputError(f"{name}: expected an integer, got {value!r}")
        return int(number)
    if tp is float:
        if isinstance(value, bool):
            raise UserInputError(f"{name}: expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UserInputError(f"{name}: expected a number, got {value!r}") from None
        if not math.isfinite(number):  # float("nan") / float("inf") parse; no field means anything by them
            raise UserInputError(f"{name}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (dict, list)):
            raise UserInputError(f"{name}: expected a string, got {value!r}")
        return value if isinstance(value, str) else str(value)
    if origin is list or tp is list:
        (item_tp,) = typing.get_args(tp) or (str,)
        if isinstance(value, str) and value.strip().startswith("["):
            try:
                value = yaml.safe_load(value)  # JSON / YAML flow list, e.g. --guard_rules '[{...}]'
            except yaml.YAMLError:
                raise UserInputError(f"{name}: expected a list, got {value!r}") from None
        elif isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise UserInputError(f"{name}: expected a list, got {value!r}")
        return [coerce_value(name, v, item_tp) for v in value]
    if origin is dict or tp is dict:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise UserInputError(f"{name}: expected a mapping (JSON), got {value!r}") from None
        if not isinstance(value, dict):
            raise UserInputError(f"{name}: expected a mapping, got {value!r}")
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        allowed = [m.value for m in tp]
        if value in allowed or isinstance(value, tp):
            return value
        raise UserInputError(f"{name}: {value!r} is not allowed; allowed: {', '.join(map(str, allowed))}")
    return value  # Any and exotic types: let the dataclass check


def parse_overrides(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """``--key value`` / ``--key=value`` / bare ``--flag`` pairs, plus positional leftovers."""
    overrides, rest, i = {}, [], 0
    bool_fields = {n for n, tp in _type_hints().items() if tp is bool or tp == bool | None}
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            rest.append(token)
            i += 1
            continue
        key = token[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            i += 1
        elif key.replace("-", "_") in bool_fields or key in ("debug", "help"):
            value = "true"
        else:
            raise UserInputError(f"--{key} needs a value")
        overrides[key.replace("-", "_")] = value
        i += 1
    return overrides, rest


def build_config(
    recipe: str | None,
    overrides: dict[str, Any],
    recipes_dir: str | os.PathLike = RECIPES_DIR,
    default_recipe: str | None = None,
) -> ZeroSiamConfig:
    """Recipe YAML (or the default recipe) + overrides -> a validated :class:`ZeroSiamConfig`."""
    raw: dict[str, Any] = {}
    source_name = None
    name = recipe or default_recipe
    if name:
        path = resolve_recipe(name, recipes_dir)
        raw = load_recipe(path)
        source_name = path.stem
        for key in raw:
            if key not in config_fields():
                raise _unknown_field_error(str(key), f"recipe {path}")
    for key in overrides:
        if key not in config_fields():
            raise _unknown_field_error(key, "the command line")
    hints = _type_hints()
    values = {k: coerce_value(k, v, hints[k]) for k, v in {**raw, **overrides}.items()}
    values.setdefault("recipe", source_name)
    try:
        return ZeroSiamConfig(**values)
    except UserInputError:
        raise
    except (ValueError, TypeError) as err:
        raise UserInputError(str(err).strip().splitlines()[0]) from None


def help_text() -> str:
    lines = ["fields (any can be set in a recipe or as --field value):"]
    for name, f in config_fields().items():
        help_ = f.metadata.get("help", "")
        if name in ZeroSiamConfig.__annotations__:  # our own fields first, with their help
            lines.append(f"  --{name}: {help_}")
    lines.append("  ... and every transformers.TrainingArguments / trl.DistillationConfig field.")
    return "\n".join(lines)
