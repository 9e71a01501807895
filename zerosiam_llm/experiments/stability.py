"""The stability map: where does each method stay healthy as the learning rate grows?

    python scripts/stability_map.py --grid recipes/stability/final.yaml --data_dir ../shared/data \
        --output_dir outputs/stability

A grid file names a base recipe, the learning rates, seeds, streams and the configurations to compare (``tent``,
``zerosiam-adamw-x10``, ...: recipe fields each). Every cell (stream x configuration x learning rate x seed) is one
online-protocol run of ``train.py`` in its own folder: greedy predictions on a stream of ``batches`` batches, one
update per batch. Each finished run is classified from its logged metrics with the collapse guard's rules
(:data:`zerosiam_llm.monitoring.DEFAULT_GUARD_RULES`, replayed over ``metrics.jsonl``):

- **collapsed**: over the last :data:`FINAL_WINDOW` updates, H(p_r) is below the entropy rule's threshold, more than
  the dominance rule's share of tokens are predicted with p > 0.99, and the output is degenerate: the answer rate is
  below the answer-rate rule's threshold or the repeated 4-gram share above the repetition rule's. Entropy ~ 0, one
  dominant token, no answers or loops (a looping completion usually still ends in a number, which the answer
  extraction's last-number fallback counts as an answer, so loops are the common form on this model).
- **degraded**: not collapsed, but at least one guard rule fired; the first rule that fired and its update are kept.
- **healthy**: no guard rule fired on any update.

A killed sweep resumes: finished cells (``cell.json``) are skipped, an unfinished one reruns its ``train.py``
command, which itself resumes from the run's last checkpoint. ``stability.md``, ``stability.json`` and
``stability.png`` are rewritten after every cell.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zerosiam_llm.errors import UserInputError
from zerosiam_llm.files import atomic_write_json, atomic_write_text, load_yaml, read_jsonl
from zerosiam_llm.grading import wilson_interval
from zerosiam_llm.monitoring import DEFAULT_GUARD_RULES, GuardEvent, parse_guard_rules, replay_guard
from zerosiam_llm.plots import METRICS_FILE, series

FINAL_WINDOW = 3  # "final" values: the mean over the last 3 updates (one update is 8 answers: noisy)
CELL_FILE = "cell.json"
RUN_DIR = "run"  # the cell's train.py output_dir; cell.json, cell_args.json and train.log sit beside it
STREAM_SUMMARY = "stream_summary.json"

# The signs of a collapsed run, each with the threshold of the default guard rule on the same metric.
ENTROPY, DOMINANT = "zerosiam/entropy_target", "zerosiam/top1_above_099"
ANSWERS, REPETITION = "completions/answer_rate", "monitor/repetition"


def _rule_threshold(metric: str) -> tuple[str, float]:
    rule = next(r for r in DEFAULT_GUARD_RULES if r["metric"] == metric)
    return ("below", rule["below"]) if "below" in rule else ("above", rule["above"])


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


# ---------------------------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------------------------


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
    for name in configs:
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise UserInputError(f"grid file {path}: config name {name!r} must be a plain folder name")
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


# ---------------------------------------------------------------------------------------------------------------
# Classification of one run
# ---------------------------------------------------------------------------------------------------------------


def _numbers(rows: Sequence[Mapping[str, Any]], metric: str) -> list[float]:
    return series(rows, metric)[1]  # the finite values, in order


def _final(values: list[float]) -> float | None:
    return statistics.fmean(values[-FINAL_WINDOW:]) if values else None


def _ratio(values: list[float]) -> float | None:
    if not values or values[0] == 0:
        return None
    return statistics.fmean(values[-FINAL_WINDOW:]) / values[0]


def classify_run(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Verdict of one run from its logged step lines (``metrics.jsonl`` rows with ``step`` and ``loss``).

    Returns ``{"verdict", "rule", "update", "events"}``: ``rule`` / ``update`` name the first guard rule that fired
    and the update (step) at which it fired (None when healthy); ``events`` lists every event's message.
    """
    steps = [r for r in rows if "loss" in r and "step" in r]
    if not steps:
        raise UserInputError("no logged updates to classify (metrics.jsonl has no step lines)")
    events: list[GuardEvent] = replay_guard(steps, parse_guard_rules(DEFAULT_GUARD_RULES))
    window = steps[-FINAL_WINDOW:]
    signs = {}
    for metric in (ENTROPY, DOMINANT, ANSWERS, REPETITION):
        kind, threshold = _rule_threshold(metric)
        value = _final(_numbers(window, metric))
        signs[metric] = value is not None and (value < threshold if kind == "below" else value > threshold)
    if signs[ENTROPY] and signs[DOMINANT] and (signs[ANSWERS] or signs[REPETITION]):
        verdict = "collapsed"
    elif events:
        verdict = "degraded"
    else:
        verdict = "healthy"
    first = events[0] if events else None
    return {
        "verdict": verdict,
        "rule": f"{first.rule.metric} {first.rule.condition}" if first else None,
        "update": first.step if first else None,
        "events": [e.message for e in events],
    }


def run_metrics(rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any] | None) -> dict[str, Any]:
    """The figures a cell reports: final values (mean of the last updates), last/first ratios, stream accuracy."""
    steps = [r for r in rows if "loss" in r and "step" in r]
    out = {
        "updates": len(steps),
        "entropy_first": (_numbers(steps, ENTROPY) or [None])[0],
        "entropy_final": _final(_numbers(steps, ENTROPY)),
        "logit_norm_ratio": _ratio(_numbers(steps, "zerosiam/logit_norm_mean")),
        "repetition_final": _final(_numbers(steps, REPETITION)),
        "base_nll_ratio": _ratio(_numbers(steps, "coherence/base_nll")),
        "answer_rate_final": _final(_numbers(steps, ANSWERS)),
        "top1_above_099_final": _final(_numbers(steps, DOMINANT)),
        "predictor_deviation_final": _final(_numbers(steps, "zerosiam/predictor_deviation")),
    }
    summary = summary or {}
    out["problems"] = summary.get("problems")
    out["graded"] = summary.get("graded")
    out["correct"] = summary.get("correct")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Running the cells
# ---------------------------------------------------------------------------------------------------------------


def _stream_dir(cell_dir: Path) -> Path | None:
    """The online run (``cell_dir/run``) writes one folder per stream: the one with metrics.jsonl."""
    found = sorted(p.parent for p in (cell_dir / RUN_DIR).glob(f"*/{METRICS_FILE}"))
    return found[0] if found else None


def _count_updates(cell_dir: Path) -> int:
    stream = _stream_dir(cell_dir)
    if stream is None:
        return 0
    try:
        return sum(1 for r in read_jsonl(stream / METRICS_FILE) if "loss" in r)
    except UserInputError:  # a line being written: count again at the next poll
        return 0


def finish_cell(cell: Cell, cell_dir: Path, args: list[str]) -> dict[str, Any]:
    """Classify a finished run and write its ``cell.json`` (the mark that the cell is done)."""
    stream = _stream_dir(cell_dir)
    if stream is None or not (stream / STREAM_SUMMARY).is_file():
        raise UserInputError(f"{cell_dir} holds no finished online run (no {STREAM_SUMMARY})")
    rows = read_jsonl(stream / METRICS_FILE)
    summary = json.loads((stream / STREAM_SUMMARY).read_text())
    record = {
        "stream": cell.stream, "config": cell.config, "learning_rate": cell.learning_rate, "seed": cell.seed,
        "args": args, **classify_run(rows), **run_metrics(rows, summary),
    }  # fmt: skip
    atomic_write_json(cell_dir / CELL_FILE, record)
    return record


def _check_same_args(cell: Cell, cell_dir: Path, args: list[str]) -> None:
    spec = cell_dir / "cell_args.json"
    if spec.is_file():
        before = json.loads(spec.read_text())
        if before != args:
            raise UserInputError(
                f"cell {cell.name} in {cell_dir} was run with other settings; rename the config, or delete that folder"
            )
    else:
        cell_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(spec, args)


def run_grid(
    grid: Grid,
    output_dir: Path,
    train_command: Sequence[str],
    data_dir: str | None = None,
    threads: int | None = None,
    poll_seconds: float = 2.0,
) -> tuple[dict[Cell, dict[str, Any]], list[Cell]]:
    """Run every unfinished cell, one process at a time, rewriting the report after each; returns the finished
    records and the cells whose run failed (a failed cell does not stop the others; re-running retries it)."""
    from tqdm.auto import tqdm

    if "gsm8k" in grid.streams and not data_dir:
        raise UserInputError("the gsm8k stream needs --data_dir (a folder holding gsm8k_test.jsonl)")
    if data_dir and "gsm8k" in grid.streams and not (Path(data_dir) / "gsm8k_test.jsonl").is_file():
        raise UserInputError(f"--data_dir {data_dir} has no gsm8k_test.jsonl")
    cells = grid.cells()
    plans = []
    for cell in cells:
        cell_dir = cell.folder(output_dir)
        args = grid.cell_args(cell, data_dir)
        _check_same_args(cell, cell_dir, args)  # every cell checked before any work
        plans.append((cell, cell_dir, args))
    records: dict[Cell, dict[str, Any]] = {}
    todo = []
    for cell, cell_dir, args in plans:
        if (cell_dir / CELL_FILE).is_file():
            records[cell] = json.loads((cell_dir / CELL_FILE).read_text())
        else:
            todo.append((cell, cell_dir, args))
    print(f"[stability] {len(cells)} cells: {len(records)} finished, {len(todo)} to run", flush=True)
    write_report(grid, records, output_dir)
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    failed = []
    bar = tqdm(total=len(todo) * grid.batches, unit="update", desc="stability", dynamic_ncols=True)
    for i, (cell, cell_dir, args) in enumerate(todo, 1):
        bar.set_description(f"cell {i}/{len(todo)} {cell.name}")
        done_before = _count_updates(cell_dir)
        bar.update(done_before)
        log = cell_dir / "train.log"
        with open(log, "ab") as log_file:
            proc = subprocess.Popen([*train_command, *args, "--output_dir", str(cell_dir / RUN_DIR)], stdout=log_file,
                                    stderr=subprocess.STDOUT, env=env)  # fmt: skip
            seen = done_before
            while proc.poll() is None:
                time.sleep(poll_seconds)
                now = _count_updates(cell_dir)
                if now > seen:
                    bar.update(now - seen)
                    seen = now
        if proc.returncode != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
            bar.write(f"[stability] {cell.name} failed (exit {proc.returncode}): {tail[0]} (log: {log})")
            failed.append(cell)
            if proc.returncode == 2:  # bad input: every other cell would fail the same way
                raise UserInputError(f"{cell.name}: {tail[0].removeprefix('error: ')}")
            bar.update(grid.batches - seen)
            continue
        bar.update(max(grid.batches - seen, 0))
        records[cell] = finish_cell(cell, cell_dir, args)
        bar.write(f"[stability] {cell.name}: {_verdict_text(records[cell])}")
        write_report(grid, records, output_dir)
    bar.close()
    if failed:
        print(f"[stability] {len(failed)} cell(s) failed: {', '.join(c.name for c in failed)}; rerun to retry them",
              file=sys.stderr)  # fmt: skip
    return records, failed


# ---------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------


def _verdict_text(record: Mapping[str, Any]) -> str:
    if record["verdict"] == "degraded":
        return f"degraded ({record['rule']}, update {record['update']})"
    if record["verdict"] == "collapsed":
        return f"collapsed (first rule at update {record['update']})"
    return record["verdict"]


def _median(values: list[Any]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise_cells(grid: Grid, records: Mapping[Cell, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (stream, config, lr): verdicts over seeds, medians over seeds, pooled accuracy (Wilson 95%)."""
    rows = []
    for stream in grid.streams:
        for config in grid.configs:
            for lr in grid.learning_rates:
                runs = [records[c] for c in (Cell(stream, config, lr, s) for s in grid.seeds) if c in records]
                row = {
                    "stream": stream, "config": config, "learning_rate": lr, "seeds": len(grid.seeds),
                    "finished": len(runs), "healthy": sum(r["verdict"] == "healthy" for r in runs),
                    "verdicts": [_verdict_text(r) for r in runs], **_pooled_accuracy(runs),
                }  # fmt: skip
                for key in ("entropy_final", "logit_norm_ratio", "repetition_final", "base_nll_ratio",
                            "answer_rate_final", "predictor_deviation_final"):  # fmt: skip
                    row[key] = _median([r.get(key) for r in runs])
                # how long a run stayed clean: the update at which its first rule fired; a healthy run counts as
                # batches + 1 (it outlasted the stream); the lower median, so an even count never shows a half update
                updates = [r["update"] or grid.batches + 1 for r in runs]
                row["first_rule_update"] = statistics.median_low(updates) if updates else None
                rows.append(row)
    return rows


def healthy_range(rows: Sequence[Mapping[str, Any]], learning_rates: Sequence[float]) -> dict[str, Any]:
    """The widest run of consecutive grid learning rates at which every seed of a config is healthy.

    Each grid point stands for the band between its neighbours' geometric midpoints, so a range ``lo..hi`` on a
    grid of step ``s`` (x3 here) has width ``s * hi / lo``; one healthy point has width ``s``; none has width 0.
    Rows whose seeds are not all finished count as not healthy.
    """
    by_lr = {r["learning_rate"]: r for r in rows}
    ok = [lr for lr in learning_rates if lr in by_lr and by_lr[lr]["finished"] == by_lr[lr]["seeds"]
          and by_lr[lr]["healthy"] == by_lr[lr]["seeds"]]  # fmt: skip
    step = _grid_step(learning_rates)
    best: list[float] = []
    run: list[float] = []
    for lr in learning_rates:
        run = run + [lr] if lr in ok else []
        if len(run) > len(best):
            best = run
    if not best:
        return {"low": None, "high": None, "width": 0.0, "points": 0}
    return {"low": best[0], "high": best[-1], "width": step * best[-1] / best[0], "points": len(best)}


def _grid_step(learning_rates: Sequence[float]) -> float:
    if len(learning_rates) < 2:
        return 1.0
    return statistics.median(b / a for a, b in zip(learning_rates, learning_rates[1:], strict=False))


def _pooled_accuracy(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Accuracy of the rows' predictions pooled (their ``correct`` / ``graded`` summed), with a 95% Wilson interval."""
    correct = sum(r["correct"] or 0 for r in rows)
    graded = sum(r["graded"] or 0 for r in rows)
    if not graded:
        return {"accuracy": None, "correct": correct, "graded": 0, "ci95": None}
    return {"accuracy": correct / graded, "correct": correct, "graded": graded,
            "ci95": list(wilson_interval(correct, graded))}  # fmt: skip


def figure_of_merit(grid: Grid, summary: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per stream and config: the healthy range, its width, the width over the baseline's, and the pooled stream
    accuracy inside the range (all seeds)."""
    out = []
    for stream in grid.streams:
        ranges = {}
        for config in grid.configs:
            rows = [r for r in summary if r["stream"] == stream and r["config"] == config]
            rng = healthy_range(rows, grid.learning_rates)
            inside = [r for r in rows if rng["low"] is not None and rng["low"] <= r["learning_rate"] <= rng["high"]]
            ranges[config] = {"stream": stream, "config": config, **rng, **_pooled_accuracy(inside)}
        base = ranges.get(grid.baseline) if grid.baseline else None
        for config, rng in ranges.items():
            if base is None or config == grid.baseline:
                rng["width_vs_baseline"] = None
            elif base["width"] == 0:
                rng["width_vs_baseline"] = math.inf if rng["width"] > 0 else None
            else:
                rng["width_vs_baseline"] = rng["width"] / base["width"]
            out.append(rng)
    return out


def _f(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if value == math.inf:
        return "inf"
    return f"{value:.{digits}f}"


def _pct(acc: Mapping[str, Any]) -> str:
    if acc.get("accuracy") is None:
        return "-"
    low, high = acc["ci95"]
    return f"{100 * acc['accuracy']:.1f} ({acc['correct']}/{acc['graded']}) [{100 * low:.1f}, {100 * high:.1f}]"


def _first_rule(update: float | None, batches: int) -> str:
    if update is None:
        return "-"
    return f"> {batches}" if update > batches else f"{update:g}"


def map_tables(grid: Grid, summary: Sequence[Mapping[str, Any]]) -> list[str]:
    """The heat map as Markdown, one table per stream: config down, lr across; each cell "healthy/finished, first
    rule at (median update), accuracy % (pooled)"."""
    by_key = {(r["stream"], r["config"], r["learning_rate"]): r for r in summary}
    lines = []
    for stream in grid.streams:
        lines += [f"**{stream}** (healthy seeds / seeds run; median update of the first rule; accuracy %)", ""]
        lines.append("| config | " + " | ".join(f"lr {lr:g}" for lr in grid.learning_rates) + " |")
        lines.append("|---|" + "---|" * len(grid.learning_rates))
        for config in grid.configs:
            cells = []
            for lr in grid.learning_rates:
                r = by_key[(stream, config, lr)]
                if not r["finished"]:
                    cells.append("not run")
                    continue
                acc = "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}%"
                rule = _first_rule(r["first_rule_update"], grid.batches)
                cells.append(
                    f"{r['healthy']}/{r['finished']}, rule {rule if rule.startswith('>') else '@' + rule}, {acc}"
                )
            lines.append(f"| {config} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def report_markdown(grid: Grid, summary: Sequence[Mapping[str, Any]], merit: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        "# Stability map",
        "",
        f"Online protocol, recipe `{grid.recipe}`, {grid.batches} batches of {grid.stream_batch_size} problems "
        f"per run (greedy predictions, one update per batch), seeds {', '.join(map(str, grid.seeds))}. Verdicts from "
        "the collapse guard's default rules replayed over each run's metrics (see `zerosiam_llm/stability.py`). Final "
        f"values are the mean of the last {FINAL_WINDOW} updates, ratios are final / first update; medians over "
        f'seeds; "first rule at" is the lower median of the update at which each run\'s first guard rule fired '
        f"(> {grid.batches}: none fired). Accuracy: the stream's recorded predictions, all seeds pooled, 95% Wilson "
        "interval.",
        "",
        "## Healthy learning-rate range",
        "",
        f"Widest run of grid learning rates where every seed is healthy; width = step x high / low (grid step "
        f"x{_grid_step(grid.learning_rates):g}); ratio against the baseline `{grid.baseline}`; accuracy pooled over "
        "the range.",
        "",
        "| stream | config | healthy range | width | vs baseline | accuracy % in range |",
        "|---|---|---|---|---|---|",
    ]
    for m in merit:
        rng = "none" if m["low"] is None else f"{m['low']:g} .. {m['high']:g}"
        lines.append(f"| {m['stream']} | {m['config']} | {rng} | {_f(m['width'], 1)} | "
                     f"{_f(m['width_vs_baseline'], 1)} | {_pct(m)} |")  # fmt: skip
    lines += ["", "## Map", ""]
    lines += map_tables(grid, summary)
    lines += [
        "",
        "## Cells",
        "",
        "| stream | config | lr | healthy | verdicts | first rule at | H(p_r) final | logit norm x | repetition "
        "| base NLL x | answer rate | accuracy % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        verdicts = "; ".join(r["verdicts"]) if r["verdicts"] else "not run"
        healthy = f"{r['healthy']}/{r['seeds']}" + ("" if r["finished"] == r["seeds"] else f" ({r['finished']} run)")
        lines.append(
            f"| {r['stream']} | {r['config']} | {r['learning_rate']:g} | {healthy} | {verdicts} | "
            f"{_first_rule(r['first_rule_update'], grid.batches)} | "
            f"{_f(r['entropy_final'])} | {_f(r['logit_norm_ratio'])} | {_f(r['repetition_final'])} | "
            f"{_f(r['base_nll_ratio'])} | {_f(r['answer_rate_final'])} | {_pct(r)} |"
        )
    return "\n".join(lines) + "\n"


def write_report(grid: Grid, records: Mapping[Cell, Mapping[str, Any]], output_dir: Path) -> None:
    """``stability.md``, ``stability.json`` and ``stability.png`` from the finished cells (rewritten each time)."""
    from zerosiam_llm.plots import plot_stability_map

    summary = summarise_cells(grid, records)
    merit = figure_of_merit(grid, summary)
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / "stability.md", report_markdown(grid, summary, merit))
    payload = {
        "grid": {k: getattr(grid, k) for k in GRID_FIELDS},
        "cells": [dict(r) for r in records.values()],
        "summary": summary,
        "healthy_range": merit,
    }
    atomic_write_text(output_dir / "stability.json", json.dumps(payload, indent=1, default=_json_default) + "\n")
    if records:
        plot_stability_map(
            summary, grid.streams, list(grid.configs), grid.learning_rates, output_dir / "stability.png", grid.batches
        )


def _json_default(value: Any) -> Any:
    raise TypeError(f"not JSON-serialisable: {value!r}")


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2, through run_cli
        raise UserInputError(message)


def main(argv: list[str] | None = None) -> int:
    """The command line; each cell runs ``python -m zerosiam_llm ...`` (the training command) in its own process."""
    from zerosiam_llm.errors import run_cli

    def _main(args: list[str]) -> int:
        parser = _Parser(prog="python scripts/stability_map.py", description=__doc__.split("\n\n")[0])
        parser.add_argument(
            "--grid", type=Path, required=True, help="grid file (YAML), e.g. recipes/stability/final.yaml"
        )
        parser.add_argument("--output_dir", type=Path, default=Path("outputs/stability"), help="cells and reports")
        parser.add_argument("--data_dir", default=None, help="folder with gsm8k_test.jsonl (the gsm8k stream)")
        parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each run (default: all)")
        parser.add_argument("--report_only", action="store_true", help="rewrite the reports from finished cells")
        ns = parser.parse_args(args)
        grid = load_grid(ns.grid)
        if ns.report_only:
            records = {}
            for cell in grid.cells():
                path = cell.folder(ns.output_dir) / CELL_FILE
                if path.is_file():
                    records[cell] = json.loads(path.read_text())
            write_report(grid, records, ns.output_dir)
        else:
            from zerosiam_llm.online import TRAIN_COMMAND  # here: a bad grid file is refused without loading torch+trl

            _, failed = run_grid(grid, ns.output_dir, list(TRAIN_COMMAND), ns.data_dir, ns.threads)
            if failed:
                return 1
        print((ns.output_dir / "stability.md").read_text())
        return 0

    return run_cli(_main, argv)
