"""CPU rollout throughput: plain fp32 `model.generate` vs the project's HF generation path (zerosiam_llm.rollout.
HFGenerator: bf16 on CPUs with avx512_bf16, batching, left padding, adapters merged) on the same prompts.

    python benchmarks/bench_rollout.py [--batch 32] [--max_new_tokens 64] [--rounds 2]

Prompts: the first `batch` GSM8K test questions through the chat template; greedy. tokens/s counts generated
tokens up to and including the end-of-turn token ("useful" tokens), over the wall time of the generate call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main() -> None:
    import torch

    from zerosiam_llm.policy import load_policy
    from zerosiam_llm.prompts import build_messages, render_prompt
    from zerosiam_llm.rollout import HFGenerator, SamplingConfig, cpu_supports_bf16

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/gsm8k_test.jsonl"
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    model, tok = load_policy("embedded:smollm2-135m")
    model.eval()
    questions = [json.loads(x)["question"] for x in args.data.read_text().splitlines()[: args.batch]]
    prompts = [render_prompt(tok, build_messages(q)) for q in questions]

    def plain() -> float:
        enc = tok(prompts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **enc, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
            )
        wall = time.perf_counter() - start
        gen = out[:, enc["input_ids"].shape[1] :]
        useful = sum(min(int((row == tok.eos_token_id).int().argmax()) + 1 if (row == tok.eos_token_id).any()
                         else len(row), len(row)) for row in gen)  # fmt: skip
        return useful / wall

    sampling = SamplingConfig(n=1, temperature=0.0, max_new_tokens=args.max_new_tokens)
    bf16 = HFGenerator.from_pretrained("embedded:smollm2-135m", dtype="auto", device="cpu", batch_size=args.batch)

    def ours() -> float:
        start = time.perf_counter()
        done = bf16.generate_all(prompts, sampling)
        wall = time.perf_counter() - start
        return sum(min(c[0].num_tokens + (0 if c[0].truncated else 1), args.max_new_tokens) for c in done) / wall

    results = {"plain fp32 generate": [], f"HFGenerator ({bf16.describe()['dtype']})": []}
    for _ in range(args.rounds):  # interleaved
        results["plain fp32 generate"].append(plain())
        results[f"HFGenerator ({bf16.describe()['dtype']})"].append(ours())
    base = statistics.median(results["plain fp32 generate"])
    print(f"batch {args.batch}, <= {args.max_new_tokens} new tokens, greedy, avx512_bf16: {cpu_supports_bf16()}")
    for name, values in results.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.1f} tok/s | {min(values):.1f}-{max(values):.1f} | x{med / base:.2f} |")


if __name__ == "__main__":
    main()
