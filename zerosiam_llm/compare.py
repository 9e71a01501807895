"""Several methods on the same online streams: ``--compare_methods`` runs each in its own process and writes
``comparison.md`` / ``comparison.json``; ``pool_comparisons`` counts several comparisons (stream orders) as one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from zerosiam_llm.configs import ZeroSiamConfig
from zerosiam_llm.errors import UserInputError
from zerosiam_llm.files import atomic_write_json, atomic_write_text
from zerosiam_llm.online import TRAIN_COMMAND, accuracy_record
from zerosiam_llm.parser import strip_options
from zerosiam_llm.run_dir import SUMMARY_FILE


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def comparison_table(results: dict[str, dict[str, Any]], title: str) -> str:
    """Markdown in the paper's shape: methods x streams, accuracy % (correct/graded) [95% CI]."""
    streams = sorted({s for per_method in results.values() for s in per_method})
    lines = [f"# {title}", "", "| method | " + " | ".join(streams) + " |", "|---|" + "---|" * len(streams)]
    for method, per_stream in results.items():
        cells = []
        for stream in streams:
            r = per_stream.get(stream)
            if r is None:
                cells.append("-")
            elif r.get("accuracy") is None:
                cells.append(f"n/a ({r.get('problems', 0)} problems, no gold)")
            else:
                low, high = r["ci95"]
                cells.append(f"{_pct(r['accuracy'])} ({r['correct']}/{r['graded']}) [{_pct(low)}, {_pct(high)}]")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Accuracy % of the online predictions (each made before that batch's update), 95% Wilson interval.",
        "",
    ]
    return "\n".join(lines)


def pool_comparisons(runs: list[dict[str, dict[str, dict[str, Any]]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Several comparisons of the same methods and streams (e.g. stream orders) as one: per method and stream, the
    recorded predictions counted together, with a Wilson interval on the pooled count."""
    pooled: dict[str, dict[str, dict[str, Any]]] = {}
    for method in runs[0]:
        for stream in runs[0][method]:
            cells = [run.get(method, {}).get(stream) for run in runs]
            if any(c is None for c in cells):
                raise UserInputError(f"method {method}, stream {stream} is missing from one of the comparisons")
            pooled.setdefault(method, {})[stream] = accuracy_record(
                sum(c["problems"] for c in cells), sum(c.get("graded", 0) for c in cells),
                sum(c.get("correct") or 0 for c in cells),
            )  # fmt: skip
    return pooled


def pool_main(argv: list[str] | None = None) -> int:
    """``python scripts/pool_comparisons.py OUT DIR [DIR ...]``: pool ``DIR/comparison.json`` files into
    ``OUT/comparison.md`` / ``.json``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2:
        raise UserInputError("usage: pool_comparisons.py OUT_DIR COMPARISON_DIR [COMPARISON_DIR ...]")
    out, sources = Path(argv[0]), [Path(a) for a in argv[1:]]
    runs, model = [], None
    for source in sources:
        path = source / "comparison.json"
        if not path.is_file():
            raise UserInputError(f"{path} does not exist (a --compare_methods output_dir holds it)")
        data = json.loads(path.read_text(encoding="utf-8"))
        runs.append(data["results"])
        model = data.get("model", model)
    pooled = pool_comparisons(runs)
    out.mkdir(parents=True, exist_ok=True)
    title = f"Online protocol, {model}, {len(runs)} runs pooled ({', '.join(str(s) for s in sources)})"
    atomic_write_text(out / "comparison.md", comparison_table(pooled, title))
    atomic_write_json(out / "comparison.json", {"model": model, "pooled_from": [str(s) for s in sources],
                                                "results": pooled})  # fmt: skip
    print(comparison_table(pooled, title))
    return 0


def compare_methods(config: ZeroSiamConfig, argv: list[str]) -> dict[str, Any]:
    """Run each method in its own process (clean GPU memory, resumable) on the same streams; write the table."""
    root = Path(config.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    base = strip_options(argv, ("compare_methods", "compare_overrides", "method", "output_dir"))
    results = {}
    for method in config.compare_methods:
        out = root / method
        cmd = [*TRAIN_COMMAND, *base, "--method", method, "--output_dir", str(out), *method_overrides(config, method)]
        print(f"[compare] {method}: {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.run(cmd)
        if proc.returncode != 0:
            raise UserInputError(f"method {method} failed (exit code {proc.returncode}); see its output above")
        results[method] = json.loads((out / SUMMARY_FILE).read_text())["streams"]
    title = f"Online protocol, {config.model}"
    atomic_write_text(root / "comparison.md", comparison_table(results, title))
    atomic_write_json(root / "comparison.json", {"model": config.model, "results": results})
    return results


def method_overrides(config: ZeroSiamConfig, method: str) -> list[str]:
    """The ``--field value`` flags ``compare_overrides`` sets for ``method`` (its group's, then its own)."""
    from zerosiam_llm.methods import REGISTRY

    overrides = config.compare_overrides or {}
    group = "rl" if REGISTRY[method].family == "grpo" else "entropy"
    values = {**overrides.get(group, {}), **overrides.get(method, {})}
    flags = []
    for name, value in values.items():
        flags += [f"--{name}", json.dumps(value) if isinstance(value, (list, dict)) else str(value)]
    return flags
