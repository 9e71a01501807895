"""The command line of ``zerosiam-eval`` / ``evals/evaluate.py``: bad input is one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence

from zerosiam_llm.errors import UserInputError
from zerosiam_llm.evaluation.compare import run_compare
from zerosiam_llm.evaluation.run import run_evaluation
from zerosiam_llm.prompts import DEFAULT_INSTRUCTION

# Command line
# ---------------------------------------------------------------------------------------------------------------


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _positive(text: str) -> float:
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="evaluate.py",
        description="Score a model, checkpoint or adapter on MATH-500, AIME24, AIME25, AMC23 and GSM8K, or compare "
        "evaluation runs (--compare).",
    )
    parser.add_argument("--model", help="Hub id, local folder, .gguf file or embedded:smollm2-135m")
    parser.add_argument("--adapter", help="peft adapter folder or Hub id (e.g. a train.py output_dir)")
    parser.add_argument("--benchmarks", default="all", help="comma-separated names from the benchmarks file, or all")
    parser.add_argument("--benchmarks_file", help="benchmark definitions (default: the package's benchmarks.yaml)")
    parser.add_argument("--data_dir", help="read <data_dir>/<local_file> (e.g. gsm8k_test.jsonl) instead of the Hub")
    parser.add_argument("--data_file", action="append", metavar="NAME=PATH", help="a local file for one benchmark")
    parser.add_argument("--limit", type=_count, help="only the first N problems of each benchmark")
    parser.add_argument("--n", type=_count, help="samples per problem (default: per benchmark)")
    parser.add_argument("--temperature", type=_finite, help="0 = greedy (default: per benchmark)")
    parser.add_argument("--top_p", type=_finite, help="nucleus sampling (default: per benchmark)")
    parser.add_argument("--max_new_tokens", type=_count, help="completion budget (default: per benchmark)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--instruction", default=DEFAULT_INSTRUCTION)
    parser.add_argument("--instruction_placement", choices=("user", "system"), default="user")
    parser.add_argument("--output_dir", help="run folder: <benchmark>.jsonl, run_config.json, summary.json/.md")
    parser.add_argument("--overwrite", action="store_true", help="delete the results in --output_dir and start over")
    parser.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="auto: bf16 on GPUs and on CPUs with bf16 instructions, else fp32",
    )
    parser.add_argument("--device", help="hf backend: cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--batch_size", type=_count, default=32, help="hf backend: sequences per generate call")
    parser.add_argument("--gpu_memory_utilization", type=_positive, default=0.9, help="vllm backend")
    parser.add_argument("--max_model_len", type=_count, help="vllm backend: context length (e.g. 4096 for Qwen-Math)")
    parser.add_argument("--tensor_parallel_size", type=_count, default=1, help="vllm backend")
    parser.add_argument("--trust_remote_code", action="store_true")
    parser.add_argument("--revision", help="model revision on the Hub")
    parser.add_argument("--grader_timeout", type=_positive, default=5.0, help="seconds per answer before it is wrong")
    parser.add_argument("--grader_workers", type=_count, help="grading processes (default: CPU cores, at most 8)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    parser.add_argument("--compare", nargs="+", metavar="RUN", help="compare run folders (the first is the baseline)")
    return parser


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a :class:`UserInputError`: one ``error:`` line and exit code 2, like every
    other bad input of the project."""

    def error(self, message: str):  # type: ignore[override]
        raise UserInputError(f"{message} (see --help)")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse the command line (``--help`` exits 0)."""
    return build_parser().parse_args(list(argv))


def evaluate(argv: Sequence[str], benchmarks_file: str | os.PathLike | None = None) -> int:
    """The command: evaluate, or compare runs with ``--compare``."""
    args = parse_args(argv)
    if args.compare:
        return run_compare(args)
    run_evaluation(args, benchmarks_file)
    return 0


def main(argv: list[str] | None = None, benchmarks_file: str | os.PathLike | None = None) -> int:
    """``zerosiam-eval`` / ``python evals/evaluate.py``: bad input is one ``error:`` line and exit code 2."""
    from zerosiam_llm.errors import run_cli

    return run_cli(lambda a: evaluate(a, benchmarks_file), argv)
