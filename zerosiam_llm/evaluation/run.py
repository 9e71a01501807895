"""The resumable evaluation run: settings and their fingerprint, the run folder, results files appended per problem,
generation of the missing samples only, grading, and the summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from zerosiam_llm.errors import UserInputError
from zerosiam_llm.evaluation.benchmarks import (
    Benchmark,
    find_benchmarks_file,
    load_benchmark_problems,
    load_benchmarks,
    select_benchmarks,
)
from zerosiam_llm.evaluation.metrics import grader_description, summarize_benchmark
from zerosiam_llm.evaluation.reports import format_summary_md
from zerosiam_llm.files import (
    append_jsonl,
    atomic_write_json,
    atomic_write_text,
    check_writable,
    read_jsonl,
    repair_torn_tail,
)
from zerosiam_llm.grading import (
    Grader,
    extract_answer,
)
from zerosiam_llm.prompts import build_messages, render_prompt
from zerosiam_llm.run_dir import changed_fields

RUN_CONFIG = "run_config.json"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
RUN_FORMAT = "zerosiam-eval/1"


# ---------------------------------------------------------------------------------------------------------------
# Run directory, settings and results files
# ---------------------------------------------------------------------------------------------------------------


def _sampling_for(bench: Benchmark, args: argparse.Namespace):
    from zerosiam_llm.evaluation.generation import SamplingConfig

    return SamplingConfig(
        n=args.n if args.n is not None else bench.n,
        temperature=args.temperature if args.temperature is not None else bench.temperature,
        top_p=args.top_p if args.top_p is not None else bench.top_p,
        max_new_tokens=args.max_new_tokens if args.max_new_tokens is not None else bench.max_new_tokens,
        seed=args.seed,
    )


def _model_identity(spec: str) -> str:
    """What a model spec points at, independent of the current directory."""
    from zerosiam_llm.modeling import resolve_model

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
        # recorded only when not standard: run folders written before EM-INF existed stay resumable
        **_decoding_identity(args),
    }


def _decoding_identity(args) -> dict[str, Any]:
    """The decoding, recorded only when not standard (run folders written before EM-INF existed stay resumable);
    EM-INF with its hyper-parameters."""
    decoding = getattr(args, "decoding", "standard")
    if decoding == "standard":
        return {}
    return {"decoding": decoding, "em_inf": dataclasses.asdict(args.em_inf_settings)}


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


def read_run_config(out: Path) -> dict[str, Any] | None:
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
    previous = read_run_config(out) if out.is_dir() and not overwrite else None
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
        changed = changed_fields(previous, run, keys=run)
        changed += [k for k in ("decoding", "em_inf") if k in previous and k not in run]  # only when not standard
        for name, settings in benches.items():
            old = previous.get("benchmarks", {}).get(name)
            if old is not None:
                changed += [f"{name}.{k}" for k in changed_fields(old.get("settings", {}), settings)]
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
    from zerosiam_llm.evaluation.generation import make_generator

    if args.backend == "vllm":
        backend_kwargs = {
            "gpu_memory_utilization": args.gpu_memory_utilization,
            "max_model_len": args.max_model_len,
            "tensor_parallel_size": args.tensor_parallel_size,
        }
    else:
        backend_kwargs = {"device": args.device, "batch_size": args.batch_size,
                          "decoding": getattr(args, "decoding", "standard"),
                          "em_inf": getattr(args, "em_inf_settings", None)}  # fmt: skip
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
    from zerosiam_llm.modeling import check_adapter, load_tokenizer, resolve_model, warn_remote_code

    if not args.model:
        raise UserInputError("--model is required (a Hub id, a local folder, a .gguf file or embedded:smollm2-135m)")
    if not args.output_dir:
        raise UserInputError("--output_dir is required")
    all_benchmarks = load_benchmarks(find_benchmarks_file(args.benchmarks_file or benchmarks_file))
    data_files = _parse_data_files(args.data_file, all_benchmarks)
    selected = select_benchmarks(args.benchmarks, all_benchmarks, args.data_dir, data_files)
    if args.limit is not None and args.limit < 1:
        raise UserInputError(f"--limit must be >= 1, got {args.limit}")
    samplings = {b.name: _sampling_for(b, args) for b in selected}
    run = _run_settings(args)
    bench_settings = {b.name: _bench_settings(b, samplings[b.name]) for b in selected}
    out = Path(args.output_dir).expanduser()
    # Everything that can be refused (settings, data, model files, adapter, results) is checked before the old run is
    # deleted (--overwrite) or run_config.json is written: a corrected command into the same folder then just works.
    check_writable(out, "output_dir")  # also: a file in the way
    record = _prepare_run_dir(out, run, bench_settings, args.overwrite, list(all_benchmarks))

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
                old_names = list((read_run_config(out) or {}).get("benchmarks", {}))
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
            repair_torn_tail(path)
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
        "grader": grader_description(args.grader_timeout),
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
