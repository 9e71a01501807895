"""The model card (README.md) written next to the adapter and pushed to the Hub with it.

TRL writes the card (``create_model_card``: front matter, the method's paper, framework versions, citations); this
module completes it with what a test-time-adapted adapter needs: how to load it with its base model, that it was
trained without labels, the recipe's settings and the collapse metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zerosiam_llm.files import atomic_write_text
from zerosiam_llm.methods import REGISTRY
from zerosiam_llm.modeling import resolve_model

CARD_METRICS = {
    "entropy": "H(p_r), mean token entropy of the generation distribution (nats)",
    "zerosiam/entropy_online": "H(p_o), online-branch entropy (nats)",
    "zerosiam/logit_norm_mean": "mean L2 norm of the LM-head logits",
    "completions/mean_length": "mean completion length (tokens)",
    "completions/answer_rate": "share of completions with an extractable answer",
    "monitor/accuracy": "monitor-only accuracy against gold answers (never used for training)",
}



def base_model_id(spec: str) -> str | None:
    """The Hub id a model spec stands for (the embedded GGUF is SmolLM2-135M-Instruct), None for local files."""
    if spec.startswith("embedded:"):
        return "HuggingFaceTB/SmolLM2-135M-Instruct"
    source = resolve_model(spec)
    return source.name_or_path if source.kind == "hub" else None


def card_dataset(args) -> str | None:
    """The data set to name in the card's metadata: a Hub id, not a local file or generated problems."""
    if args.dataset.startswith("generated:") or Path(args.dataset).exists():
        return None
    return args.dataset


def _first_last(metrics: list[dict], key: str) -> tuple[float | None, float | None]:
    values = [m[key] for m in metrics if isinstance(m.get(key), (int, float))]
    return (values[0], values[-1]) if values else (None, None)


def _use_section(args) -> str:
    base = base_model_id(args.model) or args.model
    predictor = (
        " (kept as `zerosiam_predictor.safetensors` to resume training)." if args.method == "zerosiam" else "."
    )
    return "\n".join([
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base}")',
        'model = PeftModel.from_pretrained(base, "<this repo or folder>")',
        "```",
        "",
        "This is a normal peft adapter: answers come from the base model + LoRA. The ZeroSiam predictor exists only "
        "inside the training loss" + predictor,
        "",
    ])  # fmt: skip


def _sar_threshold(args) -> str:
    unit = args.sar_margin_unit
    if unit == "quantile":
        return f"the {args.sar_margin:g}-quantile of each batch's token entropies"
    return f"{args.sar_margin:g} ln V" if unit == "ln_v" else f"{args.sar_margin:g} nats"


def _training_section(args, metrics: list[dict]) -> str:
    method = {
        "zerosiam": "ZeroSiam",
        "come": "COME (entropy of a Dirichlet opinion)",
        "sar": "SAR (reliable, sharpness-aware entropy minimisation)",
        "majority-vote": "GRPO with a majority-vote reward (TTRL)",
        "semantic-vote": "GRPO with a semantic-vote reward (EMPO)",
        "entropy-reward": "GRPO with a negative-entropy reward (RENT / EM-RL)",
        "self-certainty": "GRPO with a self-certainty reward (Intuitor)",
    }.get(args.method, "Tent (entropy minimisation)")
    scheduler = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)  # an enum: print "linear"
    steps = max((m.get("step", 0) for m in metrics), default=0)
    loss = {
        "zerosiam": " plus a stop-gradient alignment term through a learned predictor, which rules out collapsed "
        "solutions.",
        "come": ", taken over a Dirichlet opinion with an uncertainty mass (COME), with the logit norm held fixed in "
        "the backward pass.",
        "sar": f" over the reliable tokens only (entropy below {_sar_threshold(args)}), minimised sharpness-aware "
        f"(SAM, rho = {args.sar_rho}), with the adapter reset when the loss average falls below "
        f"{args.sar_reset_below}{' x the first loss' if args.sar_reset_unit == 'initial' else ' nats'} (SAR).",
    }.get(args.method, ".")
    signal = f"the loss is the model's own token entropy{loss}"
    if REGISTRY[args.method].family == "grpo":
        signal = f"the reward of each of the k = {args.num_rollouts} rollouts per prompt comes from the model itself."
    lines = [
        f"Adapted at test time with **{method}** on unlabeled prompts from `{args.dataset}`. **Trained without "
        f"labels**: {signal} Gold answers, where the data had them, were used only for monitoring.",
        "",
        "| setting | value |",
        "|---|---|",
        f"| recipe | `{args.recipe or '(command line)'}` |",
        f"| base model | `{args.model}` |",
        f"| method | {args.method}" + (f" (alpha = {args.alpha})" if args.method == "zerosiam" else "") + " |",
        f"| protocol | {args.protocol} |",
    ]
    if args.method == "zerosiam":
        rank = f", rank {args.predictor_rank}" if args.predictor == "lora" else ""
        lines.append(
            f"| predictor | {args.predictor}{rank}, {args.resolved_predictor_optimizer}, "
            f"lr {args.resolved_predictor_learning_rate:g} |"
        )
    lora_alpha = args.lora_alpha or 2 * args.lora_r
    lines += [
        f"| LoRA | r = {args.lora_r}, alpha = {lora_alpha}, targets {args.lora_target_modules} |",
        f"| optimizer | {args.optimizer}, lr {args.learning_rate:g}, {scheduler} schedule |",
        f"| data | `{args.dataset}` ({args.question_field}), {args.num_rollouts} rollout(s) per prompt |",
        f"| rollouts | T = {args.temperature}, max {args.max_completion_length} new tokens |",
        f"| steps | {steps} |",
        "",
        "### Metrics (first logged step -> last)",
        "",
        "| metric | first | last |",
        "|---|---|---|",
    ]
    for key, label in CARD_METRICS.items():
        first, last = _first_last(metrics, key)
        if first is not None:
            lines.append(f"| {label} | {first:.4g} | {last:.4g} |")
    return "\n".join(lines) + "\n"


def _sections(text: str) -> list[tuple[str, str]]:
    """``[(heading line, body), ...]`` split at ``## `` headings; the first heading is "" (the text before)."""
    out, heading, body = [], "", []
    for line in text.splitlines():
        if line.startswith("## "):
            out.append((heading, "\n".join(body)))
            heading, body = line, []
        else:
            body.append(line)
    out.append((heading, "\n".join(body)))
    return out


def complete_model_card(path: str | Path, args, metrics: list[dict[str, Any]]) -> None:
    """Add the adapter's use, settings and collapse metrics to the card TRL wrote at ``path``."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(path)
    card.data.library_name = "peft"
    if card.data.base_model is None:
        card.data.base_model = base_model_id(args.model)
    if card_dataset(args):
        card.data.datasets = [card_dataset(args)]
    parts = []
    for heading, body in _sections(card.text):
        if heading == "## Quick start":  # TRL's pipeline snippet names a Hub repo; an adapter loads onto its base
            parts.append(_use_section(args))
            continue
        if heading == "## Training procedure":
            body = "\n" + _training_section(args, metrics) + body
        if not heading:  # TRL names no base model for a local folder: say which one it was
            body = body.replace("[None](https://huggingface.co/None)", f"`{args.model}`")
        parts.append(f"{heading}\n{body}" if heading else body)
    card.text = "\n".join(parts)
    atomic_write_text(path, str(card))
