"""The online protocol (the paper's LLM setting): read a benchmark as a stream, predict each batch, then adapt.

For each stream batch the current model answers first (greedy by default); that answer is the prediction that is
scored, appended to ``predictions.jsonl`` at once; then one optimisation step is taken on the batch. Every stream
(benchmark) starts from the base model with a fresh adapter, ``P = I`` and a fresh optimizer, in the same trainer
(vLLM, when used, is not restarted). ``method: none`` runs the same stream with no update.

A killed run resumes from the last checkpoint of the unfinished stream; finished streams are skipped; a batch
re-predicted after resume is not recorded twice.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zerosiam_llm.configs import ZeroSiamConfig
from zerosiam_llm.files import atomic_write_json, read_jsonl
from zerosiam_llm.grading import wilson_interval
from zerosiam_llm.run_dir import PREDICTIONS_FILE, STREAM_SUMMARY, SUMMARY_FILE, last_complete_checkpoint

TRAIN_COMMAND = (sys.executable, "-m", "zerosiam_llm")  # the training command in a child process, from any folder


def order_stream(problems: list[dict[str, Any]], seed: int | None) -> list[dict[str, Any]]:
    """The fixed stream order: a seeded permutation (or the data set's own order when seed is None)."""
    problems = list(problems)
    if seed is not None:
        random.Random(seed).shuffle(problems)
    return problems


def stream_accuracy(predictions: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy of the recorded predictions with a 95% Wilson interval; unavailable (None) without gold answers."""
    graded = [p for p in predictions if p.get("correct") is not None]
    return accuracy_record(len(predictions), len(graded), sum(bool(p["correct"]) for p in graded))


def accuracy_record(problems: int, graded: int, correct: int) -> dict[str, Any]:
    out: dict[str, Any] = {"problems": problems, "graded": graded}
    if not graded:
        out.update({"accuracy": None, "correct": None, "ci95": None, "note": "no gold answers: accuracy unavailable"})
        return out
    low, high = wilson_interval(correct, graded)
    out.update({"accuracy": correct / graded, "correct": correct, "ci95": [low, high]})
    return out


def run_streams(
    config: ZeroSiamConfig,
    streams: list[tuple[str, list[dict]]],
    source,
    tokenizer,
    fresh: bool = False,
    before_writing: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Run one method over every stream; returns ``{stream: accuracy dict}`` and writes ``summary.json``.

    Streams with a ``stream_summary.json`` are done and skipped (unless ``fresh``: their files are about to be
    deleted). The model is loaded and every stream's prompts are built and checked before ``before_writing`` is called
    (it deletes an overwritten run and records the config), so bad input leaves ``output_dir`` as it was.
    """
    from accelerate import PartialState
    from transformers import set_seed

    from zerosiam_llm.data import build_prompt_dataset, check_full_batch, prompt_budget, report_prompt_counts
    from zerosiam_llm.methods import get_method
    from zerosiam_llm.modeling import load_model, make_lora_config
    root = Path(config.output_dir)
    pending = [(n, p) for n, p in streams if fresh or not (root / n / STREAM_SUMMARY).is_file()]
    model = None
    prepared: dict[str, tuple[Any, dict]] = {}
    if pending:
        model = load_model(
            source, config.model_dtype, config.trust_remote_code, config.model_revision, config.attn_implementation,
        )  # fmt: skip
        max_prompt = prompt_budget(config, model)
        for name, problems in pending:
            dataset, counts = build_prompt_dataset(
                order_stream(problems, config.stream_seed), tokenizer, config.instruction,
                config.instruction_placement, max_prompt, config.long_prompt,
            )  # fmt: skip
            report_prompt_counts(counts, max_prompt, config.long_prompt)
            check_full_batch(len(dataset), config, PartialState().num_processes, what=f"stream {name}")
            prepared[name] = (dataset, counts)
    else:
        print(f"output_dir {root}: every stream finished earlier; nothing to train (--overwrite_output_dir redoes it)")
    if before_writing is not None and PartialState().is_main_process:
        before_writing()
    PartialState().wait_for_everyone()

    results: dict[str, Any] = {}
    trainer = None
    try:
        for name, _ in streams:
            stream_dir = root / name
            predictions_path = stream_dir / PREDICTIONS_FILE
            if name not in prepared:  # finished earlier: never redo a scored stream
                results[name] = json.loads((stream_dir / STREAM_SUMMARY).read_text())
                continue
            dataset, counts = prepared[name]
            set_seed(config.seed)
            if trainer is None:
                config.output_dir = str(stream_dir)
                lora = make_lora_config(
                    config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules
                )
                trainer = get_method(config.method).trainer_class(
                    model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora
                )
            else:
                trainer.reset_stream(dataset, str(stream_dir))
            trainer.stream_name = name
            resume = last_complete_checkpoint(stream_dir) if config.resume else None
            trainer.train(resume_from_checkpoint=resume)
            if trainer.is_world_process_zero():
                summary = {"stream": name, "method": config.method, **stream_accuracy(read_jsonl(predictions_path))}
                summary["prompts"] = counts
                atomic_write_json(stream_dir / STREAM_SUMMARY, summary)
                results[name] = summary
    finally:
        if trainer is not None:
            trainer.close()
    config.output_dir = str(root)
    atomic_write_json(root / SUMMARY_FILE, {"method": config.method, "model": config.model, "streams": results})
    return results
