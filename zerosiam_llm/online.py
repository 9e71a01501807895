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
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zerosiam_llm.callbacks import PREDICTIONS_FILE, SUMMARY_FILE
from zerosiam_llm.errors import UserInputError
from zerosiam_llm.files import atomic_write_json, atomic_write_text, read_jsonl
from zerosiam_llm.grading import wilson_interval
from zerosiam_llm.zerosiam_config import ZeroSiamConfig

STREAM_SUMMARY = "stream_summary.json"
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
    return _accuracy(len(predictions), len(graded), sum(bool(p["correct"]) for p in graded))


def _accuracy(problems: int, graded: int, correct: int) -> dict[str, Any]:
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

    from zerosiam_llm.callbacks import last_complete_checkpoint
    from zerosiam_llm.data import build_prompt_dataset, check_full_batch, prompt_budget, report_prompt_counts
    from zerosiam_llm.modeling import load_model, make_lora_config
    from zerosiam_llm.trainers import trainer_class

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
                trainer = trainer_class(config)(
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


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def comparison_table(results: dict[str, dict[str, Any]], title: str) -> str:
    """Markdown in the paper's shape: methods x streams, accuracy % (correct/graded) [95% CI]."""
    streams = sorted({s for per_method in results.values() for s in per_method})
    lines = [f"# {title}", "", "| method | " + " | ".join(streams) + " |", "|---|" + "---|" * len(streams)]
    for method, per_stream in results.items():
        cells = []
        for stream in streams:
            r = per_stream.get(stream)
            if r is None:
                cells.append("-")
            elif r.get("accuracy") is None:
                cells.append(f"n/a ({r.get('problems', 0)} problems, no gold)")
            else:
                low, high = r["ci95"]
                cells.append(f"{_pct(r['accuracy'])} ({r['correct']}/{r['graded']}) [{_pct(low)}, {_pct(high)}]")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Accuracy % of the online predictions (each made before that batch's update), 95% Wilson interval.",
        "",
    ]
    return "\n".join(lines)


def pool_comparisons(runs: list[dict[str, dict[str, dict[str, Any]]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Several comparisons of the same methods and streams (e.g. stream orders) as one: per method and stream, the
    recorded predictions counted together, with a Wilson interval on the pooled count."""
    pooled: dict[str, dict[str, dict[str, Any]]] = {}
    for method in runs[0]:
        for stream in runs[0][method]:
            cells = [run.get(method, {}).get(stream) for run in runs]
            if any(c is None for c in cells):
                raise UserInputError(f"method {method}, stream {stream} is missing from one of the comparisons")
            pooled.setdefault(method, {})[stream] = _accuracy(
                sum(c["problems"] for c in cells), sum(c.get("graded", 0) for c in cells),
                sum(c.get("correct") or 0 for c in cells),
            )  # fmt: skip
    return pooled


def pool_main(argv: list[str] | None = None) -> int:
    """``python scripts/pool_comparisons.py OUT DIR [DIR ...]``: pool ``DIR/comparison.json`` files into
    ``OUT/comparison.md`` / ``.json``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2:
        raise UserInputError("usage: pool_comparisons.py OUT_DIR COMPARISON_DIR [COMPARISON_DIR ...]")
    out, sources = Path(argv[0]), [Path(a) for a in argv[1:]]
    runs, model = [], None
    for source in sources:
        path = source / "comparison.json"
        if not path.is_file():
            raise UserInputError(f"{path} does not exist (a --compare_methods output_dir holds it)")
        data = json.loads(path.read_text(encoding="utf-8"))
        runs.append(data["results"])
        model = data.get("model", model)
    pooled = pool_comparisons(runs)
    out.mkdir(parents=True, exist_ok=True)
    title = f"Online protocol, {model}, {len(runs)} runs pooled ({', '.join(str(s) for s in sources)})"
    atomic_write_text(out / "comparison.md", comparison_table(pooled, title))
    atomic_write_json(out / "comparison.json", {"model": model, "pooled_from": [str(s) for s in sources],
                                                "results": pooled})  # fmt: skip
    print(comparison_table(pooled, title))
    return 0


def compare_methods(config: ZeroSiamConfig, argv: list[str]) -> dict[str, Any]:
    """Run each method in its own process (clean GPU memory, resumable) on the same streams; write the table."""
    root = Path(config.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    base = _strip_flags(argv, ("compare_methods", "compare_overrides", "method", "output_dir"))
    results = {}
    for method in config.compare_methods:
        out = root / method
        cmd = [*TRAIN_COMMAND, *base, "--method", method, "--output_dir", str(out), *method_overrides(config, method)]
        print(f"[compare] {method}: {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.run(cmd)
        if proc.returncode != 0:
            raise UserInputError(f"method {method} failed (exit code {proc.returncode}); see its output above")
        results[method] = json.loads((out / SUMMARY_FILE).read_text())["streams"]
    title = f"Online protocol, {config.model}"
    atomic_write_text(root / "comparison.md", comparison_table(results, title))
    atomic_write_json(root / "comparison.json", {"model": config.model, "results": results})
    return results


def method_overrides(config: ZeroSiamConfig, method: str) -> list[str]:
    """The ``--field value`` flags ``compare_overrides`` sets for ``method`` (its group's, then its own)."""
    from zerosiam_llm.rewards import RL_METHODS

    overrides = config.compare_overrides or {}
    group = "rl" if method in RL_METHODS else "entropy"
    values = {**overrides.get(group, {}), **overrides.get(method, {})}
    flags = []
    for name, value in values.items():
        flags += [f"--{name}", json.dumps(value) if isinstance(value, (list, dict)) else str(value)]
    return flags


def _strip_flags(argv: list[str], names: tuple[str, ...]) -> list[str]:
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        key = token[2:].split("=", 1)[0].replace("-", "_") if token.startswith("--") else None
        if key in names:
            i += 1 if "=" in token or i + 1 >= len(argv) or argv[i + 1].startswith("--") else 2
            continue
        out.append(token)
        i += 1
    return out
