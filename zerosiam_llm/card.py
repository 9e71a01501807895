"""The model card (README.md) written next to the adapter and pushed to the Hub with it."""

from __future__ import annotations

from pathlib import Path

import yaml

from zerosiam_llm.files import atomic_write_text
from zerosiam_llm.policy import resolve_model

CARD_METRICS = {
    "entropy": "H(p_r), mean token entropy of the generation distribution (nats)",
    "zerosiam/entropy_online": "H(p_o), online-branch entropy (nats)",
    "zerosiam/logit_norm_mean": "mean L2 norm of the LM-head logits",
    "completions/mean_length": "mean completion length (tokens)",
    "completions/answer_rate": "share of completions with an extractable answer",
    "monitor/accuracy": "monitor-only accuracy against gold answers (never used for training)",
}


def _base_model_id(spec: str) -> str | None:
    source = resolve_model(spec) if not spec.startswith("embedded:") else None
    if spec.startswith("embedded:"):
        return "HuggingFaceTB/SmolLM2-135M-Instruct"
    return source.name_or_path if source is not None and source.kind == "hub" else None


def _first_last(metrics: list[dict], key: str) -> tuple[float | None, float | None]:
    values = [m[key] for m in metrics if isinstance(m.get(key), (int, float))]
    return (values[0], values[-1]) if values else (None, None)


def render_model_card(args, metrics: list[dict]) -> str:
    """Markdown with Hub front matter: base model, method, recipe, data, 'trained without labels', metrics."""
    base = _base_model_id(args.model)
    method = "ZeroSiam" if args.method == "zerosiam" else "Tent (entropy minimisation)"
    front = {
        "library_name": "peft",
        "tags": ["zerosiam", "test-time-adaptation", "entropy-minimization", "lora", "trl"],
        "license": "other",
    }
    if base:
        front["base_model"] = base
    if not args.dataset.startswith("generated:") and not Path(args.dataset).exists():
        front["datasets"] = [args.dataset]
    steps = max((m.get("step", 0) for m in metrics), default=0)
    scheduler = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)  # an enum: print "linear"
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {Path(args.output_dir).name}: {method} adapter for {base or args.model}",
        "",
        f"A LoRA adapter for `{base or args.model}` adapted at test time with **{method}** on unlabeled prompts "
        f"from `{args.dataset}`. **Trained without labels**: the loss is the model's own token entropy"
        + (
            " plus a stop-gradient alignment term through a learned predictor (ZeroSiam, ICLR 2026, "
            "arXiv 2509.23183), which rules out collapsed solutions."
            if args.method == "zerosiam"
            else "."
        )
        + " Gold answers, where the data had them, were used only for monitoring.",
        "",
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base or args.model}")',
        'model = PeftModel.from_pretrained(base, "<this repo or folder>")',
        "```",
        "",
        "This is a normal peft adapter. Answers are generated with the base model + LoRA; the ZeroSiam predictor "
        "exists only inside the training loss"
        + (" (kept as `zerosiam_predictor.safetensors` to resume training)." if args.method == "zerosiam" else "."),
        "",
        "## Training",
        "",
        "| setting | value |",
        "|---|---|",
        f"| recipe | `{args.recipe or '(command line)'}` |",
        f"| base model | `{args.model}` |",
        f"| method | {args.method} (alpha = {args.alpha}) |",
        f"| protocol | {args.protocol} |",
    ]
    if args.method == "zerosiam":
        lines += [
            f"| predictor | {args.predictor}"
            + (f", rank {args.predictor_rank}" if args.predictor == "lora" else "")
            + f", lr {args.resolved_predictor_learning_rate:g} |",
        ]
    lines += [
        f"| LoRA | r = {args.lora_r}, alpha = {args.lora_alpha or 2 * args.lora_r}, "
        f"targets {args.lora_target_modules} |",
        f"| optimizer | {args.optimizer}, lr {args.learning_rate:g}, {scheduler} schedule |",
        f"| data | `{args.dataset}` ({args.question_field}), {args.num_rollouts} rollout(s) per prompt |",
        f"| rollouts | T = {args.temperature}, max {args.max_completion_length} new tokens |",
        f"| steps | {steps} |",
        "",
        "## Metrics (first logged step -> last)",
        "",
        "| metric | first | last |",
        "|---|---|---|",
    ]
    for key, label in CARD_METRICS.items():
        first, last = _first_last(metrics, key)
        if first is not None:
            lines.append(f"| {label} | {first:.4g} | {last:.4g} |")
    lines += ["", "Made with [zerosiam-llm](https://github.com/) on TRL.", ""]
    return "\n".join(lines)


def write_model_card(args, output_dir: Path, metrics: list[dict]) -> Path:
    path = Path(output_dir) / "README.md"
    atomic_write_text(path, render_model_card(args, metrics))
    return path
