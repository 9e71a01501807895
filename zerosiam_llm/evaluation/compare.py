"""Comparing evaluation runs: per benchmark, each run's headline metric, the difference to the baseline (the first run)
and its paired bootstrap 95% interval over the shared problems.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from zerosiam_llm.errors import UserInputError
from zerosiam_llm.evaluation.metrics import headline_name
from zerosiam_llm.evaluation.reports import cell, pct
from zerosiam_llm.evaluation.run import RUN_CONFIG, read_results, read_run_config
from zerosiam_llm.files import (
    atomic_write_json,
    atomic_write_text,
)
from zerosiam_llm.grading import (
    avg_at_n,
    paired_bootstrap_diff,
)

# ---------------------------------------------------------------------------------------------------------------
# Comparing runs
# ---------------------------------------------------------------------------------------------------------------


COMPARISON_JSON = "comparison.json"
COMPARISON_MD = "comparison.md"


def _load_run_scores(run_dir: Path) -> tuple[dict[str, Any], dict[str, tuple[int, dict[str, float]]]]:
    """``(run config, {benchmark: (n, {problem id: per-problem headline score})})`` from a run's results files;
    only problems with all n graded samples count."""
    config = read_run_config(run_dir) if run_dir.is_dir() else None
    if config is None:
        raise UserInputError(f"{run_dir} is not an evaluation run (no {RUN_CONFIG}); pass run --output_dir folders")
    scores = {}
    for name, entry in config.get("benchmarks", {}).items():
        path = run_dir / f"{name}.jsonl"
        if not path.is_file():
            continue
        n = int(entry["settings"]["n"])
        by_problem: dict[str, dict[int, bool]] = {}
        for record in read_results(path):
            if not isinstance(record.get("correct"), bool):
                raise UserInputError(f"{path} has ungraded samples; re-run the evaluation command to grade them")
            by_problem.setdefault(record["problem_id"], {})[record["sample"]] = record["correct"]
        scores[name] = (
            n,
            {
                pid: avg_at_n([s[i] for i in range(n)])
                for pid, s in by_problem.items()
                if all(i in s for i in range(n))
            },
        )
    return config, scores


def compare_runs(run_dirs: Sequence[str | os.PathLike]) -> dict[str, Any]:
    """Each run against the first, per benchmark they share: the headline metric (accuracy when n = 1, else avg@n)
    of each on the problems both completed, the difference (run - first) and its paired bootstrap 95% interval."""
    if len(run_dirs) < 2:
        raise UserInputError("--compare needs at least two run folders (RUN_A RUN_B ...)")
    dirs = [Path(d).expanduser() for d in run_dirs]
    loaded = [_load_run_scores(d) for d in dirs]
    labels = []
    for d in dirs:
        label = d.name or str(d)
        labels.append(label if label not in labels else str(d))
    base_config, base_scores = loaded[0]
    runs = [
        {"label": label, "path": str(d), "model": cfg.get("model"), "adapter": cfg.get("adapter")}
        for label, d, (cfg, _) in zip(labels, dirs, loaded, strict=True)
    ]
    rows = []
    for label, (_, scores) in zip(labels[1:], loaded[1:], strict=True):
        for name, (n_a, per_a) in base_scores.items():
            if name not in scores:
                continue
            n_b, per_b = scores[name]
            shared = [pid for pid in per_a if pid in per_b]
            row: dict[str, Any] = {
                "benchmark": name,
                "run": label,
                "baseline": labels[0],
                "metric": headline_name(n_a) if n_a == n_b else "avg@n",
                "n_a": n_a,
                "n_b": n_b,
                "shared_problems": len(shared),
            }
            if shared:
                a, b = [per_a[p] for p in shared], [per_b[p] for p in shared]
                diff, lo, hi = paired_bootstrap_diff(a, b, seed=0)
                row.update(score_a=sum(a) / len(a), score_b=sum(b) / len(b), diff=diff, ci95=[lo, hi])
            rows.append(row)
    if not rows:
        raise UserInputError(f"the runs share no benchmark with results; {labels[0]} has {', '.join(base_scores)}")
    return {"runs": runs, "rows": rows}


def format_comparison_md(comparison: dict[str, Any]) -> str:
    lines = ["# Evaluation comparison", "", "| run | model | adapter | folder |", "|---|---|---|---|"]
    for run in comparison["runs"]:
        lines.append(
            f"| {cell(run['label'])} | `{cell(run['model'])}` | {cell(run['adapter'] or 'none')} | "
            f"{cell(run['path'])} |"
        )
    lines += [
        "",
        "| benchmark | metric | problems | A | score A | B | score B | B − A | 95% CI of B − A |",
        "|---|---|---:|---|---:|---|---:|---:|---|",
    ]
    for r in comparison["rows"]:
        if "diff" not in r:
            lines.append(
                f"| {r['benchmark']} | {r['metric']} | 0 | {cell(r['baseline'])} | – | {cell(r['run'])} | "
                "– | – | – |"
            )
            continue
        lines.append(
            f"| {r['benchmark']} | {r['metric']} | {r['shared_problems']} | {cell(r['baseline'])} | "
            f"{pct(r['score_a'])} | {cell(r['run'])} | {pct(r['score_b'])} | {100 * r['diff']:+.1f} | "
            f"{100 * r['ci95'][0]:+.1f} … {100 * r['ci95'][1]:+.1f} |"
        )
    lines += [
        "",
        "Scores in percent over the problems both runs completed; metric: accuracy (n = 1) or avg@n. The interval is "
        "a paired bootstrap over problems: when it excludes 0, the difference is unlikely to be resampling noise.",
        "",
    ]
    return "\n".join(lines)


def run_compare(args: argparse.Namespace) -> int:
    comparison = compare_runs(args.compare)
    text = format_comparison_md(comparison)
    if args.output_dir:
        out = Path(args.output_dir)
        atomic_write_json(out / COMPARISON_JSON, comparison)
        atomic_write_text(out / COMPARISON_MD, text)
    print(text)
    if args.output_dir:
        print(f"wrote {Path(args.output_dir) / COMPARISON_MD} and {COMPARISON_JSON}")
    return 0
