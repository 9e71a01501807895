"""Tent vs ZeroSiam on the embedded SmolLM2-135M, same settings and same stream, at a moderate and an aggressive lr.

    python scripts/collapse_study.py --output_dir outputs/collapse-study [--lrs 1e-4,1e-3] [--num_problems 64]

Each run is `train.py --recipe smollm2-135m-online-cpu` (online protocol: greedy answers of <= 96 tokens to a
stream of generated arithmetic problems, 8 per batch, one update per batch, predictor lr 10x) with the default
collapse-guard rules (warn only). At the end: `curves.png` (entropies, logit norm, repetition, dominance, answer
rate, base NLL, accuracy, predictor drift, the runs overlaid), `collapse_table.md` (first -> last of each metric)
and the guard events per run. About 4 minutes per run on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/collapse-study"))
    parser.add_argument("--lrs", default="1e-4,1e-3", help="LoRA learning rates (predictor: 10x)")
    parser.add_argument("--methods", default="tent,zerosiam")
    parser.add_argument("--num_problems", type=int, default=64)
    parser.add_argument("--skip_training", action="store_true", help="only redo the plot and table of existing runs")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more train.py overrides")
    args = parser.parse_args()

    from zerosiam_llm.files import atomic_write_text, read_jsonl
    from zerosiam_llm.monitor import replay_guard
    from zerosiam_llm.plots import collapse_table, plot_runs

    run_dirs, labels, events = [], [], {}
    for lr in args.lrs.split(","):
        for method in args.methods.split(","):
            out = args.output_dir / f"{method}-lr{lr}"
            cmd = [sys.executable, str(REPO / "train.py"), "--recipe", "smollm2-135m-online-cpu", "--method", method,
                   "--learning_rate", lr, "--num_problems", str(args.num_problems), "--output_dir", str(out),
                   *args.extra]  # fmt: skip
            if not args.skip_training:
                print("[collapse-study]", " ".join(cmd[1:]), flush=True)
                subprocess.run(cmd, check=True)
            stream = out / "arithmetic"
            run_dirs.append(stream)
            labels.append(f"{method} lr {lr}")
            # the default rules over the logged metrics (identical to the live guard's events with those rules)
            events[labels[-1]] = [e.message for e in replay_guard(read_jsonl(stream / "metrics.jsonl"))]
    png = plot_runs(run_dirs, args.output_dir / "curves.png", labels)
    table = collapse_table(run_dirs, labels)
    lines = [
        "# Collapse study (embedded SmolLM2-135M, online protocol, greedy)",
        "",
        table,
        "",
        "## Guard events (default rules)",
        "",
    ]
    for label, messages in events.items():
        lines.append(f"- **{label}**: " + ("; ".join(messages) if messages else "none"))
    atomic_write_text(args.output_dir / "collapse_table.md", "\n".join(lines) + "\n")
    (args.output_dir / "guard_events.json").write_text(json.dumps(events, indent=2))
    print("\n".join(lines))
    print(f"\ncurves: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
