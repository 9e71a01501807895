"""The project's one grader: answer extraction, math-verify equivalence in worker processes, and metrics.

Used by the training monitors, the online protocol and the evaluation CLI, so every number in the project is
graded the same way (see ``shared/research/eval.md`` for why each step is there):

- ``extraction``: :func:`extract_answer` (last complete ``\\boxed{}``, then "the answer is", then the last number),
  :func:`gold_answer` (``boxed`` / ``gsm8k`` / ``plain`` data fields), :func:`normalize_answer`;
- ``verifier``: :class:`Grader`, math-verify in worker processes with a hard per-answer deadline;
- ``statistics``: :func:`pass_at_k`, :func:`avg_at_n`, :func:`answer_clusters`, :func:`majority_answer`,
  :func:`maj_at_k`,
  :func:`bootstrap_ci`, :func:`paired_bootstrap_diff`, :func:`wilson_interval`.
"""

from zerosiam_llm.grading.extraction import (
    EXTRACTION_SOURCES,
    GOLD_STYLES,
    Extraction,
    extract_answer,
    gold_answer,
    has_boxed,
    normalize_answer,
)
from zerosiam_llm.grading.statistics import (
    answer_clusters,
    avg_at_n,
    bootstrap_ci,
    maj_at_k,
    majority_answer,
    paired_bootstrap_diff,
    pass_at_k,
    wilson_interval,
)
from zerosiam_llm.grading.verifier import Grader, GradingStats

__all__ = [
    "EXTRACTION_SOURCES", "GOLD_STYLES", "Extraction", "Grader", "GradingStats", "answer_clusters", "avg_at_n",
    "bootstrap_ci", "extract_answer", "gold_answer", "has_boxed", "maj_at_k", "majority_answer", "normalize_answer",
    "paired_bootstrap_diff", "pass_at_k", "wilson_interval",
]  # fmt: skip
