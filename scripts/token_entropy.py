"""The per-token entropy distribution of a model's own greedy answers on an online stream: the evidence behind SAR's
reliable-entropy threshold E0 and its model-recovery threshold on LLM vocabularies (docs/methods.md, "SAR on LLMs").

    python scripts/token_entropy.py --stream gsm8k --data_dir ../shared/data --num_problems 64
    python scripts/token_entropy.py --stream arithmetic --num_problems 64 --output results/sar-thresholds/arith.json

Each stream batch (8 problems, the recipe's prompt and stream order) is answered greedily with <= 96 new tokens, as
the online protocol's predictions; the entropy of the distribution that chose each generated token (the positions
every entropy method trains) is taken from the raw logits. Printed and written: quantiles, the share of tokens at
or above thresholds in nats and as fractions of ln V, the per-answer mean entropy, and the share of the entropy
loss's squared gradient norm (w.r.t. the hidden states, each token's row) that each entropy band carries: SAR filters
high-entropy samples because their gradients are large and noisy.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

THRESHOLDS_NATS = (0.1, 0.2, 0.5, 1.0, 1.5, 2.0, 3.0)
THRESHOLDS_LN_V = (0.05, 0.1, 0.2, 0.4)
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.8, 0.9, 0.95, 0.99)


def stream_problems(stream: str, data_dir: str | None, num_problems: int, seed: int) -> list[dict]:
    from zerosiam_llm.data import load_problems
    from zerosiam_llm.online import order_stream

    if stream == "arithmetic":
        problems = load_problems("generated:arithmetic", answer_field="answer", limit=num_problems, seed=seed)
    else:
        if data_dir is None:
            raise SystemExit(f"--data_dir is needed for stream {stream}")
        files = {"gsm8k": ("gsm8k_test.jsonl", "question", "gsm8k"),
                 "math500": ("math500_test.jsonl", "problem", "latex")}  # fmt: skip
        name, field, style = files[stream]
        problems = load_problems(str(Path(data_dir) / name), question_field=field, answer_field="answer",
                                 answer_style=style)  # fmt: skip
    return order_stream(problems, seed)[:num_problems]


def measure(stream: str, data_dir: str | None, num_problems: int, batch: int, max_new_tokens: int, seed: int) -> dict:
    import torch

    from zerosiam_llm.modeling import final_hidden_states, load_model, load_tokenizer, resolve_model
    from zerosiam_llm.objectives import siamese_entropy
    from zerosiam_llm.parser import build_config
    from zerosiam_llm.prompts import build_messages, render_prompt

    config = build_config("smollm2-135m-online-cpu", {"report_to": "none"})
    source = resolve_model(config.model)
    tokenizer = load_tokenizer(source)
    model = load_model(source).eval()
    vocab = model.get_output_embeddings().weight.shape[0]
    problems = stream_problems(stream, data_dir, num_problems, seed)
    entropies: list[float] = []
    grad_sq: list[float] = []
    answer_means: list[float] = []
    weight = model.get_output_embeddings().weight
    torch.manual_seed(seed)
    for start in range(0, len(problems), batch):
        texts = [render_prompt(tokenizer, build_messages(p["question"], config.instruction))
                 for p in problems[start : start + batch]]  # fmt: skip
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        new = out.sequences[:, enc["input_ids"].shape[1] :]
        alive = torch.ones(new.shape[0], dtype=torch.bool)
        per_row: list[list[float]] = [[] for _ in range(new.shape[0])]
        for t, logits in enumerate(out.logits):  # [B, V] raw logits of step t: the distribution token t came from
            log_p = logits.float().log_softmax(-1)
            h = -(log_p.exp() * log_p).sum(-1)
            for i in range(new.shape[0]):
                if alive[i]:
                    per_row[i].append(float(h[i]))
            alive &= new[:, t] != tokenizer.eos_token_id  # the eos token is trained, nothing after it
        for row in per_row:
            entropies += row
            answer_means.append(sum(row) / len(row))
        # each token's gradient of the summed entropy w.r.t. its hidden state, through the loss module's chunked path
        width = enc["input_ids"].shape[1]
        attention = torch.cat([enc["attention_mask"], torch.ones_like(new)], 1)
        with torch.no_grad():
            hidden = final_hidden_states(model, out.sequences, attention)[:, width - 1 : -1]
        rows = torch.cat([hidden[i, : len(r)] for i, r in enumerate(per_row)]).detach().requires_grad_(True)
        total, stats = siamese_entropy(rows, None, weight, (1.0, 0.0, 0.0))
        total.backward()
        grad_sq += rows.grad.double().pow(2).sum(-1).tolist()
        print(f"{stream}: {start + len(per_row)}/{len(problems)} answers", file=sys.stderr, flush=True)
    values = torch.tensor(entropies, dtype=torch.float64)
    g2 = torch.tensor(grad_sq, dtype=torch.float64)
    ln_v = math.log(vocab)
    cuts = [values.quantile(q) for q in (0.5, 0.8, 0.9)]
    bands = {"lowest 50%": values < cuts[0], "50-80%": (values >= cuts[0]) & (values < cuts[1]),
             "80-90%": (values >= cuts[1]) & (values < cuts[2]), "top 10%": values >= cuts[2]}  # fmt: skip
    return {
        "stream": stream,
        "problems": len(problems),
        "tokens": len(entropies),
        "vocab": vocab,
        "ln_v": ln_v,
        "mean": float(values.mean()),
        "quantiles": {str(q): float(values.quantile(q)) for q in QUANTILES},
        "share_at_or_above_nats": {str(t): float((values >= t).double().mean()) for t in THRESHOLDS_NATS},
        "share_at_or_above_ln_v": {str(f): float((values >= f * ln_v).double().mean()) for f in THRESHOLDS_LN_V},
        "grad_norm_sq_share_by_entropy_band": {k: float(g2[m].sum() / g2.sum()) for k, m in bands.items()},
        "answer_mean_entropy": {"mean": sum(answer_means) / len(answer_means),
                                "min": min(answer_means), "max": max(answer_means)},  # fmt: skip
        "protocol": f"greedy, <= {max_new_tokens} new tokens, batches of {batch}, stream seed {seed}, fp32, "
        "entropy of the raw-logit distribution of each generated token (eos included)",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stream", choices=("arithmetic", "gsm8k", "math500"), default="gsm8k")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--num_problems", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    result = measure(args.stream, args.data_dir, args.num_problems, args.batch, args.max_new_tokens, args.seed)
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
