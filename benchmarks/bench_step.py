"""Whole online step (rollout + update), ZeroSiam vs Tent, on the embedded SmolLM2-135M and the same stream.

    python benchmarks/bench_step.py                      # 2 rounds x {lr 0, lr 3e-4} x {tent, zerosiam}
    python benchmarks/bench_step.py --rounds 3 --num_problems 32 --lrs 0

Each run is `python train.py --recipe smollm2-135m-online-cpu --method M --learning_rate LR` in its own process
(greedy answers of <= 96 tokens, batches of 8, one update per batch), methods interleaved within a round. The time of
a batch is TRL's `step_time` in metrics.jsonl: generation of the batch's answers + loss forward/backward (the
optimizer step, a few ms for LoRA + predictor, is outside it). At lr 0 (predictor lr 0 too) both methods generate
the same tokens, so the ratio is the method's own cost; at the recipe's lr the answers diverge after the first
update and their lengths move the rollout time, so the generated-token count is printed next to it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("tent", "zerosiam")


def run(method: str, lr: float, num_problems: int, out: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "train.py"), "--recipe", "smollm2-135m-online-cpu", "--method", method,
           "--learning_rate", str(lr), "--num_problems", str(num_problems), "--output_dir", str(out),
           "--base_nll_every", "0"]  # fmt: skip
    if lr == 0:
        cmd += ["--predictor_learning_rate", "0"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for path in out.glob("*/metrics.jsonl") for line in path.read_text().splitlines()]
    rows = [r for r in rows if "step_time" in r]
    return {
        "step_time": [r["step_time"] for r in rows],
        "tokens": sum(r["num_tokens"] for r in rows[-1:]),  # TRL's running count of tokens seen
        "mean_length": statistics.mean(r["completions/mean_length"] for r in rows),
        "wall": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--num_problems", type=int, default=24, help="stream length (batches of 8)")
    parser.add_argument("--lrs", default="0,3e-4", help="LoRA learning rates to measure")
    args = parser.parse_args()
    results: dict[tuple[float, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for lr in map(float, args.lrs.split(",")):
                for method in METHODS:  # interleaved: machine noise hits both alike
                    res = run(method, lr, args.num_problems, Path(tmp) / f"{method}-{lr}-{r}")
                    results.setdefault((lr, method), []).append(res)
                    times = [round(t, 2) for t in res["step_time"]]
                    print(f"round {r + 1} lr {lr} {method}: {times}", file=sys.stderr)
    print(f"\nonline step (rollout + loss fwd/bwd), embedded SmolLM2-135M, {args.num_problems} problems in batches "
          f"of 8, {args.rounds} rounds; median over all batches of all rounds")  # fmt: skip
    print("| lr | method | median s per batch | min-max s | vs tent | mean answer length | wall s per run |")
    print("|---|---|---|---|---|---|---|")
    for lr in map(float, args.lrs.split(",")):
        base = statistics.median(t for res in results[(lr, "tent")] for t in res["step_time"])
        for method in METHODS:
            runs = results[(lr, method)]
            times = [t for res in runs for t in res["step_time"]]
            med = statistics.median(times)
            length = statistics.mean(res["mean_length"] for res in runs)
            wall = statistics.median(res["wall"] for res in runs)
            print(f"| {lr:g} | {method} | {med:.2f} | {min(times):.2f}-{max(times):.2f} | {med / base:.3f} | "
                  f"{length:.1f} | {wall:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
