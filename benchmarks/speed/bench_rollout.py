"""CPU rollout throughput on the same prompts: plain fp32 `model.generate`; the evaluation path
(zerosiam_llm.evaluation.generation.HFGenerator: sorted batching, left padding, adapters merged, fp32 and bf16 on CPUs
with avx512_bf16); the training policy (LoRA r16) generating unmerged in fp32 as TRL's HF path does, and from the
merged bf16 copy (rollout_copy.MergedRolloutCopy, `rollout_dtype: auto`) the trainer now generates from.

    python benchmarks/speed/bench_rollout.py [--batch 32] [--max_new_tokens 64] [--rounds 2]

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

    from zerosiam_llm.evaluation.generation import HFGenerator, SamplingConfig
    from zerosiam_llm.modeling import apply_lora, cpu_supports_bf16, load_policy, make_lora_config
    from zerosiam_llm.prompts import build_messages, render_prompt
    from zerosiam_llm.rollout_copy import MergedRolloutCopy

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data", type=Path, default=Path(__file__).resolve().parents[3] / "shared/data/gsm8k_test.jsonl"
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    model, tok = load_policy("embedded:smollm2-135m")
    model.eval()
    questions = [json.loads(x)["question"] for x in args.data.read_text().splitlines()[: args.batch]]
    prompts = [render_prompt(tok, build_messages(q)) for q in questions]

    def plain(lm) -> float:
        enc = tok(prompts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
        start = time.perf_counter()
        with torch.inference_mode():
            out = lm.generate(
                **enc, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
            )
        wall = time.perf_counter() - start
        gen = out[:, enc["input_ids"].shape[1] :]
        useful = sum(min(int((row == tok.eos_token_id).int().argmax()) + 1 if (row == tok.eos_token_id).any()
                         else len(row), len(row)) for row in gen)  # fmt: skip
        return useful / wall

    sampling = SamplingConfig(n=1, temperature=0.0, max_new_tokens=args.max_new_tokens)
    generators = {
        dtype: HFGenerator.from_pretrained("embedded:smollm2-135m", dtype=dtype, device="cpu", batch_size=args.batch)
        for dtype in ("float32", "auto")
    }

    def ours(generator) -> float:
        start = time.perf_counter()
        done = generator.generate_all(prompts, sampling)
        wall = time.perf_counter() - start
        return sum(min(c[0].num_tokens + (0 if c[0].truncated else 1), args.max_new_tokens) for c in done) / wall

    # the training policy: LoRA r16 on all linear layers (B random, as after some updates), generated from unmerged
    # (TRL's HF path on the training model) or from the merged bf16 copy (rollout_dtype auto)
    policy = apply_lora(load_policy("embedded:smollm2-135m")[0], make_lora_config(16))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 1e-3)
    policy.eval()
    copy = MergedRolloutCopy(policy)
    copy.sync()
    variants = {
        "plain fp32 `model.generate`": lambda: plain(model),
        "HFGenerator fp32 (sorted batching)": lambda: ours(generators["float32"]),
        f"HFGenerator {generators['auto'].describe()['dtype']} (evaluation path)": lambda: ours(generators["auto"]),
        "training policy, LoRA unmerged, fp32 (rollout_dtype model)": lambda: plain(policy),
        "training policy, merged bf16 copy (rollout_dtype auto)": lambda: plain(copy.model),
    }
    results: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):  # interleaved
        for name, fn in variants.items():
            results[name].append(fn())
    start = time.perf_counter()
    copy.sync()
    sync_s = time.perf_counter() - start
    base = statistics.median(results["plain fp32 `model.generate`"])
    print(f"batch {args.batch}, <= {args.max_new_tokens} new tokens, greedy, avx512_bf16: {cpu_supports_bf16()}; "
          f"one copy sync {sync_s:.2f} s")  # fmt: skip
    print("| path | useful tokens/s (median) | min-max | vs plain |")
    print("|---|---|---|---|")
    for name, values in results.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.1f} | {min(values):.1f}-{max(values):.1f} | x{med / base:.2f} |")


if __name__ == "__main__":
    main()
