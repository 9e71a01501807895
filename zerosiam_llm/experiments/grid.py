"""A stability grid file: the base recipe, learning rates, seeds, streams and configurations, and the cells
(stream x configuration x learning rate x seed) it expands to, each one ``train.py`` command."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zerosiam_llm.errors import UserInputError
from zerosiam_llm.files import load_yaml
from zerosiam_llm.methods import METHODS

# Streams a grid may name: recipe fields; {data_dir} is filled in from --data_dir.
STREAMS: dict[str, dict[str, Any]] = {
    "arithmetic": {"dataset": "generated:arithmetic", "answer_field": "answer", "answer_style": "plain"},
    "gsm8k": {
        "dataset": "{data_dir}/gsm8k_test.jsonl",
        "question_field": "question",
        "answer_field": "answer",
        "answer_style": "gsm8k",
    },
}
GRID_FIELDS = ("recipe", "batches", "stream_batch_size", "learning_rates", "seeds", "streams", "baseline", "overrides",
               "configs")  # fmt: skip


@dataclass(frozen=True)
class Cell:
    stream: str
    config: str
    learning_rate: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.stream} {self.config} lr {self.learning_rate:g} seed {self.seed}"

    def folder(self, root: Path) -> Path:
        return root / self.stream / self.config / f"lr{self.learning_rate:g}" / f"seed{self.seed}"


@dataclass
class Grid:
    recipe: str
    learning_rates: list[float]
    seeds: list[int]
    streams: list[str]
    configs: dict[str, dict[str, Any]]
    batches: int = 16
    stream_batch_size: int = 8
    baseline: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    run_order: list[float] = field(default_factory=list)  # learning rates as the grid file lists them

    def __post_init__(self) -> None:
        self.run_order = self.run_order or list(self.learning_rates)
        self.learning_rates = sorted(self.learning_rates)  # reports: ascending

    def cells(self) -> list[Cell]:
        """Run order: learning rate in the grid file's order, then seed, stream, configuration. List first the
        learning rates where the methods part: a sweep stopped early has every seed and stream of those, with the
        methods compared on the same cells."""
        return [
            Cell(stream, config, lr, seed)
            for lr in self.run_order
            for seed in self.seeds
            for stream in self.streams
            for config in self.configs
        ]

    def updates(self, config: str) -> bool:
        """Whether the config updates the model. ``method: none`` (the online baseline: the same stream and
        predictions, no update) does not, so its learning rate is unused and one run per seed stands for every lr."""
        return {**self.overrides, **self.configs[config]}.get("method") != "none"

    def lr_unused(self, config: str, record: Mapping[str, Any]) -> str | None:
        """Why a finished cell's run would be the same at any learning rate, or None. Its config never updates
        (``method: none``), or no update had a gradient (``grad_norm_max`` 0.0, e.g. GRPO whose every group had equal
        rewards) and no predictor moved: weight decay acts on a zero gradient too, which would pull a full predictor
        off I, but LoRA's B starts at zero and stays there, so the adapter stays a no-op and the lr never enters."""
        if not self.updates(config):
            return "method none"
        if record.get("grad_norm_max") == 0.0 and not record.get("predictor_deviation_final"):
            return "no update had a gradient"
        return None

    def cell_args(self, cell: Cell, data_dir: str | None) -> list[str]:
        """The ``train.py`` arguments of one cell (everything but ``--output_dir``)."""
        fields: dict[str, Any] = {"protocol": "online", **self.overrides}
        fields.update({k: v.format(data_dir=data_dir) if isinstance(v, str) else v
                       for k, v in STREAMS[cell.stream].items()})  # fmt: skip
        fields.update(self.configs[cell.config])
        fields.update({
            "learning_rate": cell.learning_rate,
            "seed": cell.seed,  # LoRA initialisation (and the generated problems)
            "stream_seed": cell.seed,  # stream order
            "stream_batch_size": self.stream_batch_size,
            "num_problems": self.batches * self.stream_batch_size,
            "compare_methods": None,
        })  # fmt: skip
        args = ["--recipe", self.recipe]
        for key, value in fields.items():
            args += [f"--{key}", _cli_value(value)]
        return args


def _cli_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, dict)):
        return json.dumps(value)  # YAML flow style
    return f"{value:g}" if isinstance(value, float) else str(value)


def _positive_int(raw: Any, where: str) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise UserInputError(f"{where} must be an integer >= 1, got {raw!r}")
    return raw


def load_grid(path: str | os.PathLike) -> Grid:
    """Read and validate a grid file; one-line errors naming the file and field."""
    raw = load_yaml(path, "grid file")
    if not isinstance(raw, Mapping):
        raise UserInputError(f"grid file {path} must be a mapping with fields {', '.join(GRID_FIELDS)}")
    unknown = [k for k in raw if k not in GRID_FIELDS]
    if unknown:
        raise UserInputError(
            f"grid file {path}: {unknown[0]!r} is not a grid field; allowed: {', '.join(GRID_FIELDS)}"
        )
    for key in ("recipe", "learning_rates", "seeds", "streams", "configs"):
        if raw.get(key) in (None, [], {}):
            raise UserInputError(f"grid file {path}: {key} is missing or empty")
    lrs = raw["learning_rates"]
    if not isinstance(lrs, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in lrs
    ):
        raise UserInputError(f"grid file {path}: learning_rates must be a list of numbers > 0, got {lrs!r}")
    if len(set(lrs)) < len(lrs):
        raise UserInputError(f"grid file {path}: learning_rates has a repeated value: {lrs!r}")
    seeds = raw["seeds"]
    if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise UserInputError(f"grid file {path}: seeds must be a list of integers, got {seeds!r}")
    streams = raw["streams"]
    if not isinstance(streams, list) or any(s not in STREAMS for s in streams):
        raise UserInputError(f"grid file {path}: streams must be a list from {', '.join(STREAMS)}, got {streams!r}")
    configs = raw["configs"]
    if not isinstance(configs, Mapping) or not all(isinstance(v, Mapping) for v in configs.values()):
        raise UserInputError(
            f"grid file {path}: configs must map each name to recipe fields, e.g. tent: {{method: tent}}"
        )
    for name, fields in configs.items():
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise UserInputError(f"grid file {path}: config name {name!r} must be a plain folder name")
        if fields.get("method", "zerosiam") not in METHODS:
            raise UserInputError(f"grid file {path}: config {name}: method {fields['method']!r} is not one of "
                                 f"{', '.join(METHODS)}")  # fmt: skip
    baseline = raw.get("baseline")
    if baseline is not None and baseline not in configs:
        raise UserInputError(
            f"grid file {path}: baseline {baseline!r} is not one of the configs ({', '.join(configs)})"
        )
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, Mapping):
        raise UserInputError(f"grid file {path}: overrides must be a mapping of recipe fields")
    return Grid(
        recipe=str(raw["recipe"]),
        learning_rates=[float(v) for v in lrs],
        seeds=list(seeds),
        streams=list(streams),
        configs={str(k): dict(v) for k, v in configs.items()},
        batches=_positive_int(raw.get("batches", 16), f"grid file {path}: batches"),
        stream_batch_size=_positive_int(raw.get("stream_batch_size", 8), f"grid file {path}: stream_batch_size"),
        baseline=baseline,
        overrides=dict(overrides),
    )
