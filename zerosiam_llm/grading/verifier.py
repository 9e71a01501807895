"""The verifier pool: math-verify equivalence in worker processes, with a hard per-answer deadline.

:class:`Grader` checks ``verify(parse("$gold$"), parse("$pred$"))`` (gold first: math-verify is asymmetric) in worker
processes with math-verify's own signal-based timeouts switched off, and enforces the deadline from the parent
process (see the class docstring).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import multiprocessing as mp
import os
import signal
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from zerosiam_llm.errors import UserInputError
from zerosiam_llm.grading.extraction import normalize_answer

logger = logging.getLogger(__name__)


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
