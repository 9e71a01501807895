"""The project's one grader: answer extraction, math-verify equivalence in worker processes, and metrics.

Used by the training monitors, the online protocol and the evaluation CLI, so every number in the project is
graded the same way.

Pipeline (see ``shared/research/eval.md`` for why each step is there):

1. :func:`extract_answer` takes the content of the **last complete** ``\\boxed{...}`` of a completion (balanced
   braces; ``\\boxed 5``; ``\\fbox``/``\\framebox``). Only that one box is handed to math-verify, which avoids its
   "two boxes close together parse as a set" pitfall. Fallbacks: "the (final) answer is X" / "Answer: X", then the
   last number in the text. The source of each answer is recorded so callers can log the fallback rate.
2. :func:`gold_answer` turns a dataset field into a gold string (``boxed`` for MATH solutions, ``gsm8k`` for
   ``#### N``, ``plain`` for answer fields).
3. :class:`Grader` checks ``verify(parse("$gold$"), parse("$pred$"))`` (gold first: math-verify is asymmetric) in
   worker processes with math-verify's own signal-based timeouts switched off, and enforces a hard per-answer
   deadline from the parent process (see the class docstring).
4. Metrics: :func:`pass_at_k`, :func:`avg_at_n`, :func:`majority_answer`, :func:`maj_at_k`, :func:`bootstrap_ci`,
   :func:`paired_bootstrap_diff`, :func:`wilson_interval`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import multiprocessing as mp
import os
import re
import signal
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from statistics import NormalDist
from typing import Any

import numpy as np

from zerosiam_llm.errors import UserInputError

logger = logging.getLogger(__name__)

__all__ = [
    "Extraction",
    "Grader",
    "GradingStats",
    "avg_at_n",
    "bootstrap_ci",
    "extract_answer",
    "gold_answer",
    "grade_answers",
    "has_boxed",
    "maj_at_k",
    "majority_answer",
    "normalize_answer",
    "paired_bootstrap_diff",
    "pass_at_k",
    "wilson_interval",
]

EXTRACTION_SOURCES = ("boxed", "answer_is", "last_number", "none")
GOLD_STYLES = ("boxed", "gsm8k", "plain")

# ---------------------------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Extraction:
    """An answer pulled out of a completion. ``source`` is one of ``EXTRACTION_SOURCES``; ``answer`` is None only
    when ``source == "none"``."""

    answer: str | None
    source: str


# `\boxed`, `\fbox` and `\framebox` (MATH/AIME solutions use the last two); the lookahead rejects longer command
# names such as `\boxedsomething`.
_BOX_RE = re.compile(r"\\(?:boxed|fbox|framebox)(?![A-Za-z])")
# "The final answer is X", "Final Answer: X", "the answer is: X", "Answer: X". The last match in the text wins.
_ANSWER_IS_RE = re.compile(r"\b(?:final\s+answer|answer)\s*(?:is\s*:?|:)[ \t]*", re.IGNORECASE)
_INLINE_MATH_RE = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
# Numbers: optional minus (not after a word character or closing bracket, so "5-3" yields 3 and not -3),
# thousands separators only in proper groups of three, decimals, and simple fractions such as 3/4.
_NUMBER_RE = re.compile(r"(?:(?<![\w)\]}])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?")


def _balanced_group(text: str, start: int) -> int | None:
    """Index just past the ``}`` closing the ``{`` at ``text[start]``, or None if it never closes (truncation).

    Escaped braces ``\\{`` and ``\\}`` are literal characters in LaTeX and are not counted, so
    ``\\boxed{\\left\\{1\\right.}`` still closes.
    """
    depth = 0
    i = start
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2  # skip the escaped character (`\{`, `\}`, `\\`)
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _box_content(text: str, match: re.Match[str]) -> str | None:
    """Content of one box command, or None if it is unclosed, empty or malformed."""
    i = match.end()
    n = len(text)
    j = i
    while j < n and text[j] in " \t":
        j += 1
    if j < n and text[j] == "{":
        end = _balanced_group(text, j)
        if end is None:
            return None
        content = text[j + 1 : end - 1].strip()
        return content or None
    if j > i and j < n:
        # `\boxed 5` (no braces): the argument is the next token, up to whitespace or the closing `$`.
        token = re.match(r"[^\s$]+", text[j:])
        if token:
            return token.group(0).rstrip(".,;") or None
    return None


def _last_boxed(text: str) -> str | None:
    """Content of the last complete box. An unclosed last box (truncated output) or an empty ``\\boxed{}`` (the
    instruction echoed back) is skipped in favour of an earlier complete one."""
    matches = list(_BOX_RE.finditer(text))
    for match in reversed(matches):
        content = _box_content(text, match)
        if content is not None:
            return content
    return None


def has_boxed(text: str) -> bool:
    """True if the text holds at least one complete, non-empty ``\\boxed{}`` (or ``\\fbox``/``\\boxed 5``)."""
    return _last_boxed(text) is not None


def _clean_answer_is(rest: str) -> str | None:
    """Trim the text after "the answer is" down to the answer itself."""
    line = rest.split("\n", 1)[0].strip()
    if not line:
        return None
    boxed = _last_boxed(line)
    if boxed is not None:
        return boxed
    math_seg = _INLINE_MATH_RE.search(line)
    if math_seg is not None and line[: math_seg.start()].strip(" *:") == "":
        # "The answer is $\frac{1}{2}$." -> the first math segment, when the line starts with it.
        return next(g for g in math_seg.groups() if g is not None).strip() or None
    # Cut at the end of the sentence: ". " followed by more text; a decimal point (3.5) is not followed by a space.
    line = re.split(r"\.\s", line, maxsplit=1)[0]
    line = line.strip(" \t*$").rstrip(".;,").strip(" \t*$")  # markdown bold **42**, stray $
    # "1,234 dollars", "$18 per day", "12 square units": the number without its unit words
    with_unit = re.fullmatch(rf"\$?\s*({_NUMBER_RE.pattern})\s+[A-Za-z][A-Za-z ]*", line)
    if with_unit is not None:
        return re.sub(r"[,\s]", "", with_unit.group(1))
    return line or None


def _last_number(text: str) -> str | None:
    matches = deque(_NUMBER_RE.finditer(text), maxlen=1)  # keeps only the last match
    if not matches:
        return None
    return re.sub(r"[,\s]", "", matches[0].group(0))


def extract_answer(text: str) -> Extraction:
    """The final answer of a completion, and where it came from.

    Order: the last complete ``\\boxed{}`` (``"boxed"``); "the (final) answer is X" / "Final Answer: X" /
    "Answer: X", last occurrence (``"answer_is"``); the last number, with thousands separators removed
    (``"last_number"``); else ``Extraction(None, "none")``.
    """
    if not isinstance(text, str):
        raise UserInputError(f"extract_answer expects a string, got {type(text).__name__}")
    boxed = _last_boxed(text)
    if boxed is not None:
        return Extraction(boxed, "boxed")
    for match in reversed(list(_ANSWER_IS_RE.finditer(text))):
        answer = _clean_answer_is(text[match.end() :])
        if answer is not None:
            return Extraction(answer, "answer_is")
    number = _last_number(text)
    if number is not None:
        return Extraction(number, "last_number")
    return Extraction(None, "none")


# ---------------------------------------------------------------------------------------------------------------
# Gold answers and light normalisation
# ---------------------------------------------------------------------------------------------------------------

_INTEGRAL_FLOAT_RE = re.compile(r"^([+-]?\d+)\.0*$")


def _plain_number(value: str) -> str:
    """'3.0' -> '3', '27.00' -> '27'; anything else unchanged (AMC23 golds are floats in the JSON)."""
    match = _INTEGRAL_FLOAT_RE.match(value)
    if match:
        return str(int(match.group(1)))
    return value


def gold_answer(raw: str | int | float, style: str) -> str:
    """The gold answer string from a dataset field.

    Styles: ``"boxed"`` -- the last complete ``\\boxed{}`` of a MATH-style solution; ``"gsm8k"`` -- the text after
    the last ``####`` with commas removed; ``"plain"`` -- the value itself (stripped), with integral floats such as
    ``3.0`` written as ``3``. Numbers (AIME25 ints, AMC23 floats) are accepted and converted to strings.
    """
    if style not in GOLD_STYLES:
        raise UserInputError(f"gold style must be one of {', '.join(GOLD_STYLES)}; got {style!r}")
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise UserInputError(f"gold answer must be a string or a number, got {type(raw).__name__}")
    if isinstance(raw, float):
        if not math.isfinite(raw):
            raise UserInputError(f"gold answer must be finite, got {raw!r}")
        text = str(int(raw)) if raw.is_integer() else repr(raw)
    else:
        text = str(raw)
    if style == "boxed":
        boxed = _last_boxed(text)
        if boxed is None:
            raise UserInputError(f"gold solution has no complete \\boxed{{}}: {text[-80:]!r}")
        return boxed
    if style == "gsm8k":
        if "####" not in text:
            raise UserInputError(f"GSM8K gold has no '####' marker: {text[-80:]!r}")
        answer = text.rsplit("####", 1)[1].strip().replace(",", "")
        if not answer:
            raise UserInputError("GSM8K gold is empty after '####'")
        return _plain_number(answer)
    answer = text.strip()
    if not answer:
        raise UserInputError("gold answer is empty")
    return _plain_number(answer)


_TEXT_WRAPPER_RE = re.compile(r"^\\(?:text|textbf|mathrm|mbox)\{")
_NORMALIZE_SUBS = (
    (re.compile(r"\\(?:left|right)(?![A-Za-z])"), ""),  # not \rightarrow
    (re.compile(r"\\[dt]frac(?![A-Za-z])"), r"\\frac"),
    (re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![A-Za-z])"), ""),
    (re.compile(r"\\%"), ""),
    (re.compile(r"\\\$"), ""),
    (re.compile(r"\\[,!;: ]"), ""),  # thin spaces: 1\,000
    (re.compile(r"\s+"), ""),
)


def normalize_answer(answer: str) -> str:
    """Light, meaning-preserving normalisation used for the grader's fast path and exact-string voting.

    Removes whitespace, ``\\left``/``\\right``, thin spaces, ``\\%``, ``\\$``, ``^\\circ``, trailing periods and a
    whole-string ``\\text{...}`` wrapper; writes ``\\dfrac``/``\\tfrac`` as ``\\frac``. Assignments such as
    ``x=5`` are deliberately kept: whether ``x=5`` equals ``5`` is math-verify's decision.
    """
    s = answer.strip()
    for _ in range(3):  # nested wrappers: \text{\textbf{5}}
        wrapped = _TEXT_WRAPPER_RE.match(s)
        if not wrapped or _balanced_group(s, wrapped.end() - 1) != len(s):
            break
        s = s[wrapped.end() : -1].strip()
    for pattern, repl in _NORMALIZE_SUBS:
        s = pattern.sub(repl, s)
    return s.rstrip(".")


# ---------------------------------------------------------------------------------------------------------------
# Worker process side
# ---------------------------------------------------------------------------------------------------------------

_STARTUP_TIMEOUT_S = 120.0  # importing sympy + math-verify in a fresh process; generous for loaded machines
_MAX_STARTUP_FAILURES = 3
_CACHE_SIZE = 200_000


def _parse_math(text: str) -> list[Any]:
    """``math_verify.parse`` of a ``$...$``-wrapped answer, with math-verify's own timeout switched off: the
    deadline is enforced by the parent, and signal-based alarms do not mix with our worker loop."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    return parse(
        "$" + text + "$",
        extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
        parsing_timeout=None,
    )


def _verify_pair(gold: str, pred: str, gold_cache: dict[str, list[Any]]) -> tuple[bool, bool, bool]:
    """``(equivalent, gold_unparsed, pred_unparsed)`` for one pair; runs inside a worker."""
    from math_verify import verify

    gold_parsed = gold_cache.get(gold)
    if gold_parsed is None:
        gold_parsed = _parse_math(gold)
        if len(gold_cache) > 4096:  # golds repeat (n samples per problem); keep the cache bounded
            gold_cache.clear()
        gold_cache[gold] = gold_parsed
    pred_parsed = _parse_math(pred)
    ok = bool(verify(gold_parsed, pred_parsed, timeout_seconds=None)) if gold_parsed and pred_parsed else False
    return ok, not gold_parsed, not pred_parsed


def _worker_main(conn: Connection) -> None:
    """Worker loop: receive a chunk of (gold, pred) pairs, send one result message per pair as soon as it is done.

    The per-pair messages are what lets the parent give every answer its own deadline: the clock of pair i+1
    starts when the parent sees the result of pair i.
    """
    try:
        # Ctrl-C reaches the whole process group; the parent owns the workers' lifetime and kills busy ones.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout is disabled" warnings: we know
        logging.getLogger("latex2sympy2_extended").setLevel(logging.ERROR)
        import math_verify  # noqa: F401  (import cost paid before "ready", outside any answer's deadline)

        gold_cache: dict[str, list[Any]] = {}
        _verify_pair("1", "1", gold_cache)  # warm up the parsers (grammar loading) before "ready"
        gold_cache.clear()
    except BaseException as exc:  # noqa: BLE001  (report any import failure to the parent, then exit)
        conn.send(("fatal", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready",))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        for gold, pred in msg:
            try:
                ok, gold_bad, pred_bad = _verify_pair(gold, pred, gold_cache)
                conn.send(("res", ok, False, gold_bad, pred_bad))
            except Exception:  # noqa: BLE001  (sympy raises all sorts; one bad answer must not kill the loop)
                conn.send(("res", False, True, False, False))


# ---------------------------------------------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class GradingStats:
    """Counters over a :class:`Grader`'s lifetime (``Grader.stats`` returns a copy)."""

    graded: int = 0  # pairs answered, by any path
    none_predictions: int = 0  # prediction was None: False, no worker call
    fast_path: int = 0  # identical after normalize_answer: True, no worker call
    cached: int = 0  # answered from the result cache or a duplicate within the same call
    verified: int = 0  # answered by math-verify in a worker
    timeouts: int = 0  # killed at the deadline: graded False
    errors: int = 0  # exception inside math-verify, or the worker died: graded False
    worker_restarts: int = 0
    gold_unparsed: int = 0  # math-verify extracted nothing from the gold (a data problem: log it)
    pred_unparsed: int = 0  # ... or from the prediction

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def _mp_context() -> mp.context.BaseContext:
    """forkserver where available (fast restarts: the server has math-verify preloaded, and no CUDA/threads state
    is inherited from the parent), else spawn. Never plain fork: the parent may hold CUDA and thread pools."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        # Only takes effect if the fork server is not running yet (the preload list is process-wide). '__main__' is
        # the stdlib default and is kept; note that on CPython 3.11 (measured here) it does not actually preload,
        # so each worker still re-runs the main script's imports as `__mp_main__` (standard spawn semantics).
        ctx.set_forkserver_preload(["__main__", "math_verify", __name__])
        return ctx
    return mp.get_context("spawn")


class _Worker:
    """One worker process, its pipe, and the chunk it is working on."""

    def __init__(self, ctx: mp.context.BaseContext) -> None:
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, args=(child_conn,), daemon=True, name="zerosiam-grader")
        self.process.start()
        child_conn.close()
        self.conn = parent_conn
        self.ready = False
        self.pending: deque[int] = deque()  # task ids sent and not answered yet, in order
        self.deadline = time.monotonic() + _STARTUP_TIMEOUT_S

    def kill(self) -> None:
        try:
            self.conn.close()
        except OSError:
            pass
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)

    def stop(self) -> None:
        """Polite shutdown: ask the loop to exit, then kill whatever is left."""
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.process.join(timeout=1)
        self.kill()


def _default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


class Grader:
    """math-verify equivalence (gold first) in worker processes with a hard per-answer deadline.

    Deadline design. math-verify's own timeouts use ``signal.alarm``, which fails in threads and cannot interrupt
    C-level sympy work reliably, so they are switched off (``parsing_timeout=None``, ``timeout_seconds=None``)
    and the deadline is enforced from outside:

    * work goes to workers in chunks (for throughput: one pipe round trip per chunk), but a worker sends one
      result message per answer;
    * the parent gives the answer at the head of each worker's chunk ``timeout_s`` seconds, counted from the
      moment the previous result (or the worker's "ready" message) arrived. The clock starts only once the worker
      has imported math-verify, so start-up never eats into an answer's budget, and parent latency can only add
      time, never take it away;
    * when a deadline passes, the parent SIGKILLs that worker, grades the culprit False (``stats.timeouts``),
      puts the rest of the chunk back at the front of the queue, and starts a replacement worker. Other workers
      keep going, so a pathological answer costs about ``timeout_s`` of wall time plus a restart (fast with the
      forkserver start method, whose server has math-verify preloaded) and never stalls the run.

    Restart cost is the worker's start-up: near zero for math-verify itself (preloaded in the fork server) plus
    the main script's top-level imports, which multiprocessing re-runs in every worker (measured: about 1 s with a
    main script importing torch, 0.07 s with a light one). While a replacement starts, ready workers take the queue.

    A worker that dies without answering (segfault, OOM kill) is replaced; its head answer is retried once on a
    fresh worker (it may have died before starting it) and graded False, counted in ``stats.errors``, if it kills
    a second worker.

    Results are cached per ``(gold, prediction)`` string pair (timeouts included, so a repeated pathological answer
    costs the deadline once). Identical pairs after :func:`normalize_answer` are True without a worker call (the
    fast path). Not thread-safe: use one Grader per thread. ``timeout_s`` assumes each worker has a core to itself.
    """

    def __init__(self, num_workers: int | None = None, timeout_s: float = 5.0, *, fast_path: bool = True) -> None:
        if num_workers is not None and (
            isinstance(num_workers, bool) or int(num_workers) != num_workers or num_workers < 1
        ):
            raise UserInputError(f"num_workers must be a positive integer or None, got {num_workers!r}")
        if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
            raise UserInputError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        self.num_workers = int(num_workers) if num_workers is not None else _default_workers()
        self.timeout_s = float(timeout_s)
        self.fast_path = fast_path
        self._ctx: mp.context.BaseContext | None = None
        self._workers: list[_Worker] = []
        self._cache: OrderedDict[tuple[str, str], bool] = OrderedDict()
        self._stats = GradingStats()
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001  (interpreter shutdown: best effort only)
            pass

    def close(self) -> None:
        """Stop the worker processes. Idempotent; the Grader cannot be used afterwards."""
        workers, self._workers = self._workers, []
        for worker in workers:
            worker.stop()
        self._closed = True

    @property
    def stats(self) -> GradingStats:
        """A copy of the counters (graded, timeouts, errors, ...)."""
        return dataclasses.replace(self._stats)

    def reset_stats(self) -> None:
        self._stats = GradingStats()

    # -- public grading API ------------------------------------------------------------------------------------

    def grade(self, golds: Sequence[str], predictions: Sequence[str | None], progress: bool = False) -> list[bool]:
        """``verify(gold, prediction)`` for each pair. Predictions are extracted answers (``Extraction.answer``),
        not whole completions; golds come from :func:`gold_answer`. A None prediction is False."""
        if isinstance(golds, str) or isinstance(predictions, str):
            raise UserInputError("golds and predictions must be sequences of strings, not a single string")
        if len(golds) != len(predictions):
            raise UserInputError(f"got {len(golds)} golds but {len(predictions)} predictions")
        return self._grade_pairs(list(zip(golds, predictions, strict=True)), progress=progress)

    def equivalent_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        """Equivalence of answer pairs, the first of each pair in the gold role (math-verify is asymmetric:
        e.g. gold ``5`` vs ``x=5`` is True). Used to cluster answers for maj@k."""
        return self._grade_pairs([(a, b) for a, b in pairs], progress=False)

    def equivalent(self, a: str, b: str) -> bool:
        """One pair of :meth:`equivalent_pairs`; pass ``grader.equivalent`` to :func:`majority_answer`."""
        return self._grade_pairs([(a, b)], progress=False)[0]

    # -- internals ---------------------------------------------------------------------------------------------

    def _grade_pairs(self, pairs: list[tuple[str, str | None]], progress: bool) -> list[bool]:
        if self._closed:
            raise RuntimeError("this Grader is closed")
        for gold, pred in pairs:
            if not isinstance(gold, str) or not (pred is None or isinstance(pred, str)):
                raise UserInputError(
                    f"gold answers must be strings and predictions strings or None; got {type(gold).__name__} "
                    f"and {type(pred).__name__}"
                )
        results: list[bool | None] = [None] * len(pairs)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(pairs), desc="grading", unit="ans")
        tasks: list[tuple[str, str]] = []
        task_index: dict[tuple[str, str], int] = {}
        task_members: list[list[int]] = []  # positions in `pairs` answered by each task (duplicates share)
        stats = self._stats
        for pos, (gold, pred) in enumerate(pairs):
            if pred is None:
                results[pos] = False
                stats.none_predictions += 1
                continue
            if self.fast_path:
                norm_pred = normalize_answer(pred)
                if not norm_pred:  # nothing left to compare (e.g. "." or "\\,"): no worker call
                    results[pos] = False
                    continue
                if norm_pred == normalize_answer(gold):
                    results[pos] = True
                    stats.fast_path += 1
                    continue
            key = (gold, pred)
            cached = self._cache.get(key)
            if cached is not None:
                results[pos] = cached
                stats.cached += 1
                continue
            if key in task_index:
                task_members[task_index[key]].append(pos)
                stats.cached += 1
                continue
            task_index[key] = len(tasks)
            tasks.append(key)
            task_members.append([pos])
        if bar is not None:
            bar.update(len(pairs) - sum(len(m) for m in task_members))

        def on_done(task_id: int, ok: bool) -> None:
            self._remember(tasks[task_id], ok)
            for pos in task_members[task_id]:
                results[pos] = ok
            if bar is not None:
                bar.update(len(task_members[task_id]))

        try:
            if tasks:
                self._run(tasks, on_done)
        finally:
            if bar is not None:
                bar.close()
        stats.graded += len(pairs)
        return [bool(r) for r in results]

    def _remember(self, key: tuple[str, str], ok: bool) -> None:
        self._cache[key] = ok
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)

    def _spawn(self) -> _Worker:
        if self._ctx is None:
            self._ctx = _mp_context()
        return _Worker(self._ctx)

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        new = self._spawn()
        self._workers[self._workers.index(worker)] = new
        self._stats.worker_restarts += 1
        return new

    def _run(self, tasks: list[tuple[str, str]], on_done: Callable[[int, bool], None]) -> None:
        """Dispatch tasks to workers in chunks and enforce the per-answer deadline (see the class docstring)."""
        n = len(tasks)
        # Chunks small enough to balance load (about 4 per worker), large enough to amortise the round trip.
        chunk = max(1, min(64, math.ceil(n / (4 * self.num_workers))))
        wanted = min(self.num_workers, math.ceil(n / chunk))
        while len(self._workers) < wanted:  # started lazily, only as many as the job needs
            self._workers.append(self._spawn())
        workers = list(self._workers)
        queue: deque[int] = deque(range(n))
        startup_failures = 0

        def requeue(worker: _Worker) -> None:
            queue.extendleft(reversed(worker.pending))
            worker.pending.clear()

        def fail_head(worker: _Worker, *, timeout: bool) -> _Worker:
            """Grade the answer at the head of the worker's chunk False, requeue the rest, restart the worker."""
            task_id = worker.pending.popleft()
            if timeout:
                self._stats.timeouts += 1
                logger.warning("grading timed out after %.1fs: pred=%.200r", self.timeout_s, tasks[task_id][1])
            else:
                self._stats.errors += 1
                logger.warning("grading worker died on pred=%.200r", tasks[task_id][1])
            on_done(task_id, False)
            requeue(worker)
            return self._replace(worker)

        deaths: dict[int, int] = {}

        def died(worker: _Worker) -> _Worker:
            """The worker exited without answering (segfault, OOM kill). It may have died before starting its head
            answer, so that answer is retried once on a fresh worker; if it kills a worker twice it is graded False
            and counted as an error."""
            if worker.pending:
                head = worker.pending[0]
                deaths[head] = deaths.get(head, 0) + 1
                if deaths[head] >= 2:
                    return fail_head(worker, timeout=False)
            requeue(worker)
            return self._replace(worker)

        def startup_failed(worker: _Worker, why: str) -> _Worker:
            nonlocal startup_failures
            startup_failures += 1
            if startup_failures >= _MAX_STARTUP_FAILURES:
                raise RuntimeError(f"grading worker failed to start {startup_failures} times: {why}")
            requeue(worker)
            return self._replace(worker)

        try:
            while queue or any(w.pending for w in workers):
                now = time.monotonic()
                # A starting worker (a replacement after a timeout) gets work only when no worker is ready, so a
                # chunk never waits on someone else's start-up while a ready worker could take it.
                any_ready = any(w.ready for w in workers)
                for k, w in enumerate(workers):
                    if w.pending or not queue or (any_ready and not w.ready):
                        continue
                    if not w.process.is_alive():  # died while idle: replace it, the chunk waits for the next turn
                        workers[k] = self._replace(w)
                        continue
                    ids = [queue.popleft() for _ in range(min(chunk, len(queue)))]
                    w.pending.extend(ids)
                    if w.ready:
                        w.deadline = now + self.timeout_s
                    try:
                        w.conn.send([tasks[i] for i in ids])
                    except (OSError, ValueError):  # died just now: the chunk goes back to the queue
                        workers[k] = died(w)
                watched = [w for w in workers if w.pending or not w.ready]  # busy, or starting: await "ready"
                if not watched:
                    continue
                next_deadline = min(w.deadline for w in watched)
                ready_conns = wait([w.conn for w in watched], timeout=max(0.0, next_deadline - time.monotonic()))
                for k, w in enumerate(workers):
                    if w.conn not in ready_conns:
                        continue
                    workers[k] = self._drain(w, on_done, died, startup_failed)
                now = time.monotonic()
                for k, w in enumerate(workers):
                    if now < w.deadline:
                        continue
                    if w.ready and w.pending:
                        workers[k] = fail_head(w, timeout=True)
                    elif not w.ready:
                        workers[k] = startup_failed(w, f"no 'ready' within {_STARTUP_TIMEOUT_S:.0f}s")
        except BaseException:
            # Interrupted (Ctrl-C, start-up failure): workers still holding work are in an unknown state.
            for w in list(self._workers):
                if w.pending:
                    w.pending.clear()
                    self._replace(w)
            raise

    def _drain(
        self,
        worker: _Worker,
        on_done: Callable[[int, bool], None],
        died: Callable[[_Worker], _Worker],
        startup_failed: Callable[[_Worker, str], _Worker],
    ) -> _Worker:
        """Read every message the worker has sent so far; returns the (possibly replaced) worker."""
        while True:
            try:
                if not worker.conn.poll():
                    return worker
                msg = worker.conn.recv()
            except (EOFError, OSError):  # the worker died
                if not worker.ready:
                    return startup_failed(worker, f"exit code {worker.process.exitcode}")
                return died(worker)
            tag = msg[0]
            now = time.monotonic()
            if tag == "ready":
                worker.ready = True
                worker.deadline = now + self.timeout_s
            elif tag == "res":
                _, ok, error, gold_bad, pred_bad = msg
                task_id = worker.pending.popleft()
                self._stats.verified += 1
                self._stats.errors += int(error)
                self._stats.gold_unparsed += int(gold_bad)
                self._stats.pred_unparsed += int(pred_bad)
                worker.deadline = now + self.timeout_s
                on_done(task_id, bool(ok))
            elif tag == "fatal":
                raise RuntimeError(f"grading worker could not start: {msg[1]}")


def grade_answers(golds: Sequence[str], predictions: Sequence[str | None], timeout_s: float = 5.0) -> list[bool]:
    """Grade once with a short-lived :class:`Grader` (worker start-up included: prefer one Grader per run)."""
    with Grader(timeout_s=timeout_s) as grader:
        return grader.grade(golds, predictions)


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): ``1 - C(n-c, k) / C(n, k)`` for n samples with c correct.

    Computed as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)``, which avoids huge binomials.
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or int(value) != value:
            raise UserInputError(f"pass_at_k: {name} must be an integer, got {value!r}")
    if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
        raise UserInputError(f"pass_at_k needs n >= 1, 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def avg_at_n(correct: Sequence[bool]) -> float:
    """Mean accuracy over the n samples of one problem (the "pass@1 estimated from n samples")."""
    if len(correct) == 0:
        raise UserInputError("avg_at_n needs at least one sample")
    return float(np.mean(np.asarray(correct, dtype=np.float64)))


def majority_answer(
    answers: Sequence[str | None], equivalent: Callable[[str, str], bool] | None = None
) -> tuple[int | None, int]:
    """``(index of a representative of the largest answer cluster, cluster size)``; ``(None, 0)`` if all None.

    Answers are first grouped by :func:`normalize_answer`; with ``equivalent`` (e.g. ``Grader.equivalent``) the
    groups are then merged greedily by math equivalence, each new group compared with the representatives of
    earlier clusters in order (the representative in the gold role), so ``1/2``, ``0.5`` and ``\\frac{1}{2}``
    form one cluster. None answers never count. Ties go to the cluster whose first member comes first; the
    representative is that first member.
    """
    groups: dict[str, list[int]] = {}
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        key = normalize_answer(answer)
        if not key:
            continue
        groups.setdefault(key, []).append(i)
    if not groups:
        return None, 0
    # cluster: [first index, size, representative answer]
    clusters: list[list[Any]] = []
    for members in groups.values():  # dict order = order of first occurrence
        first = members[0]
        for cluster in clusters if equivalent is not None else ():
            if equivalent(cluster[2], answers[first]):  # type: ignore[misc]
                cluster[1] += len(members)
                break
        else:
            clusters.append([first, len(members), answers[first]])
    best = max(clusters, key=lambda cl: (cl[1], -cl[0]))
    return best[0], best[1]


def maj_at_k(
    answers: Sequence[str | None],
    correct: Sequence[bool],
    equivalent: Callable[[str, str], bool] | None = None,
    k: int | None = None,
) -> float:
    """Majority-vote accuracy for one problem: 1.0 if the majority cluster of the first ``k`` answers (all when
    None) is correct, else 0.0 (also when every answer is None). ``correct[i]`` is the grade of ``answers[i]``;
    the representative's grade stands for its cluster."""
    if len(answers) != len(correct):
        raise UserInputError(f"maj_at_k: {len(answers)} answers but {len(correct)} correctness flags")
    if k is not None:
        if k < 1 or k > len(answers):
            raise UserInputError(f"maj_at_k: k must be in 1..{len(answers)}, got {k}")
        answers, correct = answers[:k], correct[:k]
    index, _ = majority_answer(answers, equivalent)
    return 0.0 if index is None else float(bool(correct[index]))


def _check_interval_args(num_resamples: int, confidence: float) -> None:
    if num_resamples < 1:
        raise UserInputError(f"num_resamples must be >= 1, got {num_resamples}")
    if not 0.0 < confidence < 1.0:
        raise UserInputError(f"confidence must be in (0, 1), got {confidence}")


def bootstrap_ci(
    values: Sequence[float], num_resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-problem scores (resampling problems). Deterministic for a
    seed."""
    _check_interval_args(num_resamples, confidence)
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise UserInputError("bootstrap_ci needs a non-empty 1-D sequence of per-problem scores")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(num_resamples, x.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def paired_bootstrap_diff(
    a: Sequence[float], b: Sequence[float], num_resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """``(mean(b - a), lower, upper)``: paired percentile bootstrap over problems, for two runs on the same
    problems (same order). An interval excluding 0 means the difference is unlikely to be resampling noise."""
    _check_interval_args(num_resamples, confidence)
    xa = np.asarray(a, dtype=np.float64)
    xb = np.asarray(b, dtype=np.float64)
    if xa.ndim != 1 or xa.shape != xb.shape or xa.size == 0:
        raise UserInputError(
            f"paired_bootstrap_diff needs two non-empty runs of equal length, got {xa.size}, {xb.size}"
        )
    diff = xb - xa
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(num_resamples, diff.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(diff.mean()), float(lo), float(hi)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; ``(0.0, 1.0)`` when n is 0."""
    if not 0.0 < confidence < 1.0:
        raise UserInputError(f"confidence must be in (0, 1), got {confidence}")
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise UserInputError(f"wilson_interval needs 0 <= successes <= n; got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2.0)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n)) / denom
    # Exact ends at 0 and n (the formula gives them up to rounding).
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi
