"""Evaluation on MATH-500, AIME24, AIME25, AMC23 and GSM8K: ``evals/evaluate.py`` and the ``zerosiam-eval`` script.

One protocol for every model, checkpoint or adapter:

* prompts come from the one prompt builder (:mod:`zerosiam_llm.prompts`: the model's chat template plus the
  instruction), and each rendered prompt is stored verbatim next to its completion;
* completions come from a backend in :mod:`zerosiam_llm.rollout` (HF ``generate`` or vLLM);
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
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zerosiam_llm.errors import UserInputError
from zerosiam_llm.files import (
    append_jsonl,
    atomic_write_json,
    atomic_write_text,
    check_writable,
    load_yaml,
    read_jsonl,
)
from zerosiam_llm.grading import (
    GOLD_STYLES,
    Grader,
    avg_at_n,
    bootstrap_ci,
    extract_answer,
    maj_at_k,
    paired_bootstrap_diff,
    pass_at_k,
)
from zerosiam_llm.prompts import DEFAULT_INSTRUCTION, build_messages, render_prompt

logger = logging.getLogger(__name__)

__all__ = [
    "Benchmark",
    "compare_runs",
    "find_benchmarks_file",
    "format_comparison_md",
    "format_summary_md",
    "grade_records",
    "load_benchmark_problems",
    "load_benchmarks",
    "main",
    "parse_args",
    "read_results",
    "run_evaluation",
    "select_benchmarks",
    "summarize_benchmark",
]

RUN_CONFIG = "run_config.json"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
COMPARISON_JSON = "comparison.json"
COMPARISON_MD = "comparison.md"
RUN_FORMAT = "zerosiam-eval/1"
BENCHMARKS_FILE = Path(__file__).resolve().parent / "benchmarks.yaml"  # shipped in the package
EXTRACTION_RULE = 'last complete \\boxed{}, else "the (final) answer is ...", else the last number'


# ---------------------------------------------------------------------------------------------------------------
# Benchmark definitions (zerosiam_llm/benchmarks.yaml, shipped in the package)
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: where its problems live, how to read the gold answer, and its default decoding."""

    name: str
    display_name: str
    hub_id: str
    split: str
    question_field: str
    answer_field: str
    answer_style: str
    local_file: str
    config: str | None = None
    id_field: str | None = None
    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 4096


_REQUIRED_FIELDS = ("hub_id", "split", "question_field", "answer_field", "answer_style", "local_file")


def load_benchmarks(path: str | os.PathLike) -> dict[str, Benchmark]:
    """Read the benchmark definitions (name -> :class:`Benchmark`) from a YAML file."""
    path = Path(path)
    data = load_yaml(path, "benchmarks file")
    if not isinstance(data, dict) or not data:
        raise UserInputError(f"benchmarks file {path} must map benchmark names to their definitions")
    known = {f.name for f in dataclasses.fields(Benchmark)} - {"name"}
    benchmarks = {}
    for name, spec in data.items():
        if not isinstance(spec, dict):
            raise UserInputError(f"benchmarks file {path}: {name} must be a mapping of fields")
        unknown = sorted(set(spec) - known)
        if unknown:
            raise UserInputError(f"benchmarks file {path}: {name}: unknown fields {unknown}; known: {sorted(known)}")
        missing = [f for f in _REQUIRED_FIELDS if not spec.get(f)]
        if missing:
            raise UserInputError(f"benchmarks file {path}: {name} lacks {', '.join(missing)}")
        if spec["answer_style"] not in GOLD_STYLES:
            raise UserInputError(
                f"benchmarks file {path}: {name}.answer_style must be one of {', '.join(GOLD_STYLES)}"
            )
        benchmarks[str(name)] = Benchmark(name=str(name), **{"display_name": str(name), **spec})
    return benchmarks


def find_benchmarks_file(explicit: str | os.PathLike | None = None) -> Path:
    """The benchmarks file: ``--benchmarks_file``, else the definitions shipped in the package (any folder works)."""
    if explicit is None:
        return BENCHMARKS_FILE
    path = Path(explicit).expanduser()
    if not path.is_file():
        raise UserInputError(f"benchmarks file {path} does not exist")
    return path


def select_benchmarks(names: str, benchmarks: dict[str, Benchmark]) -> list[Benchmark]:
    """``"math500,aime24"`` (or ``all``) -> benchmarks, in the order given; unknown names list the known ones."""
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    if wanted == ["all"]:
        return list(benchmarks.values())
    if not wanted:
        raise UserInputError(f"--benchmarks is empty; known benchmarks: {', '.join(benchmarks)}")
    unknown = [n for n in wanted if n not in benchmarks]
    if unknown:
        raise UserInputError(f"unknown benchmark {unknown[0]!r}; known benchmarks: {', '.join(benchmarks)} (or all)")
    return [benchmarks[n] for n in dict.fromkeys(wanted)]


# ---------------------------------------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------------------------------------


def _hub_hint(bench: Benchmark) -> str:
    return f"--data_dir DIR holding {bench.local_file} (the names in shared/data/), or --data_file {bench.name}=PATH"


def load_benchmark_problems(
    bench: Benchmark, data_dir: str | None = None, data_file: str | None = None
) -> tuple[list[dict[str, Any]], str]:
    """``(problems, source)``: every problem (``id``, ``question``, ``answer`` = gold string) of a benchmark, from
    ``data_file``, ``data_dir/<local_file>`` or the Hub, in data set order."""
    from zerosiam_llm.data import load_problems

    if data_file is not None or data_dir is not None:
        path = Path(data_file) if data_file is not None else Path(data_dir) / bench.local_file
        path = path.expanduser()
        if not path.is_file():
            flag = f"--data_file {bench.name}=..." if data_file is not None else f"--data_dir {data_dir}"
            raise UserInputError(
                f"benchmark {bench.name}: no data file at {path} (from {flag}); pass {_hub_hint(bench)}, or leave "
                f"both out to download {bench.hub_id} from the Hub (needs network)"
            )
        source = str(path.resolve())
    else:
        source = bench.hub_id
    try:
        problems = load_problems(
            source,
            question_field=bench.question_field,
            answer_field=bench.answer_field,
            id_field=bench.id_field,
            split=bench.split,
            config_name=bench.config,
            answer_style=bench.answer_style,
        )
    except UserInputError as err:
        if source == bench.hub_id and str(err).startswith("cannot load data set"):
            raise UserInputError(
                f"benchmark {bench.name}: {err}. Without network access pass {_hub_hint(bench)}"
            ) from None
        raise UserInputError(f"benchmark {bench.name}: {err}") from None
    missing_gold = [p["id"] for p in problems if not p.get("answer")]
    if missing_gold:
        raise UserInputError(f"benchmark {bench.name}: problem {missing_gold[0]} has no gold answer")
    ids = [p["id"] for p in problems]
    if len(set(ids)) != len(ids):
        raise UserInputError(f"benchmark {bench.name}: problem ids in {bench.id_field!r} are not unique in {source}")
    if source == bench.hub_id:
        source = f"{bench.hub_id} ({bench.config + ', ' if bench.config else ''}split {bench.split})"
    return problems, source


# ---------------------------------------------------------------------------------------------------------------
# Run directory, settings and results files
# ---------------------------------------------------------------------------------------------------------------


def _sampling_for(bench: Benchmark, args: argparse.Namespace):
    from zerosiam_llm.rollout import SamplingConfig

    return SamplingConfig(
        n=args.n if args.n is not None else bench.n,
        temperature=args.temperature if args.temperature is not None else bench.temperature,
        top_p=args.top_p if args.top_p is not None else bench.top_p,
        max_new_tokens=args.max_new_tokens if args.max_new_tokens is not None else bench.max_new_tokens,
        seed=args.seed,
    )


def _model_identity(spec: str) -> str:
    """What a model spec points at, independent of the current directory."""
    from zerosiam_llm.policy import resolve_model

    source = resolve_model(spec)
    if source.kind == "gguf":
        return str(Path(source.name_or_path) / source.gguf_file)
    return source.spec if source.kind in ("hub", "embedded") else source.name_or_path


def _adapter_identity(adapter: str | None) -> str | None:
    if not adapter:
        return None
    path = Path(adapter).expanduser()
    return str(path.resolve()) if path.exists() else adapter


def _run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Settings shared by every benchmark of a run; a change means another run."""
    return {
        "model": _model_identity(args.model),
        "adapter": _adapter_identity(args.adapter),
        "backend": args.backend,
        "dtype": args.dtype,
        "instruction": args.instruction,
        "instruction_placement": args.instruction_placement,
    }


def _bench_settings(bench: Benchmark, sampling) -> dict[str, Any]:
    settings = {
        "question_field": bench.question_field,
        "answer_field": bench.answer_field,
        "answer_style": bench.answer_style,
        "n": sampling.n,
        "temperature": float(sampling.temperature),
        "top_p": float(sampling.top_p),
        "max_new_tokens": sampling.max_new_tokens,
    }
    if not sampling.greedy:  # greedy output does not depend on the seed
        settings["seed"] = sampling.seed
    return settings


def _fingerprint(run: dict[str, Any], bench: dict[str, Any]) -> str:
    blob = json.dumps({"run": run, "benchmark": bench}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


def _remove_run_files(out: Path, benchmark_names: Sequence[str]) -> None:
    """--overwrite: delete this module's files only (results, run record, summaries), never anything else."""
    for path in [out / f"{name}.jsonl" for name in benchmark_names] + [
        out / RUN_CONFIG,
        out / SUMMARY_JSON,
        out / SUMMARY_MD,
    ]:
        if path.is_file():
            path.unlink()


def _read_run_config(out: Path) -> dict[str, Any] | None:
    path = out / RUN_CONFIG
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserInputError(f"{path} is unreadable; pass --overwrite to start this run over") from None
    if not isinstance(data, dict) or data.get("format") != RUN_FORMAT:
        raise UserInputError(f"{path} is not a zerosiam-eval run record; use another --output_dir")
    return data


def _prepare_run_dir(
    out: Path, run: dict[str, Any], benches: dict[str, dict[str, Any]], overwrite: bool, all_names: Sequence[str]
) -> dict[str, Any]:
    """Check ``out`` against the settings of this command (deletes nothing); returns the run record to write (old +
    new benchmarks)."""
    if out.exists() and not out.is_dir():
        raise UserInputError(f"output_dir {out} exists and is not a directory")
    previous = _read_run_config(out) if out.is_dir() and not overwrite else None
    # With --overwrite the caller deletes the old files once the data has loaded (a typo deletes nothing).
    if (
        not overwrite
        and previous is None
        and out.is_dir()
        and any((out / f"{name}.jsonl").exists() for name in all_names)
    ):
        raise UserInputError(f"output_dir {out} holds results but no {RUN_CONFIG}; pass --overwrite or use another")
    record = {"format": RUN_FORMAT, **run, "benchmarks": {}}
    if previous is not None:
        changed = [k for k in run if previous.get(k) != run[k]]
        for name, settings in benches.items():
            old = previous.get("benchmarks", {}).get(name)
            if old is not None and old.get("settings") != settings:
                changed += [
                    f"{name}.{k}"
                    for k in sorted(set(settings) | set(old.get("settings", {})))
                    if old.get("settings", {}).get(k) != settings.get(k)
                ]
        if changed:
            raise UserInputError(
                f"output_dir {out} holds a run with other settings (differs in {', '.join(changed[:6])}); use "
                "another --output_dir, or pass --overwrite to delete its results and start over"
            )
        record["benchmarks"] = dict(previous.get("benchmarks", {}))
        if "generation" in previous:
            record["generation"] = previous["generation"]
    for name, settings in benches.items():
        record["benchmarks"][name] = {"settings": settings, "fingerprint": _fingerprint(run, settings)}
    return record


def _repair_torn_tail(path: Path) -> None:
    """Cut a last line without its newline (the process was killed mid-write) so appends start on a fresh line."""
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        keep = data.rfind(b"\n") + 1
        f.truncate(keep)
    logger.warning("%s: dropped a torn last line (%d bytes) left by an interrupted run", path, size - keep)


def read_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The sample lines of a results JSONL. A torn last line is ignored; a line that is not UTF-8 or not a JSON
    object is refused by line number (the file is damaged: fix or delete that line, or pass --overwrite)."""
    return read_jsonl(path, "results file")


def _index_results(
    path: Path, records: list[dict[str, Any]], fingerprint: str
) -> dict[tuple[str, int], dict[str, Any]]:
    """``(problem id, sample index) -> record``; refuses lines from other settings or without the key fields."""
    index: dict[tuple[str, int], dict[str, Any]] = {}
    for lineno, record in enumerate(records, start=1):
        pid, sample = record.get("problem_id"), record.get("sample")
        if not isinstance(pid, str) or isinstance(sample, bool) or not isinstance(sample, int):
            raise UserInputError(f"results file {path}, line {lineno}: no problem_id / sample fields")
        if record.get("fingerprint") != fingerprint:
            raise UserInputError(
                f"results file {path}, line {lineno}: written with other settings (fingerprint "
                f"{record.get('fingerprint')}, now {fingerprint}); use another --output_dir or pass --overwrite"
            )
        index.setdefault((pid, sample), record)  # a duplicate (never written by this module) keeps the first
    return index


RECORD_FIELDS = (
    "benchmark", "problem_id", "sample", "fingerprint", "prompt", "completion", "completion_tokens", "truncated",
    "extracted", "extraction_source", "gold", "correct",
)  # fmt: skip


def _canonical(record: dict[str, Any]) -> dict[str, Any]:
    """The record with its fields in the documented order (unknown extra fields kept, after them)."""
    ordered = {k: record[k] for k in RECORD_FIELDS if k in record}
    ordered.update({k: v for k, v in record.items() if k not in ordered})
    return ordered


def _make_record(
    bench: Benchmark, problem: dict[str, Any], sample: int, prompt: str, completion, fingerprint: str
) -> dict[str, Any]:
    extraction = extract_answer(completion.text)
    return {
        "benchmark": bench.name,
        "problem_id": problem["id"],
        "sample": sample,
        "fingerprint": fingerprint,
        "prompt": prompt,
        "completion": completion.text,
        "completion_tokens": completion.num_tokens,
        "truncated": completion.truncated,
        "extracted": extraction.answer,
        "extraction_source": extraction.source,
        "gold": problem["answer"],
    }


def grade_records(records: Sequence[dict[str, Any]], grader: Grader, progress: bool = False) -> int:
    """Add ``extracted`` / ``extraction_source`` (when missing) and ``correct`` to records without ``correct``, in
    place; returns how many were graded. An empty or answerless completion is graded wrong."""
    todo = [r for r in records if not isinstance(r.get("correct"), bool)]
    for record in todo:
        if "extraction_source" not in record:
            extraction = extract_answer(record.get("completion") or "")
            record["extracted"], record["extraction_source"] = extraction.answer, extraction.source
    if todo:
        results = grader.grade([str(r["gold"]) for r in todo], [r.get("extracted") for r in todo], progress=progress)
        for record, ok in zip(todo, results, strict=True):
            record["correct"] = ok
    return len(todo)


class _LazyGrader:
    """One :class:`Grader` per evaluation run, started only when something needs grading (a re-run with nothing
    new starts no worker processes)."""

    def __init__(self, num_workers: int | None, timeout_s: float) -> None:
        self.num_workers, self.timeout_s = num_workers, timeout_s
        self._grader: Grader | None = None

    def get(self) -> Grader:
        if self._grader is None:
            self._grader = Grader(num_workers=self.num_workers, timeout_s=self.timeout_s)
        return self._grader

    def equivalent(self, a: str, b: str) -> bool:
        return self.get().equivalent(a, b)

    @property
    def stats(self) -> dict[str, int]:
        return self._grader.stats.as_dict() if self._grader is not None else {}

    def close(self) -> None:
        if self._grader is not None:
            self._grader.close()


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------


def _pass_ks(n: int) -> list[int]:
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    return ks if ks[-1] == n else [*ks, n]


def headline_name(n: int) -> str:
    return "accuracy" if n == 1 else f"avg@{n}"


def summarize_benchmark(
    problem_ids: Sequence[str],
    records: dict[tuple[str, int], dict[str, Any]],
    n: int,
    equivalent: Callable[[str, str], bool] | None = None,
) -> dict[str, Any]:
    """Metrics over problems ``problem_ids``, each with graded samples ``0..n-1`` in ``records``.

    accuracy: first sample (the greedy answer when T = 0); avg@n: mean over samples; pass@k: unbiased estimator;
    maj@n: majority vote with answers clustered by ``equivalent`` (math-verify), not exact strings; the 95% interval
    is a bootstrap over problems of the headline metric (accuracy when n = 1, else avg@n); rates are over samples.
    """
    if not problem_ids:
        raise UserInputError("no problems to summarise")
    first, avg, maj, passes = [], [], [], {k: [] for k in _pass_ks(n)}
    sources: dict[str, int] = {}
    truncated = tokens = 0
    for pid in problem_ids:
        samples = [records[(pid, s)] for s in range(n)]
        correct = [bool(r["correct"]) for r in samples]
        first.append(float(correct[0]))
        avg.append(avg_at_n(correct))
        for k in passes:
            passes[k].append(pass_at_k(n, sum(correct), k))
        answers = [r.get("extracted") for r in samples]
        maj.append(maj_at_k(answers, correct, equivalent if n > 1 else None))
        for r in samples:
            sources[r.get("extraction_source", "none")] = sources.get(r.get("extraction_source", "none"), 0) + 1
            truncated += bool(r.get("truncated"))
            tokens += int(r.get("completion_tokens") or 0)
    total = len(problem_ids) * n
    per_problem = first if n == 1 else avg
    lo, hi = bootstrap_ci(per_problem, seed=0)

    def mean(xs: list[float]) -> float:
        return float(sum(xs) / len(xs))

    return {
        "n_problems": len(problem_ids),
        "n_samples": n,
        "headline": headline_name(n),
        "score": mean(per_problem),
        "ci95": [lo, hi],
        "accuracy": mean(first),
        f"avg@{n}": mean(avg),
        "pass@k": {str(k): mean(v) for k, v in passes.items()},
        f"maj@{n}": mean(maj),
        "extraction_failure_rate": sources.get("none", 0) / total,
        "extraction_sources": {k: sources[k] / total for k in sorted(sources)},
        "truncation_rate": truncated / total,
        "mean_completion_tokens": tokens / total,
    }


def _grader_description(timeout_s: float) -> dict[str, Any]:
    try:
        version = importlib.metadata.version("math-verify")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "name": "math-verify",
        "version": version,
        "rule": "verify(parse($gold$), parse($answer$)), gold first",
        "deadline_s": timeout_s,
        "extraction": EXTRACTION_RULE,
    }


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def format_summary_md(summary: dict[str, Any]) -> str:
    """The summary as Markdown a person reads: the setup, then one row per benchmark."""
    grader = summary["grader"]
    gen = summary.get("generation") or {}
    gen_text = ", ".join(f"{k} {v}" for k, v in gen.items() if k != "backend")
    placement = summary["prompt"]["instruction_placement"]
    where = "as the system turn" if placement == "system" else "appended to the user turn"
    lines = [
        "# Evaluation summary",
        "",
        "| setting | value |",
        "|---|---|",
        f"| model | `{_cell(summary['model'])}` |",
        f"| adapter | {'`' + _cell(summary['adapter']) + '`' if summary.get('adapter') else 'none'} |",
        f"| generation | {gen.get('backend', summary.get('backend'))}{' (' + gen_text + ')' if gen_text else ''} |",
        f'| prompt | the model\'s chat template; instruction {where}: "{_cell(summary["prompt"]["instruction"])}" '
        "(each rendered prompt is stored verbatim in `<benchmark>.jsonl`) |",
        f"| grader | {grader['name']} {grader['version']}, {grader['rule']}, {grader['deadline_s']:g} s deadline per "
        f"answer; answer = {_cell(grader['extraction'])} |",
        "",
        "| benchmark | problems | decoding | score | 95% CI | pass@k | maj@n | no answer | truncated | mean tokens |",
        "|---|---:|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for m in summary["benchmarks"].values():
        n = m["n_samples"]
        passes = ", ".join(f"@{k} {_pct(v)}" for k, v in m["pass@k"].items()) if n > 1 else "–"
        cells = [
            _cell(m["display_name"]),
            f"{m['n_problems']} / {m['dataset_size']}",
            _cell(m["protocol"]["decoding"]),
            f"{m['headline']} {_pct(m['score'])}",
            f"{_pct(m['ci95'][0])} – {_pct(m['ci95'][1])}",
            passes,
            _pct(m[f"maj@{n}"]) if n > 1 else "–",
            _pct(m["extraction_failure_rate"]),
            _pct(m["truncation_rate"]),
            f"{m['mean_completion_tokens']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Scores and rates are percentages. score: accuracy of the first sample when n = 1, else avg@n (mean over the "
        "n samples); 95% CI: bootstrap over problems. pass@k: unbiased estimator; maj@n: majority vote with answers "
        "clustered by math-verify equivalence. no answer: samples with nothing extractable; truncated: samples cut "
        "by max_new_tokens.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Comparing runs
# ---------------------------------------------------------------------------------------------------------------


def _load_run_scores(run_dir: Path) -> tuple[dict[str, Any], dict[str, tuple[int, dict[str, float]]]]:
    """``(run config, {benchmark: (n, {problem id: per-problem headline score})})`` from a run's results files;
    only problems with all n graded samples count."""
    config = _read_run_config(run_dir) if run_dir.is_dir() else None
    if config is None:
        raise UserInputError(f"{run_dir} is not an evaluation run (no {RUN_CONFIG}); pass run --output_dir folders")
    scores = {}
    for name, entry in config.get("benchmarks", {}).items():
        path = run_dir / f"{name}.jsonl"
        if not path.is_file():
            continue
        n = int(entry["settings"]["n"])
        by_problem: dict[str, dict[int, bool]] = {}
        for record in read_results(path):
            if not isinstance(record.get("correct"), bool):
                raise UserInputError(f"{path} has ungraded samples; re-run the evaluation command to grade them")
            by_problem.setdefault(record["problem_id"], {})[record["sample"]] = record["correct"]
        scores[name] = (
            n,
            {
                pid: avg_at_n([s[i] for i in range(n)])
                for pid, s in by_problem.items()
                if all(i in s for i in range(n))
            },
        )
    return config, scores


def compare_runs(run_dirs: Sequence[str | os.PathLike]) -> dict[str, Any]:
    """Each run against the first, per benchmark they share: the headline metric (accuracy when n = 1, else avg@n)
    of each on the problems both completed, the difference (run - first) and its paired bootstrap 95% interval."""
    if len(run_dirs) < 2:
        raise UserInputError("--compare needs at least two run folders (RUN_A RUN_B ...)")
    dirs = [Path(d).expanduser() for d in run_dirs]
    loaded = [_load_run_scores(d) for d in dirs]
    labels = []
    for d in dirs:
        label = d.name or str(d)
        labels.append(label if label not in labels else str(d))
    base_config, base_scores = loaded[0]
    runs = [
        {"label": label, "path": str(d), "model": cfg.get("model"), "adapter": cfg.get("adapter")}
        for label, d, (cfg, _) in zip(labels, dirs, loaded, strict=True)
    ]
    rows = []
    for label, (_, scores) in zip(labels[1:], loaded[1:], strict=True):
        for name, (n_a, per_a) in base_scores.items():
            if name not in scores:
                continue
            n_b, per_b = scores[name]
            shared = [pid for pid in per_a if pid in per_b]
            row: dict[str, Any] = {
                "benchmark": name,
                "run": label,
                "baseline": labels[0],
                "metric": headline_name(n_a) if n_a == n_b else "avg@n",
                "n_a": n_a,
                "n_b": n_b,
                "shared_problems": len(shared),
            }
            if shared:
                a, b = [per_a[p] for p in shared], [per_b[p] for p in shared]
                diff, lo, hi = paired_bootstrap_diff(a, b, seed=0)
                row.update(score_a=sum(a) / len(a), score_b=sum(b) / len(b), diff=diff, ci95=[lo, hi])
            rows.append(row)
    if not rows:
        raise UserInputError(f"the runs share no benchmark with results; {labels[0]} has {', '.join(base_scores)}")
    return {"runs": runs, "rows": rows}


def format_comparison_md(comparison: dict[str, Any]) -> str:
    lines = ["# Evaluation comparison", "", "| run | model | adapter | folder |", "|---|---|---|---|"]
    for run in comparison["runs"]:
        lines.append(
            f"| {_cell(run['label'])} | `{_cell(run['model'])}` | {_cell(run['adapter'] or 'none')} | "
            f"{_cell(run['path'])} |"
        )
    lines += [
        "",
        "| benchmark | metric | problems | A | score A | B | score B | B − A | 95% CI of B − A |",
        "|---|---|---:|---|---:|---|---:|---:|---|",
    ]
    for r in comparison["rows"]:
        if "diff" not in r:
            lines.append(
                f"| {r['benchmark']} | {r['metric']} | 0 | {_cell(r['baseline'])} | – | {_cell(r['run'])} | "
                "– | – | – |"
            )
            continue
        lines.append(
            f"| {r['benchmark']} | {r['metric']} | {r['shared_problems']} | {_cell(r['baseline'])} | "
            f"{_pct(r['score_a'])} | {_cell(r['run'])} | {_pct(r['score_b'])} | {100 * r['diff']:+.1f} | "
            f"{100 * r['ci95'][0]:+.1f} … {100 * r['ci95'][1]:+.1f} |"
        )
    lines += [
        "",
        "Scores in percent over the problems both runs completed; metric: accuracy (n = 1) or avg@n. The interval is "
        "a paired bootstrap over problems: when it excludes 0, the difference is unlikely to be resampling noise.",
        "",
    ]
    return "\n".join(lines)


def _run_compare(args: argparse.Namespace) -> int:
    comparison = compare_runs(args.compare)
    text = format_comparison_md(comparison)
    if args.output_dir:
        out = Path(args.output_dir)
        atomic_write_json(out / COMPARISON_JSON, comparison)
        atomic_write_text(out / COMPARISON_MD, text)
    print(text)
    if args.output_dir:
        print(f"wrote {Path(args.output_dir) / COMPARISON_MD} and {COMPARISON_JSON}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# The evaluation run
# ---------------------------------------------------------------------------------------------------------------


def _parse_data_files(items: Sequence[str] | None, known: dict[str, Benchmark]) -> dict[str, str]:
    files = {}
    for item in items or ():
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserInputError(f"--data_file takes NAME=PATH, got {item!r}")
        if name not in known:
            raise UserInputError(f"--data_file: unknown benchmark {name!r}; known benchmarks: {', '.join(known)}")
        files[name] = path
    return files


GeneratorFactory = Callable[[argparse.Namespace, Any], Any]


def _default_generator_factory(args: argparse.Namespace, tokenizer):
    from zerosiam_llm.rollout import make_generator

    if args.backend == "vllm":
        backend_kwargs = {
            "gpu_memory_utilization": args.gpu_memory_utilization,
            "max_model_len": args.max_model_len,
            "tensor_parallel_size": args.tensor_parallel_size,
        }
    else:
        backend_kwargs = {"device": args.device, "batch_size": args.batch_size}
    return make_generator(
        args.backend,
        args.model,
        adapter=args.adapter,
        tokenizer=tokenizer,
        dtype=args.dtype,
        seed=args.seed,
        trust_remote_code=args.trust_remote_code,
        revision=args.revision,
        **backend_kwargs,
    )


def run_evaluation(
    args: argparse.Namespace,
    benchmarks_file: str | os.PathLike | None = None,
    generator_factory: GeneratorFactory | None = None,
) -> dict[str, Any]:
    """Evaluate ``args.model`` (+ ``args.adapter``) on the selected benchmarks; returns the summary dict.

    ``generator_factory(args, tokenizer)`` builds the generation backend (default: :func:`rollout.make_generator`);
    it is called only when some sample is missing, so a complete run never loads the model.
    """
    from zerosiam_llm.policy import load_tokenizer, resolve_model, warn_remote_code
    from zerosiam_llm.rollout import check_adapter

    if not args.model:
        raise UserInputError("--model is required (a Hub id, a local folder, a .gguf file or embedded:smollm2-135m)")
    if not args.output_dir:
        raise UserInputError("--output_dir is required")
    all_benchmarks = load_benchmarks(find_benchmarks_file(args.benchmarks_file or benchmarks_file))
    selected = select_benchmarks(args.benchmarks, all_benchmarks)
    data_files = _parse_data_files(args.data_file, all_benchmarks)
    if args.limit is not None and args.limit < 1:
        raise UserInputError(f"--limit must be >= 1, got {args.limit}")
    samplings = {b.name: _sampling_for(b, args) for b in selected}
    run = _run_settings(args)
    bench_settings = {b.name: _bench_settings(b, samplings[b.name]) for b in selected}
    out = Path(args.output_dir).expanduser()
    # Everything that can be refused (settings, data, model files, adapter, results) is checked before the old run is
    # deleted (--overwrite) or run_config.json is written: a corrected command into the same folder then just works.
    record = _prepare_run_dir(out, run, bench_settings, args.overwrite, list(all_benchmarks))
    check_writable(out, "output_dir")

    problems_by_bench, sources, sizes = {}, {}, {}
    for bench in selected:
        problems, source = load_benchmark_problems(bench, args.data_dir, data_files.get(bench.name))
        sizes[bench.name] = len(problems)
        problems_by_bench[bench.name] = problems[: args.limit] if args.limit else problems
        sources[bench.name] = source
        record["benchmarks"][bench.name]["data"] = source
    source = resolve_model(args.model)
    warn_remote_code(source, args.trust_remote_code)
    tokenizer = load_tokenizer(source, args.trust_remote_code)
    if args.adapter:
        check_adapter(args.adapter, args.revision)

    # what each benchmark still needs (with --overwrite: everything; the old results are deleted below)
    indexes, prompts, pending = {}, {}, {}
    for bench in selected:
        sampling, fingerprint = samplings[bench.name], record["benchmarks"][bench.name]["fingerprint"]
        problems = problems_by_bench[bench.name]
        path = out / f"{bench.name}.jsonl"
        index = {} if args.overwrite else _index_results(path, read_results(path), fingerprint)
        for problem in problems:
            prompt = render_prompt(
                tokenizer, build_messages(problem["question"], args.instruction, args.instruction_placement)
            )
            prompts[problem["id"]] = prompt
            done = next((index[(problem["id"], s)] for s in range(sampling.n) if (problem["id"], s) in index), None)
            if done is not None and (done.get("prompt") != prompt or done.get("gold") != problem["answer"]):
                raise UserInputError(
                    f"{path}: problem {problem['id']} was run with another prompt or gold answer (the data, the "
                    "instruction or the chat template changed); use another --output_dir or pass --overwrite"
                )
        indexes[bench.name] = index
        pending[bench.name] = [p for p in problems if any((p["id"], s) not in index for s in range(sampling.n))]

    progress = not args.no_progress
    grader = _LazyGrader(args.grader_workers, args.grader_timeout)
    generator = None
    generated: dict[str, int] = {}
    graded = 0
    try:
        if any(pending.values()):  # loading the model (and adapter) validates them: before anything is written
            generator = (generator_factory or _default_generator_factory)(args, tokenizer)
            record["generation"] = generator.describe()
        previous_summary = None if args.overwrite else _read_previous_summary(out)
        if args.overwrite and out.is_dir():
            try:
                old_names = list((_read_run_config(out) or {}).get("benchmarks", {}))
            except UserInputError:  # an unreadable record is replaced too
                old_names = []
            _remove_run_files(out, list(all_benchmarks) + old_names)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / RUN_CONFIG, record)
        if generator is not None and record["generation"].get("device") == "cpu" and args.max_new_tokens is None:
            print("note: generating on CPU with the benchmarks' GPU budget (max_new_tokens "
                  f"{max(s.max_new_tokens for s in samplings.values())}): a batch runs until its longest "
                  "completion ends; pass --max_new_tokens (e.g. 256) for a quick look")  # fmt: skip
        summaries = {}
        for bench in selected:
            sampling = samplings[bench.name]
            fingerprint = record["benchmarks"][bench.name]["fingerprint"]
            problems, index, todo = problems_by_bench[bench.name], indexes[bench.name], pending[bench.name]
            path = out / f"{bench.name}.jsonl"
            _repair_torn_tail(path)
            n_done = sum((p["id"], s) in index for p in problems for s in range(sampling.n))
            print(
                f"{bench.name}: {len(problems)} problems ({sampling.describe()}): {n_done} samples done, "
                f"{len(problems) * sampling.n - n_done} to generate"
            )
            generated[bench.name] = 0
            if todo:
                stream = generator.generate(
                    [prompts[p["id"]] for p in todo], sampling, progress=progress, desc=f"generating {bench.name}"
                )
                for i, completions in stream:
                    problem = todo[i]
                    new = [
                        _make_record(bench, problem, s, prompts[problem["id"]], completions[s], fingerprint)
                        for s in range(sampling.n)
                        if (problem["id"], s) not in index
                    ]
                    append_jsonl(path, new)  # flushed per problem: a kill loses at most the problems in flight
                    for r in new:
                        index[(r["problem_id"], r["sample"])] = r
                    generated[bench.name] += len(new)
            missing = [p["id"] for p in problems if any((p["id"], s) not in index for s in range(sampling.n))]
            if missing:
                raise RuntimeError(f"{bench.name}: the generator returned no completions for problem {missing[0]}")
            graded += _grade_and_rewrite(path, problems, index, grader, progress)
            metrics = summarize_benchmark([p["id"] for p in problems], index, sampling.n, grader.equivalent)
            summaries[bench.name] = {
                "display_name": bench.display_name,
                "dataset_size": sizes[bench.name],
                **metrics,
                "protocol": {
                    "decoding": sampling.describe(),
                    "greedy": sampling.greedy,
                    "n": sampling.n,
                    "temperature": float(sampling.temperature),
                    "top_p": float(sampling.top_p),
                    "max_new_tokens": sampling.max_new_tokens,
                    "seed": sampling.seed,
                    "data": sources[bench.name],
                    "fingerprint": fingerprint,
                },
            }
        grading_stats = grader.stats
    finally:
        grader.close()
        if generator is not None:
            generator.close()

    benchmarks = {k: v for k, v in (previous_summary or {}).get("benchmarks", {}).items() if k not in summaries}
    benchmarks.update(summaries)
    summary = {
        "model": args.model,
        "adapter": args.adapter,
        "backend": args.backend,
        "generation": record.get("generation"),
        "prompt": {
            "instruction": args.instruction,
            "instruction_placement": args.instruction_placement,
            "template": "the model's chat template (tokenizer.apply_chat_template, generation prompt added)",
        },
        "grader": _grader_description(args.grader_timeout),
        "benchmarks": benchmarks,
        "this_invocation": {"generated": generated, "graded": graded, "grading_stats": grading_stats},
    }
    atomic_write_json(out / SUMMARY_JSON, summary)
    text = format_summary_md(summary)
    atomic_write_text(out / SUMMARY_MD, text)
    print(text)
    print(f"generated {sum(generated.values())} new samples, graded {graded}; wrote {out / SUMMARY_MD}")
    return summary


def _read_previous_summary(out: Path) -> dict[str, Any] | None:
    path = out / SUMMARY_JSON
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # rewritten below from the results files


def _grade_and_rewrite(
    path: Path,
    problems: list[dict[str, Any]],
    index: dict[tuple[str, int], dict[str, Any]],
    grader: _LazyGrader,
    progress: bool,
) -> int:
    """Grade the samples that have no ``correct`` yet and, if any, rewrite the results file atomically in data set
    order (so an interrupted-and-resumed run ends with the same file as an uninterrupted one)."""
    todo = [r for r in index.values() if not isinstance(r.get("correct"), bool)]
    if not todo:
        return 0
    count = grade_records(todo, grader.get(), progress=progress)
    order = {p["id"]: i for i, p in enumerate(problems)}
    ranked = sorted(index.values(), key=lambda r: (order.get(r["problem_id"], len(order)), r["sample"]))
    lines = [json.dumps(_canonical(r), ensure_ascii=False, default=str) + "\n" for r in ranked]
    atomic_write_text(path, "".join(lines))
    return count


# ---------------------------------------------------------------------------------------------------------------
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
        return _run_compare(args)
    run_evaluation(args, benchmarks_file)
    return 0


def main(argv: list[str] | None = None, benchmarks_file: str | os.PathLike | None = None) -> int:
    """``zerosiam-eval`` / ``python evals/evaluate.py``: bad input is one ``error:`` line and exit code 2."""
    from zerosiam_llm.cli import run_cli

    return run_cli(lambda a: evaluate(a, benchmarks_file), argv)


if __name__ == "__main__":
    sys.exit(main())
