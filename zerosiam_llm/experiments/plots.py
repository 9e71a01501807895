"""Collapse curves of one or more runs, from their ``metrics.jsonl``, and a first -> last summary table.

    python -m zerosiam_llm.experiments.plots outputs/tent outputs/zerosiam --output curves.png \
        --labels "tent lr 3e-4,zerosiam"

Draws a grid of the signals that tell a healthy adaptation from a collapsing one (``shared/DESIGN.md`` §1): H(p_r)
and H(p_o), logit norm, repetition, answer dominance, answer rate, base-model NLL, monitor accuracy and predictor
deviation; runs are overlaid, panels with no data are left out. The Markdown table is printed on stdout.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

from zerosiam_llm.errors import UserInputError
from zerosiam_llm.files import atomic_path, read_jsonl
from zerosiam_llm.run_dir import METRICS_FILE

FORMATS = ("png", "pdf", "svg")

# (panel title, [(metric, series name or "" for a single series)])
PANELS: list[tuple[str, list[tuple[str, str]]]] = [
    ("entropy (nats)", [("zerosiam/entropy_target", "H(p_r)"), ("zerosiam/entropy_online", "H(p_o)")]),
    ("logit norm (mean)", [("zerosiam/logit_norm_mean", "")]),
    ("repeated 4-gram share", [("monitor/repetition", "")]),
    ("answer dominance", [("monitor/dominance", "")]),
    ("answer rate", [("completions/answer_rate", "")]),
    ("base-model NLL (nats/token)", [("coherence/base_nll", "")]),
    ("monitor accuracy", [("monitor/accuracy", "")]),
    ("predictor deviation", [("zerosiam/predictor_deviation", "")]),
]
LINESTYLES = ("-", "--", ":", "-.")
SHARES = ("repeated 4-gram share", "answer dominance", "answer rate", "monitor accuracy")  # plotted on [0, 1]

# (column header, metric) of the collapse / drift table
TABLE_COLUMNS: list[tuple[str, str]] = [
    ("H(p_r)", "zerosiam/entropy_target"),
    ("logit norm", "zerosiam/logit_norm_mean"),
    ("repetition", "monitor/repetition"),
    ("dominance", "monitor/dominance"),
    ("answer rate", "completions/answer_rate"),
    ("base NLL", "coherence/base_nll"),
    ("accuracy", "monitor/accuracy"),
    ("predictor dev.", "zerosiam/predictor_deviation"),
]


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def load_step_lines(run_dir: str | Path) -> list[dict]:
    """The step lines (those with a ``loss`` key) of a run's ``metrics.jsonl``; one-line errors for bad runs."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserInputError(f"run directory {run_dir} does not exist")
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise UserInputError(f"{run_dir} has no {METRICS_FILE} (not a zerosiam-llm run directory?)")
    steps = [r for r in read_jsonl(path) if "loss" in r]  # a bad line: an error naming the file and line
    if not steps:
        raise UserInputError(f"{path} has no step lines yet (lines with a loss)")
    return steps


def series(rows: Sequence[dict], metric: str) -> tuple[list[float], list[float]]:
    """``(steps, values)`` of one metric, skipping lines where it is missing, None or non-finite."""
    xs, ys = [], []
    for i, row in enumerate(rows):
        value = _number(row.get(metric))
        if value is not None:
            xs.append(float(row.get("step", i + 1)))
            ys.append(value)
    return xs, ys


def _labels(run_dirs: Sequence[Path], labels: Sequence[str] | None) -> list[str]:
    if labels is not None:
        if len(labels) != len(run_dirs):
            raise UserInputError(f"{len(labels)} labels for {len(run_dirs)} runs; give one label per run")
        return list(labels)
    names = [Path(d).resolve().name for d in run_dirs]
    if len(set(names)) < len(names):  # same folder name in different places: add the parent
        names = [f"{Path(d).resolve().parent.name}/{Path(d).resolve().name}" for d in run_dirs]
    return names


def plot_runs(run_dirs: Sequence[str | Path], output: str | Path, labels: Sequence[str] | None = None) -> Path:
    """Draw the collapse curves of the runs into ``output`` (.png, .pdf or .svg) and return its path."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, Agg canvas on save

    if not run_dirs:
        raise UserInputError("give at least one run directory")
    output = Path(output)
    fmt = output.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise UserInputError(f"output {output} must end in {', '.join('.' + f for f in FORMATS)}")
    run_dirs = [Path(d) for d in run_dirs]
    names = _labels(run_dirs, labels)
    runs = [load_step_lines(d) for d in run_dirs]

    panels = [
        (title, metrics)
        for title, metrics in PANELS
        if any(series(rows, metric)[0] for rows in runs for metric, _ in metrics)
    ]
    if not panels:
        raise UserInputError("none of the runs logged a metric this plot shows")
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.2 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for ax, (title, metrics) in zip(axes, panels, strict=False):
        for rows, name, color in zip(runs, names, colors, strict=True):
            for (metric, part), style in zip(metrics, LINESTYLES, strict=False):
                xs, ys = series(rows, metric)
                if xs:
                    label = f"{name} {part}".strip()
                    ax.plot(xs, ys, linestyle=style, color=color, marker="o" if len(xs) < 30 else None,
                            markersize=3, label=label)  # fmt: skip
        if title in SHARES:
            ax.set_ylim(-0.03, 1.03)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    with atomic_path(output) as tmp:  # the temporary name has no image suffix: pass the format
        fig.savefig(tmp, format=fmt, dpi=120)
    return output


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def collapse_table(run_dirs: Sequence[str | Path], labels: Sequence[str] | None = None) -> str:
    """Markdown table: one row per run, ``first -> last`` of each collapse / drift metric (``-`` when not logged)."""
    run_dirs = [Path(d) for d in run_dirs]
    names = _labels(run_dirs, labels)
    header = ["run", "steps"] + [title for title, _ in TABLE_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run_dir, name in zip(run_dirs, names, strict=True):
        rows = load_step_lines(run_dir)
        cells = [name.replace("|", "\\|"), str(max(int(r.get("step", 0)) for r in rows))]
        for _, metric in TABLE_COLUMNS:
            _, ys = series(rows, metric)
            cells.append(f"{_fmt(ys[0])} -> {_fmt(ys[-1])}" if ys else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _map_cell_text(row: dict, batches: int | None) -> str:
    """``healthy/finished`` seeds (``+N`` still to run), then ``3C``/``1D`` (seeds collapsed / degraded) and the
    median update of the first guard rule (``@8``; ``>16`` when it outlasted the stream), or ``clean``."""
    verdicts = [v.split(" ")[0] for v in row["verdicts"]]
    todo = row["seeds"] - row["finished"]
    head = f"{row['healthy']}/{row['finished']}" + (f" +{todo}" if todo else "")
    marks = [
        f"{n}{letter}" for n, letter in ((verdicts.count("collapsed"), "C"), (verdicts.count("degraded"), "D")) if n
    ]
    if not marks:
        return f"{head}\nclean"
    first = row.get("first_rule_update")
    if first is not None:
        marks.append(f">{batches}" if batches is not None and first > batches else f"@{first:g}")
    return f"{head}\n{' '.join(marks)}"


def _range_columns(merit: dict | None, baseline: str | None, baseline_open: bool = False) -> list[str]:
    """The healthy-range table row of one config: range, width, width over the baseline's, accuracy in range.
    While cells remain, an open width shows its best case (``3.3 (<=33)``) and a ratio involving an open range
    ends in ``?``."""
    if merit is None:
        return ["-", "-", "-", "-"]
    if not merit.get("cells_finished", 1):
        return ["not run", "-", "-", "-"]
    if merit["low"] is None:
        rng = "none"
    elif merit["low"] == merit["high"]:
        rng = f"{merit['low']:g}"
    else:
        rng = f"{merit['low']:g}-{merit['high']:g}"
    is_open = merit.get("open", False)
    width = "0" if not merit["width"] else f"{merit['width']:.1f}"
    if is_open:
        width += f" (<={merit['width_if_rest_healthy']:.0f})"
    ratio = merit.get("width_vs_baseline")
    if merit["config"] == baseline:
        vs = "(baseline)"
    elif merit.get("no_op"):
        vs = "no-op"  # no run moved the model: its range measures no stability
    elif ratio is None:
        vs = "-"
    else:
        vs = ("inf" if ratio == math.inf else f"{ratio:.1f}x") + ("?" if is_open or baseline_open else "")
    acc = "-"
    if merit.get("accuracy") is not None:
        low, high = merit["ci95"]
        acc = f"{100 * merit['accuracy']:.1f} [{100 * low:.1f}, {100 * high:.1f}]"
    return [rng, width, vs, acc]


RANGE_HEADERS = ("healthy lr range", "width", "vs base", "acc % [95% CI]")
RANGE_X = (0.0, 0.36, 0.5, 0.66)  # column positions in the table panel (axes fraction)


def plot_stability_map(
    summary: Sequence[dict],
    streams: Sequence[str],
    configs: Sequence[str],
    learning_rates: Sequence[float],
    output: str | Path,
    batches: int | None = None,
    merit: Sequence[dict] = (),
    baseline: str | None = None,
) -> Path:
    """The collapse map, one panel pair per stream. Left: configuration down, learning rate across, colour = share
    of seeds healthy; each cell prints healthy/finished seeds, how many collapsed (C) or degraded (D) and the median
    update of the first guard rule (``@N``), or ``clean``. Right, row by row: the healthy-range table (the widest
    run of learning rates where every seed is healthy, its width, its ratio to the baseline's width, and the pooled
    accuracy inside it with its 95% Wilson interval)."""
    from matplotlib.figure import Figure

    output = Path(output)
    by_key = {(r["stream"], r["config"], r["learning_rate"]): r for r in summary}
    merit_by_key = {(m["stream"], m["config"]): m for m in merit}
    n_lr, table_width = len(learning_rates), 4.4 if merit else 0.0
    fig = Figure(figsize=(1.9 + (0.85 * n_lr + table_width) * len(streams), 1.5 + 0.42 * len(configs)),
                 layout="constrained")  # fmt: skip
    ratios = [n_lr * 0.85, table_width] * len(streams) if merit else [1] * len(streams)
    axes = fig.subplots(1, len(ratios), squeeze=False, width_ratios=ratios).ravel()
    map_axes = axes[::2] if merit else axes
    image = None
    for k, (ax, stream) in enumerate(zip(map_axes, streams, strict=True)):
        share = [[math.nan] * n_lr for _ in configs]
        for i, config in enumerate(configs):
            for j, lr in enumerate(learning_rates):
                r = by_key.get((stream, config, lr))
                if r is None or not r["finished"]:
                    ax.text(j, i, "not run", ha="center", va="center", fontsize=7, color="0.45")
                    continue
                share[i][j] = r["healthy"] / r["finished"]
                dark = share[i][j] < 0.15 or share[i][j] > 0.85
                ax.text(j, i, _map_cell_text(r, batches), ha="center", va="center", fontsize=8, linespacing=1.1,
                        color="white" if dark else "black")  # fmt: skip
        image = ax.imshow(share, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(n_lr), [f"{lr:g}" for lr in learning_rates], fontsize=8)
        ax.set_yticks(range(len(configs)), list(configs) if k == 0 else [""] * len(configs), fontsize=8)
        ax.set_xlabel("LoRA learning rate", fontsize=8)
        ax.set_title(stream, fontsize=10)
        if merit:
            table = axes[2 * k + 1]
            table.set_ylim(ax.get_ylim())
            table.set_xlim(0, 1)
            table.axis("off")
            for x, header in zip(RANGE_X, RANGE_HEADERS, strict=True):
                table.text(x, -0.75, header, fontsize=8, fontweight="bold", va="center")
            for i, config in enumerate(configs):
                base = merit_by_key.get((stream, baseline))
                columns = _range_columns(merit_by_key.get((stream, config)), baseline,
                                         base is not None and base.get("open", False))  # fmt: skip
                for x, text in zip(RANGE_X, columns, strict=True):
                    table.text(x, i, text, fontsize=8, va="center")
    if image is not None:
        bar = fig.colorbar(image, ax=list(map_axes), orientation="horizontal", fraction=0.04, aspect=30)
        bar.set_label("share of seeds healthy", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    caption = (f"cell: healthy/finished seeds; C collapsed, D degraded, @N median update of the first guard rule"
               f" (of {batches}); clean: no rule fired")  # fmt: skip
    if any(m.get("open") for m in merit):
        caption += "\nwidth (<=W): W if every seed still to run is healthy; ?: the ratio involves such an open range"
    if any(m.get("no_op") for m in merit):
        caption += "\nno-op: no run moved the model (no update, or no gradient): the base model's verdicts at every lr"
    fig.supxlabel(caption, fontsize=7)
    with atomic_path(output) as tmp:
        fig.savefig(tmp, format=output.suffix.lstrip(".") or "png", dpi=120)
    return output


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2, through run_cli
        raise UserInputError(message)


def main(argv: list[str] | None = None) -> int:
    from zerosiam_llm.errors import run_cli

    def _main(args: list[str]) -> int:
        parser = _Parser(prog="python -m zerosiam_llm.experiments.plots", description=__doc__.split("\n\n")[0])
        parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run output directories")
        parser.add_argument("--output", type=Path, default=Path("curves.png"), help="image file (.png, .pdf, .svg)")
        parser.add_argument("--labels", default=None, help="comma-separated legend labels, one per run")
        ns = parser.parse_args(args)
        labels = [s.strip() for s in ns.labels.split(",")] if ns.labels is not None else None
        print(collapse_table(ns.run_dirs, labels), end="")
        path = plot_runs(ns.run_dirs, ns.output, labels)
        print(f"curves: {path}")
        return 0

    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
