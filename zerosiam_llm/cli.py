"""Command-line entry points: ``train.py`` / ``zerosiam-train``. Bad input: one line on stderr, exit code 2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zerosiam_llm.configs import ZeroSiamConfig
from zerosiam_llm.errors import UserInputError, run_cli
from zerosiam_llm.files import atomic_write_json, read_jsonl
from zerosiam_llm.parser import parse_config
from zerosiam_llm.run_dir import METRICS_FILE, SUMMARY_FILE, OutputPlan, commit_output_dir, plan_output_dir


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
    from zerosiam_llm.methods import get_method
    from zerosiam_llm.modeling import load_model, load_tokenizer, make_lora_config, resolve_model, warn_remote_code

    source = resolve_model(config.model)
    if PartialState().is_main_process:
        warn_remote_code(source, config.trust_remote_code)
    if config.protocol == "online" and config.compare_methods:
        from zerosiam_llm.compare import compare_methods, comparison_table

        results = compare_methods(config, argv)
        print(comparison_table(results, f"Online protocol, {config.model}"))
        print(f"table: {Path(config.output_dir) / 'comparison.md'} and comparison.json")
        return 0
    # everything a user can get wrong is checked before the old run is deleted or anything is written
    plan = plan_output_dir(config)
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
    trainer_class = get_method(config.method).trainer_class
    trainer = trainer_class(model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    out = Path(config.output_dir)
    if trainer.is_world_process_zero():
        commit_output_dir(plan, config)
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
    commit = lambda: commit_output_dir(plan, config)  # noqa: E731
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
