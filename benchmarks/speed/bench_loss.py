"""Loss step benchmark: forward + backward of the loss over a fixed batch on the embedded SmolLM2-135M with LoRA.

Variants (each in its own subprocess, so the peak RSS is the variant's own):
  tent           chunked Tent (objectives.tent_loss)
  zerosiam       fused chunked ZeroSiam (objectives.zerosiam_loss, full predictor)
  zerosiam-lora  fused chunked ZeroSiam, low-rank predictor (r = 32)
  come           fused chunked COME (objectives.come_loss: the entropy of a Dirichlet opinion, K = vocabulary size)
  sar            SAR's reliable-entropy loss, one pass (objectives.sar_loss at the trainer's default: Tent over the
                 tokens below the batch's 0.8-quantile of entropy)
  sar-sam        SAR's whole step as the trainer runs it: pass at w, ascend to w + rho g/||g|| (sar.sam_ascend),
                 second pass over the tokens reliable in both, back to w: two forwards and two backwards
  naive-tent     full [N, V] logits, then torch ops
  naive-zerosiam full [N, V] logits for both branches, then torch ops (objectives.reference_terms)

    python benchmarks/speed/bench_loss.py                 # all variants, interleaved, 3 rounds, prints a table
    python benchmarks/speed/bench_loss.py --rounds 5 --batch 8 --length 256
    python benchmarks/speed/bench_loss.py --paired 8      # tent and zerosiam alternating in one process: the ratio
    python benchmarks/speed/bench_loss.py --paired 8 --paired_variants tent,come
    python benchmarks/speed/bench_loss.py --paired 8 --paired_variants tent,sar,sar-sam

Each timed step is one backbone forward + loss + backward (LoRA r = 16 on all linear layers, fp32); the printed time
is the median over rounds after one warm-up step per process. Peak RSS is the process high-water mark, which
includes the model and activations: compare rows, not absolutes.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from paired import print_paired

VARIANTS = ("tent", "zerosiam", "zerosiam-lora", "come", "sar", "sar-sam", "naive-tent", "naive-zerosiam")


def run_variant(variant: str, batch: int, length: int, prompt: int, steps: int) -> dict:
    step = make_step(variant, batch, length, prompt)
    step()  # warm-up
    times = [step() for _ in range(steps)]
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"variant": variant, "seconds": times, "peak_rss_gb": peak_gb}


def run_paired(variants: list[str], batch: int, length: int, prompt: int, steps: int) -> dict:
    """All variants in this one process on one model, steps alternating: the same memory and machine state."""
    make = {}
    for variant in variants:
        make[variant] = make_step(variant, batch, length, prompt)
        make[variant]()  # warm-up
    times: dict[str, list[float]] = {v: [] for v in variants}
    for i in range(steps):
        for variant in variants:
            times[variant].append(make[variant]())
        print(f"paired step {i + 1}: " + ", ".join(f"{v} {times[v][-1]:.2f}" for v in variants), file=sys.stderr)
    return times


_MODEL = None


def make_step(variant: str, batch: int, length: int, prompt: int):
    """A function timing one backbone forward + loss + backward of ``variant`` (the model is loaded once)."""
    import torch

    from zerosiam_llm.modeling import apply_lora, final_hidden_states, lm_head_weight, load_policy, make_lora_config
    from zerosiam_llm.objectives import come_loss, reference_terms, sar_loss, tent_loss, zerosiam_loss
    from zerosiam_llm.predictor import Predictor
    from zerosiam_llm.sar import sam_ascend, sam_return

    global _MODEL
    torch.manual_seed(0)
    if _MODEL is None:
        _MODEL = apply_lora(load_policy("embedded:smollm2-135m")[0], make_lora_config(16))
    model = _MODEL
    d = model.config.hidden_size
    ids = torch.randint(100, 40000, (batch, length))
    mask = torch.zeros(batch, length - 1, dtype=torch.bool)
    mask[:, prompt - 1 :] = True  # positions predicting the completion tokens
    predictor = None
    if "zerosiam" in variant:
        predictor = Predictor(d, "lora" if variant.endswith("lora") else "full", rank=32, seed=0)
        with torch.no_grad():  # off the identity, as after a few steps
            for p in predictor.parameters():
                p.add_(torch.randn_like(p) * 1e-3)
    params = [p for p in model.parameters() if p.requires_grad] + list(predictor.parameters() if predictor else [])
    weight = lm_head_weight(model)

    def step() -> float:
        for p in params:
            p.grad = None
        start = time.perf_counter()
        h = final_hidden_states(model, ids, torch.ones_like(ids))[:, :-1]
        if variant == "tent":
            loss = tent_loss(h, mask, weight).loss
        elif variant == "come":
            loss = come_loss(h, mask, weight).loss
        elif variant == "sar":
            loss = sar_loss(h, mask, weight, 0.8, margin_unit="quantile").loss
        elif variant == "sar-sam":
            first = sar_loss(h, mask, weight, 0.8, margin_unit="quantile")
            first.loss.backward()
            steps = sam_ascend(params, 0.05)
            for p in params:
                p.grad = None
            h = final_hidden_states(model, ids, torch.ones_like(ids))[:, :-1]
            loss = sar_loss(h, mask, weight, first.entropy_below, first.kept, margin_unit="nats").loss
            loss.backward()
            sam_return(params, steps)
            return time.perf_counter() - start
        elif variant.startswith("zerosiam"):
            loss = zerosiam_loss(h, mask, weight, predictor).loss
        else:
            rows = h[mask]
            online = predictor(rows) if predictor is not None else rows
            h_o, kl_ro, kl_or, _ = reference_terms(online, rows, weight)
            loss = (h_o + kl_ro + kl_or).mean() if predictor is not None else h_o.mean()
        loss.backward()
        return time.perf_counter() - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant in this process and print JSON")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (one subprocess per variant each)")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per subprocess")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--paired", type=int, default=0, metavar="STEPS",
                        help="instead: two variants alternating in one process for STEPS steps each")
    parser.add_argument("--paired_variants", default="tent,zerosiam", help="--paired variants, Tent first")
    args = parser.parse_args()
    if args.paired:
        times = run_paired(args.paired_variants.split(","), args.batch, args.length, args.prompt, args.paired)
        print(f"\npaired in one process, {args.paired} alternating steps each, {args.batch} x {args.length} tokens")
        print_paired(times, "step")
        return
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.batch, args.length, args.prompt, args.steps)))
        return
    results: dict[str, list[dict]] = {v: [] for v in args.variants.split(",")}
    for r in range(args.rounds):
        for variant in results:  # interleaved: machine noise hits every variant alike
            cmd = [sys.executable, __file__, "--variant", variant, "--steps", str(args.steps), "--batch",
                   str(args.batch), "--length", str(args.length), "--prompt", str(args.prompt)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            results[variant].append(json.loads(out))
            print(f"round {r + 1} {variant}: {results[variant][-1]['seconds']}", file=sys.stderr)
    tent_times = [t for res in results.get("tent", []) for t in res["seconds"]]
    base = statistics.median(tent_times) if tent_times else None
    positions = args.batch * (args.length - args.prompt)
    print(f"\nloss step, embedded SmolLM2-135M, LoRA r16 all-linear, fp32, {args.batch} x {args.length} tokens "
          f"({positions} loss positions), {args.rounds} rounds")  # fmt: skip
    print("| variant | median s | min-max s | vs tent | peak RSS GB |")
    print("|---|---|---|---|---|")
    for variant, runs in results.items():
        times = [t for res in runs for t in res["seconds"]]
        med = statistics.median(times)
        ratio = f"{med / base:.2f}" if base else "-"
        rss = statistics.median(res["peak_rss_gb"] for res in runs)
        print(f"| {variant} | {med:.2f} | {min(times):.2f}-{max(times):.2f} | {ratio} | {rss:.2f} |")


if __name__ == "__main__":
    main()
