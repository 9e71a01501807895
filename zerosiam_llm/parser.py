"""Recipes and the command line -> a validated :class:`ZeroSiamConfig`, through ``trl.TrlParser``.

``--recipe NAME`` resolves in the bundled ``recipes/`` (``.yaml`` optional; a path works too), ``--config FILE.yaml``
reads your own YAML (as ``trl grpo --config``); any field can be overridden as ``--field value``; structured fields
(``guard_rules``) take JSON, as TRL's do. Every bad field or value is one line naming it, before anything runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import json
import math
import os
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from trl import TrlParser

from zerosiam_llm.configs import ZeroSiamConfig, config_fields
from zerosiam_llm.errors import UserInputError, first_line
from zerosiam_llm.files import load_yaml

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
        if len(errors) == 1:  # X | None: X's own message ("expected a finite number")
            raise errors[0]
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


# --------------------------------------------------------------------------------------------------------------------
# The command line: trl.TrlParser with one-line errors
# --------------------------------------------------------------------------------------------------------------------

DEFAULT_RECIPE = "smollm2-135m-cpu"
NULLS = ("null", "~", "None")


def _plain_type(tp: Any) -> bool:
    """int / float / bool / str, optionally ``| None``: the fields whose values this module converts itself."""
    args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) in _UNIONS else [tp]
    return len(args) == 1 and args[0] in (int, float, bool, str)


_UNIONS = (typing.Union, types.UnionType)


def _list_item_type(tp: Any) -> Any:
    for arg in typing.get_args(tp) if typing.get_origin(tp) in _UNIONS else (tp,):
        if typing.get_origin(arg) is list:
            return (typing.get_args(arg) or (str,))[0]
    return str


def _converter(name: str, tp: Any):
    """An argparse ``type``: :func:`coerce_value`'s conversion and one-line message (``null`` means None)."""

    def convert(text: str) -> Any:
        try:
            return coerce_value(name, text, tp)
        except UserInputError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = name
    return convert


class FieldParser(TrlParser):
    """``trl.TrlParser`` over one config dataclass (``--config FILE.yaml``, ``--field value``, ``--help``) that keeps
    the project's error quality: every bad field or value is one :class:`UserInputError` line naming it, with "did you
    mean" for a mistyped field, raised before anything is written."""

    def __init__(self, dataclass_type: type, prog: str, description: str) -> None:
        super().__init__(dataclass_type, prog=prog, description=description, allow_abbrev=False)
        self.dataclass_type = dataclass_type
        self.fields = {f.name for f in dataclasses.fields(dataclass_type) if f.init}
        hints = typing.get_type_hints(dataclass_type)
        # the project's fields, LabelFreeConfig's inherited ZeroSiamConfig ones included (not TRL's / HF's)
        own = {name for k in dataclass_type.__mro__ if k.__module__.startswith("zerosiam_llm")
               for name in vars(k).get("__annotations__", {})}  # fmt: skip
        defaults = {f.name: f.default for f in dataclasses.fields(dataclass_type)}
        for action in self._actions:
            if action.dest not in self.fields or action.type is None:
                continue
            tp = hints[action.dest]
            if action.nargs in ("+", "*"):
                action.type = _converter(action.dest, _list_item_type(tp))
                if action.dest in own and defaults[action.dest] is not dataclasses.MISSING:
                    action.default = defaults[action.dest]  # HfArgumentParser drops a list field's plain default
            elif action.dest in own or _plain_type(tp):
                action.type = _converter(action.dest, tp)

    def error(self, message: str):  # type: ignore[override]
        match = re.match(r"argument --([\w-]+)(?:/[^:]*)?: (.*)", message)
        if match and match.group(2).startswith(match.group(1).replace("-", "_") + ":"):
            message = match.group(2)  # the converter's message already names the field
        raise UserInputError(message)

    def _attach_dash_values(self, argv: Sequence[str]) -> list[str]:
        """``--field -inf`` -> ``--field=-inf``: argparse takes a value starting with "-" (other than a plain negative
        number) for an option and would say "expected one argument"."""
        out, argv, i = [], list(argv), 0
        while i < len(argv):
            token = argv[i]
            value = argv[i + 1] if i + 1 < len(argv) else ""
            if (token.startswith("--") and "=" not in token and value.startswith("-") and not value.startswith("--")
                    and value not in self._option_string_actions):  # fmt: skip
                out.append(f"{token}={value}")
                i += 2
                continue
            out.append(token)
            i += 1
        return out

    def unknown_field(self, name: str, source: str) -> UserInputError:
        close = difflib.get_close_matches(name, sorted(self.fields), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; see `{self.prog} --help` for the fields"
        return UserInputError(f"unknown field {name!r} in {source}{hint}")

    def read_config(self, path: Path, raw: dict[str, Any] | None = None) -> dict[str, Any]:
        """A YAML config's values (``raw``: already loaded from ``path``), each checked and converted like a
        command-line value; TRL's ``env:`` mapping is exported to the environment."""
        raw = dict(load_recipe(path) if raw is None else raw)
        env = raw.pop("env", None)
        if env is not None:
            if not isinstance(env, dict):
                raise UserInputError(f"recipe {path}: env must be a mapping of variable: value")
            os.environ.update({str(k): str(v) for k, v in env.items()})
        hints = typing.get_type_hints(self.dataclass_type)
        for key in raw:
            if key not in self.fields:
                raise self.unknown_field(str(key), f"recipe {path}")
        return {key: coerce_value(key, value, hints[key]) for key, value in raw.items()}

    def parse(self, argv: Sequence[str], config: dict[str, Any] | None = None) -> Any:
        """The dataclass from ``config`` (values of a YAML file) overridden by ``argv``."""
        if config:
            self.set_defaults_with_config(**config)
        try:
            args = self._attach_dash_values(argv)
            obj, rest = self.parse_args_into_dataclasses(args=args, return_remaining_strings=True)
        except UserInputError:
            raise
        except (ValueError, TypeError) as err:  # a TrainingArguments check outside the config's own validation
            raise UserInputError(first_line(err)) from None
        if rest:
            token = rest[0]
            if token.startswith("--"):
                raise self.unknown_field(token[2:].split("=", 1)[0].replace("-", "_"), "the command line")
            raise UserInputError(f"unexpected argument {token!r}; use --field value")
        return obj


def option_spans(argv: Sequence[str], names: Sequence[str]) -> list[tuple[int, int, str, str | None]]:
    """The one command-line scanner: each ``--name VALUE`` / ``--name=VALUE`` of ``names`` (``-`` or ``_`` in the
    name) in ``argv``, as ``(start, end, name, value)``; value None for a flag followed by another flag or nothing."""
    spans, i = [], 0
    while i < len(argv):
        token = argv[i]
        key = token[2:].split("=", 1)[0].replace("-", "_") if token.startswith("--") else None
        if key not in names:
            i += 1
        elif "=" in token:
            spans.append((i, i + 1, key, token.split("=", 1)[1]))
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            spans.append((i, i + 2, key, argv[i + 1]))
            i += 2
        else:
            spans.append((i, i + 1, key, None))
            i += 1
    return spans


def pop_option(argv: list[str], name: str) -> str | None:
    """Remove the first ``--name VALUE`` / ``--name=VALUE`` from ``argv``; returns VALUE (None when absent)."""
    spans = option_spans(argv, (name,))
    if not spans:
        return None
    start, end, _, value = spans[0]
    if value is None:
        raise UserInputError(f"--{name} needs a value")
    del argv[start:end]
    return value


def strip_options(argv: Sequence[str], names: Sequence[str]) -> list[str]:
    """``argv`` without any ``--name [VALUE]`` of ``names``."""
    dropped = {i for start, end, _, _ in option_spans(argv, names) for i in range(start, end)}
    return [token for i, token in enumerate(argv) if i not in dropped]


TRAIN_DESCRIPTION = (
    "Adapt a model at test time with ZeroSiam (or Tent). --recipe NAME starts from a bundled recipe ({recipes}; "
    "default {default}), --config FILE.yaml from your own YAML of the same fields; any field below can be set as "
    "--field value (structured fields such as guard_rules take JSON)."
)


def train_parser(config_class: type = ZeroSiamConfig) -> FieldParser:
    description = TRAIN_DESCRIPTION.format(recipes=", ".join(available_recipes()), default=DEFAULT_RECIPE)
    return FieldParser(config_class, prog="zerosiam-train", description=description)


def config_class_for(method: str | None) -> type:
    """The config dataclass of a method: ``LabelFreeConfig`` (GRPO fields too) for the RL methods, else
    ``ZeroSiamConfig``."""
    from zerosiam_llm.methods import REGISTRY

    return REGISTRY[method].config_class if method in REGISTRY else ZeroSiamConfig  # ZeroSiamConfig names the error


def _method_in(argv: Sequence[str], recipe_method: Any) -> Any:
    """The ``method`` a command line (its last ``--method``) or else a recipe asks for, before parsing."""
    values = [value for *_, value in option_spans(argv, ("method",)) if value is not None]
    return values[-1] if values else recipe_method


def _without_unused_fields(values: dict[str, Any], method: Any, path: Path | None) -> dict[str, Any]:
    """A recipe is shared by the methods (``--method tent`` on a ZeroSiam recipe, ``--compare_methods``): its values
    for fields the chosen method does not read are left out, with a note. On the command line such a field is refused
    (the config's check), since there it was asked for."""
    from zerosiam_llm.methods import REGISTRY, unused_fields

    if method not in REGISTRY:
        return values  # the config names the bad method
    dropped = unused_fields(method, values)
    if dropped:
        print(f"note: method {method} does not read {', '.join(dropped)} (set in {path}); left out")
    return {k: v for k, v in values.items() if k not in dropped}


def parse_config(
    argv: Sequence[str], recipes_dir: str | os.PathLike = RECIPES_DIR, default_recipe: str | None = DEFAULT_RECIPE
) -> ZeroSiamConfig:
    """``[--recipe NAME | --config FILE.yaml] [--field value ...]`` -> a validated :class:`ZeroSiamConfig`."""
    argv = list(argv)
    recipe, config_file = pop_option(argv, "recipe"), pop_option(argv, "config")
    if recipe and config_file:
        raise UserInputError("give --recipe NAME (bundled) or --config FILE.yaml (your own), not both")
    if config_file:
        path = Path(config_file).expanduser()
        if not path.is_file():
            bundled = ", ".join(available_recipes(recipes_dir))
            raise UserInputError(
                f"config file {config_file} does not exist (--config takes a YAML file; --recipe NAME a bundled "
                f"recipe: {bundled})"
            )
    elif recipe or default_recipe:
        path = resolve_recipe(recipe or default_recipe, recipes_dir)
    else:
        path = None
    raw = load_recipe(path) if path else {}
    method = _method_in(argv, raw.get("method"))
    config_class = config_class_for(method)
    parser = train_parser(config_class)
    values = parser.read_config(path, raw) if path else {}
    values = _without_unused_fields(values, method or config_fields(config_class)["method"].default, path)
    if path:
        values.setdefault("recipe", path.stem)
    return parser.parse(argv, values)


def build_config(
    recipe: str | None,
    overrides: dict[str, Any],
    recipes_dir: str | os.PathLike = RECIPES_DIR,
    default_recipe: str | None = None,
) -> ZeroSiamConfig:
    """A recipe (or none) + ``{field: value}`` overrides -> a validated config, through the command-line path."""
    argv = ["--recipe", recipe] if recipe else []
    for key, value in overrides.items():
        text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        argv += [f"--{key}", text]
    return parse_config(argv, recipes_dir, default_recipe)
