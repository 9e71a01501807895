"""Whole online step (rollout + update), ZeroSiam vs Tent, on the embedded SmolLM2-135M and the same stream.

    python benchmarks/speed/bench_step.py                      # 2 rounds x {lr 0, lr 3e-4} x {tent, zerosiam}
    python benchmarks/speed/bench_step.py --rounds 2 --num_problems 48 --lrs 0
    python benchmarks/speed/bench_step.py --paired 8     # both methods alternating in one process: the ratio to quote

Each run is `python train.py --recipe smollm2-135m-online-cpu --method M --learning_rate LR` in its own process
(greedy answers of <= 96 tokens, batches of 8, one update per batch), methods interleaved within a round. The time of
a batch is TRL's `step_time` in metrics.jsonl: generation of the batch's answers + loss forward/backward (the
optimizer step, a few ms for LoRA + predictor, is outside it). At lr 0 (predictor lr 0 too) both methods generate
the same tokens, so the ratio is the method's own cost; at the recipe's lr the answers diverge after the first
update and their lengths move the rollout time, so the mean answer length is printed next to it. The first batch of
each run is left out (grader worker start-up, first-call allocations); "paired" is the median over (round, batch) of
ZeroSiam's time over Tent's on the same batch of the same round.
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

from paired import print_paired

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("tent", "zerosiam")


def run(method: str, lr: float, num_problems: int, out: Path, rollout_dtype: str) -> dict:
    cmd = [sys.executable, str(ROOT / "train.py"), "--recipe", "smollm2-135m-online-cpu", "--method", method,
           "--learning_rate", str(lr), "--num_problems", str(num_problems), "--output_dir", str(out),
           "--base_nll_every", "0", "--rollout_dtype", rollout_dtype]  # fmt: skip
    if lr == 0:
        cmd += ["--predictor_learning_rate", "0"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for path in out.glob("*/metrics.jsonl") for line in path.read_text().splitlines()]
    rows = [r for r in rows if "step_time" in r]
    return {
        "all_step_time": [r["step_time"] for r in rows],
        "tokens": sum(r["num_tokens"] for r in rows[-1:]),  # TRL's running count of tokens seen
        "mean_length": statistics.mean(r["completions/mean_length"] for r in rows),
        "wall": wall,
    }


def run_paired(batches: int, max_new_tokens: int) -> dict[str, list[float]]:
    """One process, one model: per stream batch, a Tent step then a ZeroSiam step (each: merged bf16 copy sync +
    greedy generation + backbone forward + loss + backward + AdamW step at lr 0, so both see the same rollouts)."""
    import torch

    from zerosiam_llm.data import generate_arithmetic_problems
    from zerosiam_llm.modeling import (
        apply_lora,
        cpu_supports_bf16,
        final_hidden_states,
        lm_head_weight,
        load_policy,
        make_lora_config,
    )
    from zerosiam_llm.objectives import zerosiam_loss
    from zerosiam_llm.predictor import Predictor
    from zerosiam_llm.prompts import build_messages, render_prompt
    from zerosiam_llm.rollout_copy import MergedRolloutCopy

    model, tok = load_policy("embedded:smollm2-135m")
    model = apply_lora(model, make_lora_config(16))
    copy = MergedRolloutCopy(model) if cpu_supports_bf16() else None
    predictor = Predictor(model.config.hidden_size, "full")
    lora = [p for p in model.parameters() if p.requires_grad]
    optimizers = {
        "tent": torch.optim.AdamW(lora, lr=0.0),
        "zerosiam": torch.optim.AdamW([{"params": lora}, {"params": list(predictor.parameters())}], lr=0.0),
    }
    weight = lm_head_weight(model)
    problems = generate_arithmetic_problems(8 * batches, seed=0)
    times: dict[str, list[float]] = {"tent": [], "zerosiam": []}
    for b in range(batches):
        prompts = [render_prompt(tok, build_messages(p["question"])) for p in problems[8 * b : 8 * b + 8]]
        enc = tok(prompts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
        for method, optimizer in optimizers.items():
            start = time.perf_counter()
            generator = model
            if copy is not None:
                copy.sync()
                generator = copy.model
            with torch.no_grad():
                out = generator.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                         pad_token_id=tok.pad_token_id)  # fmt: skip
            width = enc["input_ids"].shape[1]
            done = (out[:, width:] == tok.eos_token_id).int().cumsum(-1)
            completion = (done - (out[:, width:] == tok.eos_token_id).int()) == 0  # up to and including EOS
            mask = torch.zeros(out.shape, dtype=torch.bool)
            mask[:, width - 1 : -1] = completion
            attention = torch.cat([enc["attention_mask"], completion.long()], dim=1)
            hidden = final_hidden_states(model, out, attention)
            pred = predictor if method == "zerosiam" else None
            zerosiam_loss(hidden, mask, weight, pred, alpha=1.0 if pred else 0.0).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times[method].append(time.perf_counter() - start)
        last = {m: round(ts[-1], 2) for m, ts in times.items()}
        print(f"batch {b + 1}: {last}", file=sys.stderr)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--num_problems", type=int, default=24, help="stream length (batches of 8)")
    parser.add_argument("--lrs", default="0,3e-4", help="LoRA learning rates to measure")
    parser.add_argument("--rollout_dtype", default="auto", help="auto (bf16 merged copy on bf16 CPUs) or model")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--skip_first", type=int, default=1, help="batches left out at the start of each run")
    parser.add_argument("--paired", type=int, default=0, metavar="BATCHES",
                        help="instead: both methods alternating in one process over BATCHES stream batches")
    parser.add_argument("--max_new_tokens", type=int, default=96, help="--paired: answer length cap")
    args = parser.parse_args()
    if args.paired:
        times = run_paired(args.paired, args.max_new_tokens)
        kept = {m: ts[args.skip_first :] for m, ts in times.items()}
        print(f"\npaired in one process: {args.paired} stream batches of 8 (first {args.skip_first} left out), greedy "
              f"<= {args.max_new_tokens} tokens; a step = copy sync + generate + loss fwd/bwd + AdamW")  # fmt: skip
        print_paired(kept, "batch")
        return
    methods = args.methods.split(",")
    results: dict[tuple[float, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for lr in map(float, args.lrs.split(",")):
                for method in methods:  # interleaved: machine noise hits both alike
                    res = run(method, lr, args.num_problems, Path(tmp) / f"{method}-{lr}-{r}", args.rollout_dtype)
                    res["step_time"] = res["all_step_time"][args.skip_first :]
                    results.setdefault((lr, method), []).append(res)
                    times = [round(t, 2) for t in res["all_step_time"]]
                    print(f"round {r + 1} lr {lr} {method}: {times}", file=sys.stderr)
    print(f"\nonline step (rollout + loss fwd/bwd), embedded SmolLM2-135M, {args.num_problems} problems in batches "
          f"of 8, rollout_dtype {args.rollout_dtype}, {args.rounds} rounds; medians over batches")  # fmt: skip
    print(f"| lr | method | median s per batch | min-max s | vs {methods[0]} | paired | mean answer length | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for lr in map(float, args.lrs.split(",")):
        base = statistics.median(t for res in results[(lr, methods[0])] for t in res["step_time"])
        for method in methods:
            runs = results[(lr, method)]
            times = [t for res in runs for t in res["step_time"]]
            med = statistics.median(times)
            length = statistics.mean(res["mean_length"] for res in runs)
            wall = statistics.median(res["wall"] for res in runs)
            pairs = [t / b for res, ref in zip(runs, results[(lr, methods[0])], strict=True)
                     for t, b in zip(res["step_time"], ref["step_time"], strict=True)]  # fmt: skip
            paired = f"{statistics.median(pairs):.3f} ({min(pairs):.3f}-{max(pairs):.3f})"
            print(f"| {lr:g} | {method} | {med:.2f} | {min(times):.2f}-{max(times):.2f} | {med / base:.3f} | "
                  f"{paired} | {length:.1f} | {wall:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
