"""Unlabeled problem sets: the Hub, local JSON/JSONL/Parquet files, or generated arithmetic word problems.

Each problem is ``{"id", "question"}`` plus ``"answer"`` when a gold answer exists. Gold answers are for monitoring
only: the trainer reads them after generation, from decoded text, and nothing derived from them reaches the loss.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from zerosiam_llm.errors import UserInputError, first_line
from zerosiam_llm.files import parse_jsonl

GENERATED_PREFIX = "generated:"
LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}

_NAMES = ["Tom", "Ana", "Li", "Sara", "Omar", "Mia", "Ravi", "Eva"]
_ITEMS = ["apples", "books", "marbles", "coins", "pencils", "stickers", "cards", "shells"]


def generate_arithmetic_problems(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` two-number word problems (add, subtract, multiply) with integer answers; deterministic for a seed."""
    rng = random.Random(seed)
    problems = []
    for i in range(n):
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        kind = rng.choice(["add", "sub", "mul"])
        if kind == "add":
            a, b = rng.randint(2, 60), rng.randint(2, 60)
            q, ans = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", a + b
        elif kind == "sub":
            a = rng.randint(10, 90)
            b = rng.randint(1, a - 1)
            q, ans = f"{name} has {a} {item} and gives away {b}. How many {item} are left?", a - b
        else:
            a, b = rng.randint(2, 12), rng.randint(2, 9)
            q, ans = f"{name} has {a} bags with {b} {item} in each bag. How many {item} are there in total?", a * b
        problems.append({"id": f"arith-{seed}-{i}", "question": q, "answer": str(ans)})
    return problems


def _single_list_field(path: Path, raw: bytes) -> str | None:
    """The key of a ``.json`` document shaped ``{"key": [rows]}`` (datasets' ``field``), else None."""
    if path.suffix.lower() != ".json" or raw.lstrip()[:1] != b"{":
        return None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None  # JSON lines with a .json suffix, or damaged: the loader and the line check below say which
    lists = [k for k, v in data.items() if isinstance(v, list)] if isinstance(data, dict) else []
    return lists[0] if len(lists) == 1 else None


def _read_local(path: Path) -> list[dict[str, Any]]:
    """A local JSON / JSONL / Parquet file through ``datasets.load_dataset``, the same path as Hub data; a damaged file
    is named by line (JSON) or as unreadable (Parquet)."""
    if not path.is_file():
        raise UserInputError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in LOCAL_SUFFIXES:
        raise UserInputError(
            f"data file {path}: unsupported type {suffix or '(none)'}; allowed: .json, .jsonl, .parquet"
        )
    raw = path.read_bytes() if suffix != ".parquet" else b""
    if suffix != ".parquet" and not raw.strip():
        raise UserInputError(f"data set {path} is empty")
    kwargs = {"field": field} if (field := _single_list_field(path, raw)) else {}
    try:
        return _load_dataset(LOCAL_SUFFIXES[suffix], data_files=str(path), split="train", **kwargs)
    except Exception as err:  # pyarrow / datasets raise many types for a damaged file
        if suffix == ".parquet":
            raise UserInputError(f"data file {path} is not a readable Parquet file: {_innermost_line(err)}") from None
        parse_jsonl(raw, path, "data file")  # names the first bad line, if that is the cause
        raise UserInputError(f"data file {path} could not be read as JSON: {_innermost_line(err)}") from None


def _innermost_line(err: BaseException) -> str:
    """The first line of the innermost cause (datasets wraps the arrow error that says what is wrong)."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return first_line(err)


def _load_dataset(path: str, **kwargs) -> list[dict[str, Any]]:
    import datasets

    datasets.disable_progress_bars()  # one small table: no bars
    try:
        return datasets.load_dataset(path, **kwargs).to_list()
    finally:
        datasets.enable_progress_bars()


def _read_hub(name: str, config: str | None, split: str) -> list[dict[str, Any]]:
    try:
        return _load_dataset(name, name=config, split=split)
    except (FileNotFoundError, ConnectionError, OSError, ValueError) as err:
        raise UserInputError(f"cannot load data set {name!r} (split {split!r}): {first_line(err)}") from None


def load_problems(
    source: str,
    question_field: str = "problem",
    answer_field: str | None = None,
    id_field: str | None = None,
    split: str = "train",
    config_name: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    answer_style: str = "plain",
) -> list[dict[str, Any]]:
    """Problems from ``source``: ``generated:arithmetic``, a local file, or a Hub data set id."""
    if source.startswith(GENERATED_PREFIX):
        kind = source[len(GENERATED_PREFIX) :]
        if kind != "arithmetic":
            raise UserInputError(f"dataset {source!r} is unknown; generated data sets: generated:arithmetic")
        problems = generate_arithmetic_problems(limit or 256, seed)
        if answer_field is None:  # gold answers only when asked for (answer_field: answer)
            problems = [{k: v for k, v in p.items() if k != "answer"} for p in problems]
        return problems
    path = Path(source).expanduser()
    looks_local = path.suffix.lower() in LOCAL_SUFFIXES or source.startswith((".", "/", "~")) or path.exists()
    rows = _read_local(path) if looks_local else _read_hub(source, config_name, split)
    if not rows:
        raise UserInputError(f"data set {source} is empty")
    fields = sorted({k for r in rows[:100] for k in r})
    for name, value in (("question_field", question_field), ("answer_field", answer_field), ("id_field", id_field)):
        if value is not None and value not in rows[0]:
            raise UserInputError(f"{name} {value!r} is not a column of {source}; its columns: {', '.join(fields)}")
    if limit is not None:
        rows = rows[:limit]
    problems = []
    if answer_field is not None:
        from zerosiam_llm.grading import gold_answer
    for i, row in enumerate(rows):
        question = row.get(question_field)
        if not isinstance(question, str) or not question.strip():
            raise UserInputError(f"{source}, row {i}: {question_field!r} is empty or not text")
        problem = {"id": str(row[id_field]) if id_field else str(i), "question": question}
        if answer_field is not None and row.get(answer_field) is not None:
            problem["answer"] = gold_answer(str(row[answer_field]), answer_style)
        problems.append(problem)
    return problems


def build_prompt_dataset(
    problems: list[dict[str, Any]],
    tokenizer,
    instruction: str,
    placement: str = "user",
    max_prompt_length: int | None = None,
    long_prompt: str = "skip",
):
    """``(datasets.Dataset, counts)``: conversational ``prompt`` + ``id`` (+ ``answer`` for monitoring).

    Prompts over ``max_prompt_length`` tokens (chat template included) are skipped or have their question truncated;
    ``counts`` says how many of each.
    """
    import datasets

    from zerosiam_llm.prompts import build_messages, render_prompt

    rows, counts = [], {"kept": 0, "skipped": 0, "truncated": 0}
    has_answers = any("answer" in p for p in problems)
    for problem in problems:
        question = problem["question"]
        messages = build_messages(question, instruction, placement)
        if max_prompt_length is not None:
            length = len(tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"])
            if length > max_prompt_length:
                if long_prompt == "skip":
                    counts["skipped"] += 1
                    continue
                q_ids = tokenizer(question, add_special_tokens=False)["input_ids"]
                keep = len(q_ids) - (length - max_prompt_length)
                if keep <= 0:
                    counts["skipped"] += 1  # even an empty question does not fit: the template alone is too long
                    continue
                question = tokenizer.decode(q_ids[:keep])
                messages = build_messages(question, instruction, placement)
                counts["truncated"] += 1
        row = {"prompt": messages, "id": problem["id"]}
        if has_answers:
            row["answer"] = problem.get("answer")
        rows.append(row)
        counts["kept"] += 1
    if not rows:
        raise UserInputError(
            f"no prompt fits max_prompt_length={max_prompt_length} ({counts['skipped']} skipped); raise it"
        )
    return datasets.Dataset.from_list(rows), counts


def prompt_budget(config, model) -> int | None:
    """max_prompt_length, lowered so that prompt + completion fit the model's context window."""
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if not context:
        return config.max_prompt_length
    room = context - config.max_completion_length
    if room <= 0:
        raise UserInputError(
            f"max_completion_length {config.max_completion_length} leaves no room for a prompt in the model's "
            f"{context}-token context"
        )
    return room if config.max_prompt_length is None else min(config.max_prompt_length, room)


def report_prompt_counts(counts: dict, max_prompt: int | None, policy: str) -> None:
    if counts["skipped"] or counts["truncated"]:
        print(f"prompts: {counts['kept']} kept, {counts['skipped']} skipped, {counts['truncated']} truncated "
              f"(longer than {max_prompt} tokens; long_prompt: {policy})")  # fmt: skip


def check_full_batch(num_prompts: int, config, num_processes: int = 1, what: str = "the data set") -> None:
    """Refuse a data set that yields no full generation batch (TRL's RepeatSampler drops a last partial batch, so it
    would train nothing); say how many prompts a partial last batch leaves out. An online stream keeps its last,
    shorter batch (``trainers.base.StreamBatchSampler``): every problem is scored."""
    if config.protocol == "online":
        left = num_prompts % config.stream_batch_size
        if left:
            print(f"note: {what}: {num_prompts} problems in batches of {config.stream_batch_size}; the last batch "
                  f"has {left} (answered, scored and trained on like the others)")  # fmt: skip
        return
    per_batch = (
        config.per_device_train_batch_size * config.gradient_accumulation_steps * num_processes
        // config.rollouts_per_prompt
    )
    how = (
        f"per_device_train_batch_size {config.per_device_train_batch_size} x gradient_accumulation_steps "
        f"{config.gradient_accumulation_steps} / "
        + (f"num_rollouts {config.num_rollouts}" if config.rollouts_per_prompt == config.num_rollouts
           else f"num_vote_rollouts {config.rollouts_per_prompt}")  # fmt: skip
    )
    if num_processes > 1:
        how += f" x {num_processes} processes"
    if num_prompts < per_batch:
        raise UserInputError(
            f"{what} has {num_prompts} usable prompts but one batch needs {per_batch} ({how}); add problems or make "
            "the batch smaller"
        )
    left = num_prompts % per_batch
    if left:
        print(f"note: {num_prompts} prompts in batches of {per_batch}: a last partial batch of {left} is dropped each "
              "epoch (TRL RepeatSampler)")  # fmt: skip
