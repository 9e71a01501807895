"""Markdown reports: one run's ``summary.md``, and the comparison of runs with paired bootstrap intervals.
"""

from __future__ import annotations

from typing import Any


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def format_summary_md(summary: dict[str, Any]) -> str:
    """The summary as Markdown a person reads: the setup, then one row per benchmark."""
    grader = summary["grader"]
    gen = summary.get("generation") or {}
    gen_text = ", ".join(f"{k} {v}" for k, v in gen.items() if k != "backend")
    placement = summary["prompt"]["instruction_placement"]
    where = "as the system turn" if placement == "system" else "appended to the user turn"
    lines = [
        "# Evaluation summary",
        "",
        "| setting | value |",
        "|---|---|",
        f"| model | `{cell(summary['model'])}` |",
        f"| adapter | {'`' + cell(summary['adapter']) + '`' if summary.get('adapter') else 'none'} |",
        f"| generation | {gen.get('backend', summary.get('backend'))}{' (' + gen_text + ')' if gen_text else ''} |",
        f'| prompt | the model\'s chat template; instruction {where}: "{cell(summary["prompt"]["instruction"])}" '
        "(each rendered prompt is stored verbatim in `<benchmark>.jsonl`) |",
        f"| grader | {grader['name']} {grader['version']}, {grader['rule']}, {grader['deadline_s']:g} s deadline per "
        f"answer; answer = {cell(grader['extraction'])} |",
        "",
        "| benchmark | problems | decoding | score | 95% CI | pass@k | maj@n | no answer | truncated | mean tokens |",
        "|---|---:|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for m in summary["benchmarks"].values():
        n = m["n_samples"]
        passes = ", ".join(f"@{k} {pct(v)}" for k, v in m["pass@k"].items()) if n > 1 else "–"
        cells = [
            cell(m["display_name"]),
            f"{m['n_problems']} / {m['dataset_size']}",
            cell(m["protocol"]["decoding"]),
            f"{m['headline']} {pct(m['score'])}",
            f"{pct(m['ci95'][0])} – {pct(m['ci95'][1])}",
            passes,
            pct(m[f"maj@{n}"]) if n > 1 else "–",
            pct(m["extraction_failure_rate"]),
            pct(m["truncation_rate"]),
            f"{m['mean_completion_tokens']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Scores and rates are percentages. score: accuracy of the first sample when n = 1, else avg@n (mean over the "
        "n samples); 95% CI: bootstrap over problems. pass@k: unbiased estimator; maj@n: majority vote with answers "
        "clustered by math-verify equivalence. no answer: samples with nothing extractable; truncated: samples cut "
        "by max_new_tokens.",
        "",
    ]
    return "\n".join(lines)
