"""Evaluation on MATH-500, AIME24, AIME25, AMC23 and GSM8K: ``evals/evaluate.py`` and the ``zerosiam-eval`` script.

One protocol for every model, checkpoint or adapter:

* prompts come from the one prompt builder (:mod:`zerosiam_llm.prompts`: the model's chat template plus the
  instruction), and each rendered prompt is stored verbatim next to its completion;
* completions come from a backend in :mod:`zerosiam_llm.evaluation.generation` (HF ``generate`` or vLLM);
* answers are graded by the one grader (:mod:`zerosiam_llm.grading`: last ``\\boxed{}`` / "the answer is" / last
  number, then math-verify with the gold first, in worker processes with a hard deadline).

Outputs in ``--output_dir``: ``<benchmark>.jsonl`` (one line per sample, appended and flushed as samples are
generated, graded fields added at the end), ``run_config.json`` (the settings; a re-run with other settings is
refused unless ``--overwrite``), ``summary.json`` and ``summary.md``. Re-running the same command generates only
the samples that are missing, so a killed run loses at most the samples in flight. ``--compare RUN_A RUN_B ...``
puts runs side by side with paired bootstrap intervals of the differences.

Bad input is one ``error:`` line and exit code 2: an unknown benchmark (the known ones are listed), a missing data
file (where it looked, and that ``--data_dir`` or network access is needed), a data or results line that is not
UTF-8 or not JSON (named by file and line number), settings that differ from the run already in ``--output_dir``.

Modules: ``benchmarks`` (the registry and problem loading), ``generation`` (HF / vLLM backends), ``run`` (the
resumable run), ``metrics`` (scores and intervals), ``reports`` (Markdown summaries and comparisons), ``cli``.
"""

from zerosiam_llm.evaluation.benchmarks import (
    BENCHMARKS_FILE,
    Benchmark,
    find_benchmarks_file,
    load_benchmark_problems,
    load_benchmarks,
    select_benchmarks,
)
from zerosiam_llm.evaluation.cli import main, parse_args
from zerosiam_llm.evaluation.compare import compare_runs, format_comparison_md
from zerosiam_llm.evaluation.metrics import summarize_benchmark
from zerosiam_llm.evaluation.reports import format_summary_md
from zerosiam_llm.evaluation.run import grade_records, read_results, run_evaluation

__all__ = [
    "BENCHMARKS_FILE", "Benchmark", "compare_runs", "find_benchmarks_file", "format_comparison_md",
    "format_summary_md", "grade_records", "load_benchmark_problems", "load_benchmarks", "main", "parse_args",
    "read_results", "run_evaluation", "select_benchmarks", "summarize_benchmark",
]  # fmt: skip
