"""Peak extra memory of the ZeroSiam loss (forward + backward) vs naive full logits, with a Qwen2.5-0.5B-shaped head.

    python benchmarks/speed/bench_loss_memory.py                        # CPU: N = 1k, 4k, 16k; naive up to 4k
    python benchmarks/speed/bench_loss_memory.py --device cuda --dtype bfloat16 --naive_max 16384

d = 896, V = 151936 (random weights). "Extra" = peak during the loss minus the memory held before it (hidden
states, head weight, predictor). CUDA: torch.cuda.max_memory_allocated. CPU: each (variant, N) runs in its own
process and reports ru_maxrss minus the RSS before the loss, so allocator caching cannot hide a peak.

Variants: fused (objectives.zerosiam_loss), naive (full [N, V] logits, objectives.reference_terms) and floor: the
same predictor and backward with a loss that is linear in P(h), i.e. the O(N x d) memory any loss over these hidden
states needs (P(h), the gradients of P(h) and of the hidden states). fused - floor is the loss's logits memory.
One chunk of logits = token_chunk x V x 4 bytes (fp32); token_chunk defaults to the loss's own choice (128 MiB).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

D, V = 896, 151936
VARIANTS = ("fused", "floor", "naive")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def measure(variant: str, n: int, device: str, dtype: str, token_chunk: int | None) -> dict:
    import torch

    from zerosiam_llm.objectives import reference_terms, zerosiam_loss
    from zerosiam_llm.predictor import Predictor

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    # built in place: a setup transient would raise the process high-water mark (ru_maxrss) above the loss's
    weight = torch.randn(V, D, device=device, dtype=dt).mul_(0.02)
    hidden = torch.randn(1, n, D, device=device, dtype=dt).requires_grad_(True)
    mask = torch.ones(1, n, dtype=torch.bool, device=device)
    predictor = Predictor(D, "full").to(device)
    with torch.no_grad():
        predictor.delta.add_(torch.randn_like(predictor.delta) * 1e-3)
    # warm-up on 8 tokens: first-call kernel workspaces are not the loss's memory
    small = hidden[:, :8].detach().requires_grad_(True)
    zerosiam_loss(small, mask[:, :8], weight, predictor).loss.backward()
    predictor.zero_grad()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = _rss_mib()
    if variant == "fused":
        loss = zerosiam_loss(hidden, mask, weight, predictor, token_chunk=token_chunk).loss
    elif variant == "floor":
        loss = (predictor(hidden[mask]) * weight[0].float()).sum()
    else:
        h = hidden[mask]
        h_o, kl_ro, kl_or, _ = reference_terms(predictor(h), h.float(), weight.float())
        loss = (h_o + kl_ro + kl_or).mean()
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    return {"variant": variant, "n": n, "extra_mib": peak - before}


def chunk_mib(n: int, token_chunk: int | None) -> float:
    """One chunk of logits as the loss sizes it for ``n`` tokens (fp32)."""
    import torch

    from zerosiam_llm.objectives import chunk_rows

    return chunk_rows(n, V, torch.float32, token_chunk) * V * 4 / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "N"), help="measure one point in this process")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--ns", default="1024,4096,16384")
    parser.add_argument("--naive_max", type=int, default=4096, help="largest N for naive logits (memory!)")
    parser.add_argument("--token_chunk", type=int, default=None, help="tokens per loss chunk (default: the loss's)")
    args = parser.parse_args()
    if args.one:
        variant, n = args.one[0], int(args.one[1])
        print(json.dumps(measure(variant, n, args.device, args.dtype, args.token_chunk)))
        return
    rows = []
    for n in map(int, args.ns.split(",")):
        for variant in VARIANTS:
            if variant == "naive" and n > args.naive_max:
                rows.append({"variant": variant, "n": n, "extra_mib": None})
                continue
            cmd = [sys.executable, __file__, "--one", variant, str(n), "--device", args.device, "--dtype", args.dtype]
            if args.token_chunk:
                cmd += ["--token_chunk", str(args.token_chunk)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            rows.append(json.loads(out))
            print(rows[-1], file=sys.stderr)
    print(f"\nZeroSiam loss fwd+bwd, head d={D} V={V}, {args.device} {args.dtype}")
    print("| N tokens | one chunk MiB | fused extra MiB | floor MiB | fused - floor, in chunks | naive extra MiB |")
    print("|---|---|---|---|---|---|")
    for n in map(int, args.ns.split(",")):
        fused, floor, naive = (next(r for r in rows if r["n"] == n and r["variant"] == v) for v in VARIANTS)
        nv = f"not run (would need ~{n * V * 4 * 5 / 2**30:.0f} GiB)" if naive["extra_mib"] is None else \
            f"{naive['extra_mib']:.0f}"  # fmt: skip
        chunk = chunk_mib(n, args.token_chunk)
        logits = (fused["extra_mib"] - floor["extra_mib"]) / chunk
        print(f"| {n} | {chunk:.0f} | {fused['extra_mib']:.0f} | {floor['extra_mib']:.0f} | {logits:.2f} | {nv} |")

if __name__ == "__main__":
    main()
