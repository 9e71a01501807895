"""The command line of ``zerosiam-eval`` / ``evals/evaluate.py``: :class:`EvalArguments`, parsed by ``trl.TrlParser``
(``--config FILE.yaml`` or ``--field value``); bad input is one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from zerosiam_llm.decoding import DECODINGS, EM_INF_HELP, EMInfSettings
from zerosiam_llm.errors import UserInputError, run_cli
from zerosiam_llm.evaluation.compare import run_compare
from zerosiam_llm.evaluation.run import run_evaluation
from zerosiam_llm.parser import FieldParser, pop_option
from zerosiam_llm.prompts import DEFAULT_INSTRUCTION, INSTRUCTION_PLACEMENTS

BACKENDS = ("hf", "vllm")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class EvalArguments:
    """Score a model, checkpoint or adapter on MATH-500, AIME24, AIME25, AMC23 and GSM8K, or compare runs."""

    model: str | None = field(
        default=None, metadata={"help": "Hub id, local folder, .gguf file or embedded:smollm2-135m"}
    )
    adapter: str | None = field(
        default=None, metadata={"help": "peft adapter folder or Hub id (e.g. a train.py output_dir)"}
    )
    benchmarks: str = field(default="all", metadata={"help": "comma-separated names from the benchmarks file, or all"})
    benchmarks_file: str | None = field(
        default=None, metadata={"help": "benchmark definitions (default: the package's benchmarks.yaml)"}
    )
    data_dir: str | None = field(
        default=None, metadata={"help": "read <data_dir>/<local_file> (e.g. gsm8k_test.jsonl) instead of the Hub"}
    )
    data_file: list[str] | None = field(
        default=None, metadata={"help": "NAME=PATH: a local file for a benchmark (several: NAME=PATH NAME=PATH)"}
    )
    limit: int | None = field(default=None, metadata={"help": "only the first N problems of each benchmark"})
    n: int | None = field(default=None, metadata={"help": "samples per problem (default: per benchmark)"})
    temperature: float | None = field(default=None, metadata={"help": "0 = greedy (default: per benchmark)"})
    top_p: float | None = field(default=None, metadata={"help": "nucleus sampling (default: per benchmark)"})
    max_new_tokens: int | None = field(default=None, metadata={"help": "completion budget (default: per benchmark)"})
    seed: int = field(default=0, metadata={"help": "sampling seed (per prompt: seed + hash of the prompt)"})
    instruction: str = field(default=DEFAULT_INSTRUCTION, metadata={"help": "instruction added to every prompt"})
    instruction_placement: str = field(default="user", metadata={"help": "user or system"})
    output_dir: str | None = field(
        default=None, metadata={"help": "run folder: <benchmark>.jsonl, run_config.json, summary.json/.md"}
    )
    overwrite: bool = field(default=False, metadata={"help": "delete the results in --output_dir and start over"})
    backend: str = field(default="hf", metadata={"help": "hf or vllm"})
    decoding: str = field(
        default="standard",
        metadata={
            "help": "standard, or em-inf (EM-INF, Agarwal et al. 2025: a few Adam steps of each step's raw logits "
            "toward lower entropy, before the other logits processors; hf backend only)"
        },
    )
    em_inf_learning_rate: float = field(default=0.1, metadata={"help": EM_INF_HELP["learning_rate"]})
    em_inf_steps: int = field(default=5, metadata={"help": EM_INF_HELP["steps"]})
    em_inf_kl_weight: float = field(default=1e-3, metadata={"help": EM_INF_HELP["kl_weight"]})
    em_inf_threshold: float = field(default=0.3, metadata={"help": EM_INF_HELP["threshold"]})
    dtype: str = field(
        default="auto",
        metadata={"help": "auto (bf16 on GPUs and bf16-capable CPUs, else fp32), float32, bfloat16, float16"},
    )
    device: str | None = field(
        default=None, metadata={"help": "hf backend: cpu, cuda, cuda:1 (default: cuda when available)"}
    )
    batch_size: int = field(default=32, metadata={"help": "hf backend: sequences per generate call"})
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "vllm backend: share of GPU memory"})
    max_model_len: int | None = field(
        default=None, metadata={"help": "vllm backend: context length (e.g. 4096 for Qwen-Math)"}
    )
    tensor_parallel_size: int = field(default=1, metadata={"help": "vllm backend: GPUs per model"})
    trust_remote_code: bool = field(default=False, metadata={"help": "run the model folder's own Python code"})
    revision: str | None = field(default=None, metadata={"help": "model revision on the Hub"})
    grader_timeout: float = field(default=5.0, metadata={"help": "seconds per answer before it is graded wrong"})
    grader_workers: int | None = field(
        default=None, metadata={"help": "grading processes (default: CPU cores, at most 8)"}
    )
    no_progress: bool = field(default=False, metadata={"help": "no progress bars"})
    compare: list[str] | None = field(
        default=None, metadata={"help": "compare run folders (the first is the baseline): --compare RUN_A RUN_B ..."}
    )

    def __post_init__(self) -> None:
        for name in ("limit", "n", "max_new_tokens", "batch_size", "max_model_len", "tensor_parallel_size",
                     "grader_workers"):  # fmt: skip
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserInputError(f"{name} must be an integer >= 1, got {value}")
        for name in ("grader_timeout", "gpu_memory_utilization"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise UserInputError(f"{name} must be a number > 0, got {getattr(self, name)}")
        for name, allowed in (("backend", BACKENDS), ("dtype", DTYPES), ("decoding", DECODINGS),
                              ("instruction_placement", INSTRUCTION_PLACEMENTS)):  # fmt: skip
            if getattr(self, name) not in allowed:
                raise UserInputError(f"{name}: {getattr(self, name)!r} is not allowed; allowed: {', '.join(allowed)}")
        self.em_inf_settings.check()
        if self.decoding == "em-inf" and self.backend != "hf":
            raise UserInputError(
                "decoding em-inf needs --backend hf: vLLM samples in its own engine and runs no HF logits processor"
            )


    @property
    def em_inf_settings(self) -> EMInfSettings:
        return EMInfSettings.of(self)


def eval_parser() -> FieldParser:
    return FieldParser(EvalArguments, prog="zerosiam-eval", description=EvalArguments.__doc__)


def parse_args(argv: Sequence[str]) -> EvalArguments:
    """``[--config FILE.yaml] [--field value ...]`` -> :class:`EvalArguments` (``--help`` exits 0)."""
    argv = list(argv)
    config_file = pop_option(argv, "config")
    parser = eval_parser()
    if config_file is None:
        return parser.parse(argv)
    if not os.path.isfile(config_file):
        raise UserInputError(f"config file {config_file} does not exist")
    from pathlib import Path

    return parser.parse(argv, parser.read_config(Path(config_file)))


def evaluate(argv: Sequence[str], benchmarks_file: str | os.PathLike | None = None) -> int:
    """The command: evaluate, or compare runs with ``--compare``."""
    args = parse_args(argv)
    if args.compare:
        return run_compare(args)
    run_evaluation(args, benchmarks_file)
    return 0


def main(argv: list[str] | None = None, benchmarks_file: str | os.PathLike | None = None) -> int:
    """``zerosiam-eval`` / ``python evals/evaluate.py``: bad input is one ``error:`` line and exit code 2."""
    return run_cli(lambda a: evaluate(a, benchmarks_file), argv)
