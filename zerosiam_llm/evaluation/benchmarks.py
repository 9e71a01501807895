"""The benchmark registry (``benchmarks.yaml``, shipped in the package) and loading a benchmark's problems from a local
file (``--data_dir`` / ``--data_file``) or the Hub.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zerosiam_llm.errors import UserInputError
from zerosiam_llm.files import (
    load_yaml,
)
from zerosiam_llm.grading import (
    GOLD_STYLES,
)

BENCHMARKS_FILE = Path(__file__).resolve().parent / "benchmarks.yaml"  # shipped in the package


# ---------------------------------------------------------------------------------------------------------------
# Benchmark definitions (zerosiam_llm/benchmarks.yaml, shipped in the package)
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: where its problems live, how to read the gold answer, and its default decoding."""

    name: str
    display_name: str
    hub_id: str
    split: str
    question_field: str
    answer_field: str
    answer_style: str
    local_file: str
    config: str | None = None
    id_field: str | None = None
    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 4096


_REQUIRED_FIELDS = ("hub_id", "split", "question_field", "answer_field", "answer_style", "local_file")


def load_benchmarks(path: str | os.PathLike) -> dict[str, Benchmark]:
    """Read the benchmark definitions (name -> :class:`Benchmark`) from a YAML file."""
    path = Path(path)
    data = load_yaml(path, "benchmarks file")
    if not isinstance(data, dict) or not data:
        raise UserInputError(f"benchmarks file {path} must map benchmark names to their definitions")
    known = {f.name for f in dataclasses.fields(Benchmark)} - {"name"}
    benchmarks = {}
    for name, spec in data.items():
        if not isinstance(spec, dict):
            raise UserInputError(f"benchmarks file {path}: {name} must be a mapping of fields")
        unknown = sorted(set(spec) - known)
        if unknown:
            raise UserInputError(f"benchmarks file {path}: {name}: unknown fields {unknown}; known: {sorted(known)}")
        missing = [f for f in _REQUIRED_FIELDS if not spec.get(f)]
        if missing:
            raise UserInputError(f"benchmarks file {path}: {name} lacks {', '.join(missing)}")
        if spec["answer_style"] not in GOLD_STYLES:
            raise UserInputError(
                f"benchmarks file {path}: {name}.answer_style must be one of {', '.join(GOLD_STYLES)}"
            )
        benchmarks[str(name)] = Benchmark(name=str(name), **{"display_name": str(name), **spec})
    return benchmarks


def find_benchmarks_file(explicit: str | os.PathLike | None = None) -> Path:
    """The benchmarks file: ``--benchmarks_file``, else the definitions shipped in the package (any folder works)."""
    if explicit is None:
        return BENCHMARKS_FILE
    path = Path(explicit).expanduser()
    if not path.is_file():
        raise UserInputError(f"benchmarks file {path} does not exist")
    return path


def select_benchmarks(
    names: str, benchmarks: dict[str, Benchmark], data_dir: str | None = None, data_files: Iterable[str] = ()
) -> list[Benchmark]:
    """``"math500,aime24"`` (or ``all``) -> benchmarks, in the order given; unknown names list the known ones.

    ``all`` with a ``data_dir`` means every benchmark with its data there (its ``local_file``, or a ``data_files``
    entry): the others would need the Hub, which a local run asked not to use; a note names them. A benchmark
    named explicitly is always kept (and refused later if its file is missing).
    """
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    if wanted == ["all"]:
        if data_dir is None:
            return list(benchmarks.values())
        present = [b for b in benchmarks.values() if b.name in data_files or (Path(data_dir) / b.local_file).is_file()]
        if not present:
            raise UserInputError(
                f"--benchmarks all: --data_dir {data_dir} holds none of the benchmark files "
                f"({', '.join(b.local_file for b in benchmarks.values())})"
            )
        skipped = [b for b in benchmarks.values() if b not in present]
        if skipped:
            print(f"note: --benchmarks all with --data_dir {data_dir}: skipping "
                  f"{', '.join(f'{b.name} (no {b.local_file})' for b in skipped)}")  # fmt: skip
        return present
    if not wanted:
        raise UserInputError(f"--benchmarks is empty; known benchmarks: {', '.join(benchmarks)}")
    unknown = [n for n in wanted if n not in benchmarks]
    if unknown:
        raise UserInputError(f"unknown benchmark {unknown[0]!r}; known benchmarks: {', '.join(benchmarks)} (or all)")
    return [benchmarks[n] for n in dict.fromkeys(wanted)]


# ---------------------------------------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------------------------------------


def _hub_hint(bench: Benchmark) -> str:
    return f"--data_dir DIR holding {bench.local_file} (the names in shared/data/), or --data_file {bench.name}=PATH"


def load_benchmark_problems(
    bench: Benchmark, data_dir: str | None = None, data_file: str | None = None
) -> tuple[list[dict[str, Any]], str]:
    """``(problems, source)``: every problem (``id``, ``question``, ``answer`` = gold string) of a benchmark, from
    ``data_file``, ``data_dir/<local_file>`` or the Hub, in data set order."""
    from zerosiam_llm.data import load_problems

    if data_file is not None or data_dir is not None:
        path = Path(data_file) if data_file is not None else Path(data_dir) / bench.local_file
        path = path.expanduser()
        if not path.is_file():
            flag = f"--data_file {bench.name}=..." if data_file is not None else f"--data_dir {data_dir}"
            raise UserInputError(
                f"benchmark {bench.name}: no data file at {path} (from {flag}); pass {_hub_hint(bench)}, or leave "
                f"both out to download {bench.hub_id} from the Hub (needs network)"
            )
        source = str(path.resolve())
    else:
        source = bench.hub_id
    try:
        problems = load_problems(
            source,
            question_field=bench.question_field,
            answer_field=bench.answer_field,
            id_field=bench.id_field,
            split=bench.split,
            config_name=bench.config,
            answer_style=bench.answer_style,
        )
    except UserInputError as err:
        if source == bench.hub_id and str(err).startswith("cannot load data set"):
            raise UserInputError(
                f"benchmark {bench.name}: {err}. Without network access pass {_hub_hint(bench)}"
            ) from None
        raise UserInputError(f"benchmark {bench.name}: {err}") from None
    missing_gold = [p["id"] for p in problems if not p.get("answer")]
    if missing_gold:
        raise UserInputError(f"benchmark {bench.name}: problem {missing_gold[0]} has no gold answer")
    ids = [p["id"] for p in problems]
    if len(set(ids)) != len(ids):
        raise UserInputError(f"benchmark {bench.name}: problem ids in {bench.id_field!r} are not unique in {source}")
    if source == bench.hub_id:
        source = f"{bench.hub_id} ({bench.config + ', ' if bench.config else ''}split {bench.split})"
    return problems, source
