"""Command-line entry points: ``train.py`` / ``zerosiam-train``. Bad input: one line on stderr, exit code 2."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from zerosiam_llm.callbacks import (
    GUARD_EVENTS_FILE,
    HEALTHY_DIR,
    METRICS_FILE,
    PREDICTIONS_FILE,
    SAMPLES_FILE,
    SUMMARY_FILE,
    last_complete_checkpoint,
)
from zerosiam_llm.errors import UserInputError, run_cli
from zerosiam_llm.files import atomic_write_json, atomic_write_text, check_writable, read_jsonl
from zerosiam_llm.parser import parse_config
from zerosiam_llm.zerosiam_config import ZeroSiamConfig

RESOLVED_CONFIG = "resolved_config.yaml"
# fields that may change between a run and its resumption (output_dir: a run folder can be moved)
RESUMABLE_CHANGES = {
    "output_dir", "project", "max_steps", "num_train_epochs", "save_steps", "save_total_limit", "logging_steps",
    "report_to", "push_to_hub", "hub_model_id", "hub_strategy", "hub_private_repo", "resume", "overwrite_output_dir",
    "disable_tqdm", "monitor_every", "run_name", "dataloader_num_workers",
}  # fmt: skip
RUN_FILES = (METRICS_FILE, SAMPLES_FILE, SUMMARY_FILE, RESOLVED_CONFIG, "README.md", "completions", GUARD_EVENTS_FILE,
             HEALTHY_DIR, PREDICTIONS_FILE)  # fmt: skip


@dataclass
class OutputPlan:
    """What ``output_dir`` holds and what this command will do with it (decided before anything is written)."""

    path: Path
    overwrite: bool = False  # delete the previous run's files once every input has been validated
    resume_from: str | None = None  # the checkpoint to resume from
    finished: str | None = None  # the reason there is nothing to do (a finished run re-run with the same target)


def _is_run_file(child: Path) -> bool:
    """Files and folders a run writes (an online stream folder included): what --overwrite_output_dir deletes."""
    from zerosiam_llm.online import STREAM_SUMMARY

    if child.name in RUN_FILES or child.name.startswith(("checkpoint-", "adapter_", "zerosiam_predictor")):
        return True
    return child.is_dir() and any((child / name).exists() for name in (STREAM_SUMMARY, PREDICTIONS_FILE))


def _plan_output_dir(config: ZeroSiamConfig) -> OutputPlan:
    """Refuse an unusable output_dir, or one holding something else; deletes and writes nothing."""

    out = Path(config.output_dir)
    check_writable(out, "output_dir")  # also: a file in the way
    if not out.exists() or not any(out.iterdir()):
        return OutputPlan(out)
    if config.overwrite_output_dir:
        return OutputPlan(out, overwrite=True)
    previous = out / RESOLVED_CONFIG
    if not previous.is_file():
        raise UserInputError(
            f"output_dir {out} is not empty and holds no zerosiam-llm run; choose another or pass "
            "--overwrite_output_dir"
        )
    try:
        old = yaml.safe_load(previous.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError):
        raise UserInputError(f"{previous} is unreadable; pass --overwrite_output_dir to start over") from None
    new = yaml.safe_load(yaml.safe_dump(config.resolved_dict()))
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
    if changed:
        raise UserInputError(
            f"output_dir {out} holds another run (differs in {', '.join(changed[:6])}); choose another output_dir "
            "or pass --overwrite_output_dir"
        )
    plan = OutputPlan(out, resume_from=last_complete_checkpoint(out) if config.resume else None)
    if config.protocol == "offline":
        plan.finished = _finished_offline_run(config, out, old)
    return plan


def _finished_offline_run(config: ZeroSiamConfig, out: Path, old: dict) -> str | None:
    """Why a finished run needs nothing more (same target reached, or stopped by the guard); None to train on."""
    summary_path = out / SUMMARY_FILE
    if not summary_path.is_file():
        return None  # never finished (killed): resume
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    steps = summary.get("steps") or 0
    if summary.get("stopped_by_guard"):
        return f"it was stopped by the collapse guard at step {steps} ({summary['stopped_by_guard']['message']})"
    if config.max_steps > 0:
        target = config.max_steps
    elif old.get("max_steps", -1) <= 0 and old.get("num_train_epochs") == config.num_train_epochs:
        target = summary.get("max_steps") or steps  # the same epochs: the step count that run planned
    else:
        return None  # epochs changed: the trainer works out the new target
    if steps >= target:
        return f"it finished {steps} of {target} steps"
    return None


def _commit_output_dir(plan: OutputPlan, config: ZeroSiamConfig) -> None:
    """After validation: delete the previous run when overwriting, then record this run's config."""
    if plan.overwrite and plan.path.is_dir():
        for child in plan.path.iterdir():
            if _is_run_file(child):
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    _write_resolved_config(config)


def _summarise(config: ZeroSiamConfig, counts: dict, out: Path, trainer=None) -> dict[str, Any]:
    metrics = [m for m in read_jsonl(out / METRICS_FILE) if "loss" in m or "entropy" in m]

    def first_last(key):
        values = [m[key] for m in metrics if isinstance(m.get(key), (int, float))]
        return (values[0], values[-1]) if values else (None, None)

    h0, h1 = first_last("entropy")
    a0, a1 = first_last("monitor/accuracy")
    summary = {
        "method": config.method,
        "model": config.model,
        "steps": max((m.get("step", 0) for m in metrics), default=0),
        "max_steps": trainer.state.max_steps if trainer is not None else None,
        "entropy_target_first": h0,
        "entropy_target_last": h1,
        "monitor_accuracy_first": a0,
        "monitor_accuracy_last": a1,
        "prompts": counts,
        "adapter": str(out.resolve()),
        "guard_events": len(read_jsonl(out / "guard_events.jsonl")),
        "stopped_by_guard": None,
        "rollbacks": [],
        "nonfinite_skipped_steps": getattr(trainer, "nonfinite_total", 0),
    }
    guard = getattr(trainer, "guard_callback", None)
    if guard is not None:
        summary["rollbacks"] = guard.rollbacks
        if guard.stop_event is not None:
            healthy = guard.last_healthy()
            summary["stopped_by_guard"] = {
                "message": guard.stop_event.message,
                "adapter_from": str(healthy) if healthy else "the initial adapter (no healthy checkpoint yet)",
            }
    return summary


def _print_summary(summary: dict[str, Any]) -> None:
    def fmt(v):
        return "n/a" if v is None else f"{v:.3f}"

    print(
        f"\n{summary['method']} on {summary['model']}: {summary['steps']} steps\n"
        f"  entropy H(p_r): {fmt(summary['entropy_target_first'])} -> {fmt(summary['entropy_target_last'])}\n"
        f"  monitor accuracy (gold answers, not used for training): {fmt(summary['monitor_accuracy_first'])} -> "
        f"{fmt(summary['monitor_accuracy_last'])}\n"
        f"  {'adapter + predictor' if summary['method'] == 'zerosiam' else 'adapter'} + card: {summary['adapter']}"
    )
    if summary.get("guard_events"):
        print(f"  collapse guard: {summary['guard_events']} event(s), see guard_events.jsonl")
    if summary.get("stopped_by_guard"):
        stop = summary["stopped_by_guard"]
        print(f"  STOPPED: {stop['message']}\n  the saved adapter is the last healthy one: {stop['adapter_from']}")


def train(argv: list[str]) -> int:
    config = parse_config(argv)  # --help prints every field and exits 0

    from accelerate import PartialState
    from transformers import set_seed

    from zerosiam_llm.data import build_prompt_dataset, check_full_batch, prompt_budget, report_prompt_counts
    from zerosiam_llm.modeling import load_model, load_tokenizer, make_lora_config, resolve_model, warn_remote_code
    from zerosiam_llm.trainers import trainer_class

    source = resolve_model(config.model)
    if PartialState().is_main_process:
        warn_remote_code(source, config.trust_remote_code)
    if config.protocol == "online" and config.compare_methods:
        from zerosiam_llm.online import compare_methods, comparison_table

        results = compare_methods(config, argv)
        print(comparison_table(results, f"Online protocol, {config.model}"))
        print(f"table: {Path(config.output_dir) / 'comparison.md'} and comparison.json")
        return 0
    # everything a user can get wrong is checked before the old run is deleted or anything is written
    plan = _plan_output_dir(config)
    if plan.finished:
        print(f"output_dir {plan.path} holds a finished run: {plan.finished}; nothing to do (a larger --max_steps "
              "continues it, --overwrite_output_dir starts over)")  # fmt: skip
        return 0
    if config.protocol == "online":
        return _train_online(config, source, plan)
    problems = _config_problems(config)
    set_seed(config.seed)
    tokenizer = load_tokenizer(source, config.trust_remote_code)
    model = load_model(
        source, config.model_dtype, config.trust_remote_code, config.model_revision, config.attn_implementation
    )
    max_prompt = prompt_budget(config, model)
    dataset, counts = build_prompt_dataset(
        problems, tokenizer, config.instruction, config.instruction_placement, max_prompt, config.long_prompt,
    )  # fmt: skip
    report_prompt_counts(counts, max_prompt, config.long_prompt)
    check_full_batch(len(dataset), config, PartialState().num_processes)
    lora = make_lora_config(config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules)
    trainer = trainer_class(config)(model, args=config, train_dataset=dataset, processing_class=tokenizer,
                                    peft_config=lora)  # fmt: skip
    out = Path(config.output_dir)
    if trainer.is_world_process_zero():
        _commit_output_dir(plan, config)
    trainer.accelerator.wait_for_everyone()
    try:
        trainer.train(resume_from_checkpoint=plan.resume_from)
        trainer.save_model(config.output_dir)  # adapter + predictor sidecar (+ Hub push when push_to_hub)
    finally:
        trainer.close()
    if trainer.is_world_process_zero():
        trainer.create_model_card()
        summary = _summarise(config, counts, out, trainer)
        atomic_write_json(out / SUMMARY_FILE, summary)
        _print_summary(summary)
    return 0


def _config_problems(config: ZeroSiamConfig) -> list[dict[str, Any]]:
    """The problems the recipe's data fields describe (``dataset``, fields, split, limit, seed)."""
    from zerosiam_llm.data import load_problems

    return load_problems(
        config.dataset,
        question_field=config.question_field,
        answer_field=config.answer_field,
        id_field=config.id_field,
        split=config.dataset_split,
        config_name=config.dataset_config,
        limit=config.num_problems,
        seed=config.data_seed if config.data_seed is not None else config.seed,
        answer_style=config.answer_style,
    )


def _write_resolved_config(config: ZeroSiamConfig) -> None:
    atomic_write_text(
        Path(config.output_dir) / RESOLVED_CONFIG, yaml.safe_dump(config.resolved_dict(), sort_keys=True)
    )


def _stream_name(dataset: str) -> str:
    if dataset.startswith("generated:"):
        return dataset.split(":", 1)[1]
    return Path(dataset).stem if Path(dataset).suffix else dataset.rstrip("/").split("/")[-1]


def _train_online(config: ZeroSiamConfig, source, plan: OutputPlan) -> int:
    from zerosiam_llm.modeling import load_tokenizer
    from zerosiam_llm.online import run_streams

    if config.benchmarks:
        from zerosiam_llm.evaluation import (
            find_benchmarks_file,
            load_benchmark_problems,
            load_benchmarks,
            select_benchmarks,
        )

        definitions = load_benchmarks(find_benchmarks_file(config.benchmarks_file))
        streams = []
        for bench in select_benchmarks(",".join(config.benchmarks), definitions, config.data_dir):
            problems, _ = load_benchmark_problems(bench, config.data_dir)
            streams.append((bench.name, problems[: config.num_problems] if config.num_problems else problems))
    else:
        streams = [(_stream_name(config.dataset), _config_problems(config))]
    for name, problems in streams:
        if not problems:
            raise UserInputError(f"stream {name} has no problems")
    tokenizer = load_tokenizer(source, config.trust_remote_code)
    out = Path(config.output_dir)
    commit = lambda: _commit_output_dir(plan, config)  # noqa: E731
    results = run_streams(config, streams, source, tokenizer, fresh=plan.overwrite, before_writing=commit)
    for name, r in results.items():
        acc = (
            "n/a (no gold answers)"
            if r["accuracy"] is None
            else f"{100 * r['accuracy']:.1f}% ({r['correct']}/{r['graded']})"
        )
        print(f"{config.method} online on {name}: {r['problems']} problems, accuracy {acc}")
    print(f"predictions: {out}/<stream>/predictions.jsonl")
    return 0


def train_main(argv: list[str] | None = None) -> int:
    """``zerosiam-train`` / ``python train.py`` / ``python -m zerosiam_llm``."""
    return run_cli(train, argv)
