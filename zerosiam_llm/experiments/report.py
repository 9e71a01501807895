"""The stability reports: per configuration and learning rate the verdicts over seeds, each configuration's
healthy range against the baseline's, and ``stability.md`` / ``.json`` / ``.png``."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from zerosiam_llm.experiments.classify import FINAL_WINDOW
from zerosiam_llm.experiments.grid import GRID_FIELDS, Cell, Grid
from zerosiam_llm.files import atomic_write_text
from zerosiam_llm.grading import wilson_interval


def verdict_text(record: Mapping[str, Any]) -> str:
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
                    "verdicts": [verdict_text(r) for r in runs], **_pooled_accuracy(runs),
                    "model_never_moved": sum(grid.lr_unused(config, r) is not None for r in runs),
                    # copies of a run at another lr (same_run_as): pooled over a range, each run counts once
                    "copied_correct": sum(r["correct"] or 0 for r in runs if r.get("same_run_as")),
                    "copied_graded": sum(r["graded"] or 0 for r in runs if r.get("same_run_as")),
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
    Rows whose seeds are not all finished count as not healthy. ``width_if_rest_healthy`` is the width the range
    would reach if every seed still to run came out healthy, so a map in progress says which ranges are still open
    (``open``: ``cells_to_run`` > 0 and a larger best case) and which no remaining cell can change.
    """
    by_lr = {r["learning_rate"]: r for r in rows}

    def widest(ok: list[float]) -> list[float]:
        best: list[float] = []
        run: list[float] = []
        for lr in learning_rates:
            run = run + [lr] if lr in ok else []
            if len(run) > len(best):
                best = run
        return best

    def points(rest_healthy: bool) -> list[float]:
        return [lr for lr, r in by_lr.items() if r["healthy"] == r["finished"]
                and (r["finished"] == r["seeds"] or rest_healthy)]  # fmt: skip

    step = _grid_step(learning_rates)
    best, best_case = widest(points(False)), widest(points(True))
    out = {"low": None, "high": None, "width": 0.0, "points": 0}
    if best:
        out = {"low": best[0], "high": best[-1], "width": step * best[-1] / best[0], "points": len(best)}
    out["width_if_rest_healthy"] = step * best_case[-1] / best_case[0] if best_case else 0.0
    out["open"] = out["width_if_rest_healthy"] > out["width"]
    out["cells_finished"] = sum(r["finished"] for r in rows)
    out["cells_to_run"] = sum(r["seeds"] - r["finished"] for r in rows)
    return out


def _grid_step(learning_rates: Sequence[float]) -> float:
    if len(learning_rates) < 2:
        return 1.0
    return statistics.median(b / a for a, b in zip(learning_rates, learning_rates[1:], strict=False))


def _pooled_accuracy(rows: Sequence[Mapping[str, Any]], distinct_runs: bool = False) -> dict[str, Any]:
    """Accuracy of the rows' predictions pooled (their ``correct`` / ``graded`` summed), with a 95% Wilson interval.
    ``distinct_runs``: leave out the copies of a run made at another lr (``same_run_as``), so that pooling rows over
    lrs counts each run's predictions once, not once per lr (which would narrow the interval without new data)."""
    correct = sum((r["correct"] or 0) - (r.get("copied_correct", 0) if distinct_runs else 0) for r in rows)
    graded = sum((r["graded"] or 0) - (r.get("copied_graded", 0) if distinct_runs else 0) for r in rows)
    if not graded:
        return {"accuracy": None, "correct": correct, "graded": 0, "ci95": None}
    return {"accuracy": correct / graded, "correct": correct, "graded": graded,
            "ci95": list(wilson_interval(correct, graded))}  # fmt: skip


def figure_of_merit(grid: Grid, summary: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per stream and config: the healthy range, its width, the width over the baseline's, and the pooled stream
    accuracy inside the range (all seeds); ``no_op`` when no finished run moved the model (:meth:`Grid.lr_unused`)."""
    out = []
    for stream in grid.streams:
        ranges = {}
        for config in grid.configs:
            rows = [r for r in summary if r["stream"] == stream and r["config"] == config]
            rng = healthy_range(rows, grid.learning_rates)
            inside = [r for r in rows if rng["low"] is not None and rng["low"] <= r["learning_rate"] <= rng["high"]]
            pooled = _pooled_accuracy(inside, distinct_runs=True)
            ranges[config] = {"stream": stream, "config": config, **rng, **pooled}
            # every run left the model as it was: the base model's verdicts, a range that measures no stability
            ranges[config]["no_op"] = rng["cells_finished"] > 0 and all(
                r.get("model_never_moved", 0) == r["finished"] for r in rows
            )
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


def _predictions(grid: Grid) -> str:
    """How the scored answers were made: greedy, except configs that sample k > 1 rollouts (the GRPO methods)."""
    sampled = []
    for name, fields in grid.configs.items():
        merged = {**grid.overrides, **fields}
        if int(merged.get("num_rollouts", 1)) > 1:
            sampled.append(f"{name} k={merged['num_rollouts']} T={merged.get('temperature', 'recipe')}")
    if not sampled:
        return "greedy predictions"
    return f"greedy predictions, except the majority answer of k sampled rollouts for {', '.join(sampled)}"


def machines_line(records: Mapping[Cell, Mapping[str, Any]]) -> list[str]:
    """Where the cells ran, when they recorded it (cells from before the record was kept count as not recorded):
    numerics, and so borderline verdicts, can differ between CPUs."""
    counts: dict[str, int] = {}
    for r in records.values():
        m = r.get("machine")
        key = "not recorded" if m is None else f"{m['cpu']}, {m['threads']} threads, torch {m['torch']}"
        counts[key] = counts.get(key, 0) + 1
    if set(counts) <= {"not recorded"}:
        return []
    return ["", "Cells ran on: " + "; ".join(f"{k} ({n} cells)" for k, n in sorted(counts.items())) + "."]


def report_markdown(
    grid: Grid,
    summary: Sequence[Mapping[str, Any]],
    merit: Sequence[Mapping[str, Any]],
    records: Mapping[Cell, Mapping[str, Any]] | None = None,
) -> str:
    lines = [
        "# Stability map",
        "",
        f"Online protocol, recipe `{grid.recipe}`, {grid.batches} batches of {grid.stream_batch_size} problems "
        f"per run ({_predictions(grid)}, one update per batch), seeds {', '.join(map(str, grid.seeds))}. "
        "Verdicts from the collapse guard's default rules replayed over each run's metrics (see "
        "`zerosiam_llm/monitoring/guard.py`). Final "
        f"values are the mean of the last {FINAL_WINDOW} updates, ratios are final / first update; medians over "
        f'seeds; "first rule at" is the lower median of the update at which each run\'s first guard rule fired '
        f"(> {grid.batches}: none fired). Accuracy: the stream's recorded predictions, all seeds pooled, 95% Wilson "
        "interval.",
        *machines_line(records or {}),
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
    open_configs = {(m["stream"], m["config"]) for m in merit if m["open"]}
    for m in merit:
        width, ratio = _f(m["width"], 1), _f(m["width_vs_baseline"], 1)
        if not m.get("cells_finished", 1):
            rng, width, ratio = "not run", "-", "-"
        else:
            rng = "none" if m["low"] is None else f"{m['low']:g} .. {m['high']:g}"
        if m["open"] and width != "-":
            width += f" (up to {_f(m['width_if_rest_healthy'], 1)}: {m['cells_to_run']} cells to run)"
        if ratio != "-" and open_configs & {(m["stream"], m["config"]), (m["stream"], grid.baseline)}:
            ratio += " (open)"
        if m.get("no_op"):
            ratio = "no-op"
        lines.append(f"| {m['stream']} | {m['config']} | {rng} | {width} | {ratio} | {_pct(m)} |")
    if open_configs:
        lines += ["", "Some cells have not run: \"up to W\" is the width a range would reach if every seed still to "
                  "run came out healthy, and a ratio involving such an open range is marked (open); no remaining cell "
                  "can change the other ranges."]  # fmt: skip
    no_op = sorted({m["config"] for m in merit if m.get("no_op")})
    if no_op:
        lines += ["", f"No run of {', '.join(f'`{c}`' for c in no_op)} moved the model (`method: none`, or no update "
                  "had a gradient: `grad_norm_max` 0 in `cell.json`): its verdicts are the base model's own, one run "
                  "per seed stands for every lr (`same_run_as`), and its range, marked no-op, is that of no "
                  "adaptation, not a measure of stability."]  # fmt: skip
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
    from zerosiam_llm.experiments.plots import plot_stability_map

    summary = summarise_cells(grid, records)
    merit = figure_of_merit(grid, summary)
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / "stability.md", report_markdown(grid, summary, merit, records))
    payload = {
        "grid": {k: getattr(grid, k) for k in GRID_FIELDS},
        "cells": [dict(r) for r in records.values()],
        "summary": summary,
        "healthy_range": merit,
    }
    atomic_write_text(output_dir / "stability.json", json.dumps(payload, indent=1, default=_json_default) + "\n")
    if records:
        png = output_dir / "stability.png"
        plot_stability_map(summary, grid.streams, list(grid.configs), grid.learning_rates, png, grid.batches, merit,
                           grid.baseline)  # fmt: skip


def _json_default(value: Any) -> Any:
    raise TypeError(f"not JSON-serialisable: {value!r}")
