"""The stability map: where does each method stay healthy as the learning rate grows?

    python scripts/stability_map.py --grid recipes/stability/final.yaml --data_dir ../shared/data \
        --output_dir outputs/stability

A grid file names a base recipe, the learning rates, seeds, streams and the configurations to compare (``tent``,
``zerosiam-adamw-x10``, ...: recipe fields each). Every cell (stream x configuration x learning rate x seed) is one
online-protocol run of ``train.py`` in its own folder: greedy predictions on a stream of ``batches`` batches, one
update per batch. Each finished run is classified from its logged metrics with the collapse guard's rules
(:data:`zerosiam_llm.monitoring.DEFAULT_GUARD_RULES`, replayed over ``metrics.jsonl``):

- **collapsed**: over the last :data:`FINAL_WINDOW` updates, H(p_r) is below the entropy rule's threshold, more than
  the dominance rule's share of tokens are predicted with p > 0.99, and the output is degenerate: the answer rate is
  below the answer-rate rule's threshold or the repeated 4-gram share above the repetition rule's. Entropy ~ 0, one
  dominant token, no answers or loops (a looping completion usually still ends in a number, which the answer
  extraction's last-number fallback counts as an answer, so loops are the common form on this model).
- **degraded**: not collapsed, but at least one guard rule fired; the first rule that fired and its update are kept.
- **healthy**: no guard rule fired on any update.

A killed sweep resumes: finished cells (``cell.json``) are skipped, an unfinished one reruns its ``train.py``
command, which itself resumes from the run's last checkpoint. ``stability.md``, ``stability.json`` and
``stability.png`` are rewritten after every cell. ``--configs`` runs some rows now and the rest later (the report
always covers the whole grid), ``--seeds`` and ``--learning_rates`` some seeds and columns (one seed at every lr
first, for a first look at a costly row); ``--reuse`` copies a finished cell of another sweep whose ``train.py``
arguments are the same, instead of running it again (same arguments, same run: the verdict is copied, with
``reused_from``).
A config that never updates (``method: none``) runs once per stream and seed, at the first learning rate of the
grid file; its cells at the other learning rates are that run (copied, with ``same_run_as``). So is a finished run
in which no update had a gradient (GRPO whose every group had equal rewards): its cells at the lrs not yet run are
copies of it, since the lr multiplied nothing but zeros.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from zerosiam_llm.errors import UserInputError
from zerosiam_llm.experiments.classify import classify_run, run_metrics
from zerosiam_llm.experiments.grid import Cell, Grid, load_grid
from zerosiam_llm.experiments.report import verdict_text, write_report
from zerosiam_llm.files import atomic_write_json, read_jsonl
from zerosiam_llm.run_dir import METRICS_FILE, STREAM_SUMMARY, changed_fields

CELL_FILE = "cell.json"  # the mark that a cell is done: its verdict and figures
CELL_ARGS_FILE = "cell_args.json"  # the cell's train.py arguments, checked when the sweep resumes
RUN_DIR = "run"  # the cell's train.py output_dir; cell.json, cell_args.json and train.log sit beside it


def _stream_dir(cell_dir: Path) -> Path | None:
    """The online run (``cell_dir/run``) writes one folder per stream: the one with metrics.jsonl."""
    found = sorted(p.parent for p in (cell_dir / RUN_DIR).glob(f"*/{METRICS_FILE}"))
    return found[0] if found else None


def _count_updates(cell_dir: Path) -> int:
    stream = _stream_dir(cell_dir)
    if stream is None:
        return 0
    try:
        return sum(1 for r in read_jsonl(stream / METRICS_FILE) if "loss" in r)
    except UserInputError:  # a line being written: count again at the next poll
        return 0


def machine(threads: int | None = None) -> dict[str, Any]:
    """Where a cell ran: CPU model, threads, torch version (a map pooled from several machines says so)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = None
    return {"cpu": cpu, "threads": threads or os.cpu_count(), "torch": torch_version}


def finish_cell(cell: Cell, cell_dir: Path, args: list[str], threads: int | None = None) -> dict[str, Any]:
    """Classify a finished run and write its ``cell.json`` (the mark that the cell is done)."""
    stream = _stream_dir(cell_dir)
    if stream is None or not (stream / STREAM_SUMMARY).is_file():
        raise UserInputError(f"{cell_dir} holds no finished online run (no {STREAM_SUMMARY})")
    rows = read_jsonl(stream / METRICS_FILE)
    summary = json.loads((stream / STREAM_SUMMARY).read_text())
    record = {
        "stream": cell.stream, "config": cell.config, "learning_rate": cell.learning_rate, "seed": cell.seed,
        "args": args, **classify_run(rows), **run_metrics(rows, summary), "machine": machine(threads),
    }  # fmt: skip
    atomic_write_json(cell_dir / CELL_FILE, record)
    return record


def _check_same_args(cell: Cell, cell_dir: Path, args: list[str]) -> None:
    spec = cell_dir / CELL_ARGS_FILE
    if spec.is_file():
        if changed_fields({"args": json.loads(spec.read_text())}, {"args": args}):
            raise UserInputError(
                f"cell {cell.name} in {cell_dir} was run with other settings; rename the config, or delete that folder"
            )
    else:
        cell_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(spec, args)


def finished_cells_by_args(roots: Sequence[Path]) -> dict[str, Path]:
    """The finished cells under other sweeps' output folders, keyed by their ``train.py`` arguments (as JSON)."""
    found: dict[str, Path] = {}
    for root in roots:
        if not Path(root).is_dir():
            raise UserInputError(f"--reuse {root}: no such folder (another sweep's --output_dir)")
        for spec in sorted(Path(root).glob(f"*/*/*/*/{CELL_ARGS_FILE}")):
            if (spec.parent / CELL_FILE).is_file():
                found.setdefault(json.dumps(json.loads(spec.read_text())), spec.parent)
    return found


def reuse_cell(cell: Cell, cell_dir: Path, source: Path) -> dict[str, Any]:
    """Copy a finished cell of another sweep (the same arguments): its record under this grid's config name."""
    record = json.loads((source / CELL_FILE).read_text())
    record.update(config=cell.config, reused_from=str(source))
    atomic_write_json(cell_dir / CELL_FILE, record)
    return record


def copy_across_unused_lr(grid: Grid, records: dict[Cell, dict[str, Any]], output_dir: Path) -> int:
    """Fill each unfinished cell from a finished cell of the same stream, config and seed at another lr whose run
    did not depend on its lr (:meth:`Grid.lr_unused`): the same run, so the same record (with ``same_run_as`` and
    ``lr_unused``). Returns how many were filled."""
    filled = 0
    for cell in grid.cells():
        if cell in records:
            continue
        for lr in grid.run_order:
            source = Cell(cell.stream, cell.config, lr, cell.seed)
            record = records.get(source)
            if record is None or "same_run_as" in record or (why := grid.lr_unused(cell.config, record)) is None:
                continue
            record = dict(record, learning_rate=cell.learning_rate, same_run_as=str(source.folder(output_dir)),
                          lr_unused=why)  # fmt: skip
            atomic_write_json(cell.folder(output_dir) / CELL_FILE, record)
            records[cell] = record
            filled += 1
            break
    return filled


class _Selection:
    """Which cells a sweep runs now (``--configs``, ``--seeds``, ``--learning_rates``); ``options``: those given."""

    def __init__(self, configs: set[str] | None, seeds: set[int] | None, learning_rates: set[float] | None) -> None:
        self.configs, self.seeds, self.learning_rates = configs, seeds, learning_rates
        given = (("--configs", configs), ("--seeds", seeds), ("--learning_rates", learning_rates))
        self.options = ", ".join(name for name, values in given if values is not None)

    def __call__(self, cell: Cell) -> bool:
        return ((self.configs is None or cell.config in self.configs)
                and (self.seeds is None or cell.seed in self.seeds)
                and (self.learning_rates is None or cell.learning_rate in self.learning_rates))  # fmt: skip


def _selection(
    grid: Grid,
    configs: Sequence[str] | None,
    seeds: Sequence[int] | None,
    learning_rates: Sequence[float] | None,
) -> _Selection:
    """Check each selector against the grid (a value the grid lacks is a clear error, not an empty sweep); learning
    rates match the grid's within float rounding (``3e-4`` selects ``0.0003``)."""
    unknown = [c for c in configs or () if c not in grid.configs]
    if unknown:
        raise UserInputError(
            f"--configs: {unknown[0]!r} is not a config of the grid; configs: {', '.join(grid.configs)}"
        )
    unknown_seeds = [s for s in seeds or () if s not in grid.seeds]
    if unknown_seeds:
        raise UserInputError(
            f"--seeds: {unknown_seeds[0]} is not a seed of the grid; seeds: {', '.join(map(str, grid.seeds))}"
        )
    lrs = None
    if learning_rates is not None:
        lrs = set()
        for lr in learning_rates:
            match = [g for g in grid.learning_rates if math.isclose(g, lr, rel_tol=1e-9)]
            if not match:
                raise UserInputError(f"--learning_rates: {lr:g} is not a learning rate of the grid; learning rates: "
                                     f"{', '.join(f'{g:g}' for g in grid.learning_rates)}")  # fmt: skip
            lrs.add(match[0])
    return _Selection(None if configs is None else set(configs), None if seeds is None else set(seeds), lrs)


def run_grid(
    grid: Grid,
    output_dir: Path,
    train_command: Sequence[str],
    data_dir: str | None = None,
    threads: int | None = None,
    poll_seconds: float = 2.0,
    configs: Sequence[str] | None = None,
    reuse: Sequence[Path] = (),
    seeds: Sequence[int] | None = None,
    learning_rates: Sequence[float] | None = None,
) -> tuple[dict[Cell, dict[str, Any]], list[Cell]]:
    """Run every unfinished cell (of the given ``configs``, ``seeds`` and ``learning_rates`` only, when given), one
    process at a time, rewriting the report after each; a cell whose arguments equal a finished cell under a
    ``reuse`` folder is copied from it. Returns the finished records and the cells whose run failed (a failed cell
    does not stop the others; re-running retries it)."""
    from tqdm.auto import tqdm

    selected = _selection(grid, configs, seeds, learning_rates)

    if "gsm8k" in grid.streams and not data_dir:
        raise UserInputError("the gsm8k stream needs --data_dir (a folder holding gsm8k_test.jsonl)")
    if data_dir and "gsm8k" in grid.streams and not (Path(data_dir) / "gsm8k_test.jsonl").is_file():
        raise UserInputError(f"--data_dir {data_dir} has no gsm8k_test.jsonl")
    cells = grid.cells()
    plans = []
    for cell in cells:
        cell_dir = cell.folder(output_dir)
        args = grid.cell_args(cell, data_dir)
        _check_same_args(cell, cell_dir, args)  # every cell checked before any work
        plans.append((cell, cell_dir, args))
    records: dict[Cell, dict[str, Any]] = {}
    reusable = finished_cells_by_args(reuse)
    reused = 0
    for cell, cell_dir, args in plans:
        if (cell_dir / CELL_FILE).is_file():
            records[cell] = json.loads((cell_dir / CELL_FILE).read_text())
        elif (source := reusable.get(json.dumps(args))) is not None:
            records[cell] = reuse_cell(cell, cell_dir, source)
            reused += 1
    same_run = copy_across_unused_lr(grid, records, output_dir)
    todo, waiting = [], 0
    started: set[tuple[str, str, int]] = set()  # a config that never updates: one run per stream and seed
    for cell, cell_dir, args in plans:
        if cell in records or not selected(cell):
            continue
        run = (cell.stream, cell.config, cell.seed)
        if not grid.updates(cell.config) and run in started:
            waiting += 1  # copied when that run finishes
            continue
        started.add(run)
        todo.append((cell, cell_dir, args))
    later = len(cells) - len(records) - len(todo) - waiting
    print(f"[stability] {len(cells)} cells: {len(records)} finished ({reused} copied from --reuse"
          + (f", {same_run} from the same run at another lr" if same_run else "") + f"), {len(todo)} to run"
          + (f", {waiting} to copy from those runs (the lr is unused)" if waiting else "")
          + (f", {later} left for later (not in {selected.options})" if later else ""), flush=True)  # fmt: skip
    write_report(grid, records, output_dir)
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    failed = []
    bar = tqdm(total=len(todo) * grid.batches, unit="update", desc="stability", dynamic_ncols=True)
    for i, (cell, cell_dir, args) in enumerate(todo, 1):
        if cell in records:  # copied meanwhile: a run at another lr turned out not to depend on its lr
            bar.update(grid.batches)
            bar.write(f"[stability] {cell.name}: {records[cell]['lr_unused']}, so the same run as "
                      f"{records[cell]['same_run_as']}")  # fmt: skip
            continue
        bar.set_description(f"cell {i}/{len(todo)} {cell.name}")
        done_before = _count_updates(cell_dir)
        bar.update(done_before)
        log = cell_dir / "train.log"
        with open(log, "ab") as log_file:
            proc = subprocess.Popen([*train_command, *args, "--output_dir", str(cell_dir / RUN_DIR)], stdout=log_file,
                                    stderr=subprocess.STDOUT, env=env)  # fmt: skip
            seen = done_before
            while proc.poll() is None:
                time.sleep(poll_seconds)
                now = _count_updates(cell_dir)
                if now > seen:
                    bar.update(now - seen)
                    seen = now
        if proc.returncode != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
            bar.write(f"[stability] {cell.name} failed (exit {proc.returncode}): {tail[0]} (log: {log})")
            failed.append(cell)
            if proc.returncode == 2:  # bad input: every other cell would fail the same way
                raise UserInputError(f"{cell.name}: {tail[0].removeprefix('error: ')}")
            bar.update(grid.batches - seen)
            continue
        bar.update(max(grid.batches - seen, 0))
        records[cell] = finish_cell(cell, cell_dir, args, threads)
        bar.write(f"[stability] {cell.name}: {verdict_text(records[cell])}")
        copy_across_unused_lr(grid, records, output_dir)
        write_report(grid, records, output_dir)
    bar.close()
    if failed:
        print(f"[stability] {len(failed)} cell(s) failed: {', '.join(c.name for c in failed)}; rerun to retry them",
              file=sys.stderr)  # fmt: skip
    return records, failed


# ---------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def _comma_list(convert: Callable[[str], Any], what: str) -> Callable[[str], list[Any]]:
    """An argparse type: ``a,b`` -> ``[convert("a"), convert("b")]``, blanks dropped; one clear line when a value
    does not convert."""

    def parse(text: str) -> list[Any]:
        try:
            return [convert(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {what}") from None

    return parse


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2, through run_cli
        raise UserInputError(message)


def main(argv: list[str] | None = None) -> int:
    """The command line; each cell runs ``python -m zerosiam_llm ...`` (the training command) in its own process."""
    from zerosiam_llm.errors import run_cli

    def _main(args: list[str]) -> int:
        parser = _Parser(prog="python scripts/stability_map.py", description=__doc__.split("\n\n")[0])
        parser.add_argument(
            "--grid", type=Path, required=True, help="grid file (YAML), e.g. recipes/stability/final.yaml"
        )
        parser.add_argument("--output_dir", type=Path, default=Path("outputs/stability"), help="cells and reports")
        parser.add_argument("--data_dir", default=None, help="folder with gsm8k_test.jsonl (the gsm8k stream)")
        parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each run (default: all)")
        parser.add_argument("--report_only", action="store_true", help="rewrite the reports from finished cells")
        parser.add_argument(
            "--configs",
            type=_comma_list(str, "names"),
            default=None,
            help="comma-separated config names: run only their cells now (the report covers all)",
        )
        parser.add_argument("--seeds", type=_comma_list(int, "integers"), default=None,
                            help="comma-separated seeds of the grid: run only their cells now")  # fmt: skip
        parser.add_argument("--learning_rates", type=_comma_list(float, "numbers"), default=None,
                            help="comma-separated learning rates of the grid (3e-4,1e-3): run only their cells "
                            "now")  # fmt: skip
        parser.add_argument("--reuse", type=Path, action="append", default=[], metavar="DIR",
                            help="another sweep's --output_dir: copy its finished cells with the same arguments "
                            "instead of running them (repeatable)")  # fmt: skip
        ns = parser.parse_args(args)
        grid = load_grid(ns.grid)
        if ns.report_only:
            records = {}
            for cell in grid.cells():
                path = cell.folder(ns.output_dir) / CELL_FILE
                if path.is_file():
                    records[cell] = json.loads(path.read_text())
            write_report(grid, records, ns.output_dir)
        else:
            from zerosiam_llm.online import TRAIN_COMMAND  # here: a bad grid file is refused without loading torch+trl

            _, failed = run_grid(grid, ns.output_dir, list(TRAIN_COMMAND), ns.data_dir, ns.threads, configs=ns.configs,
                                 reuse=ns.reuse, seeds=ns.seeds, learning_rates=ns.learning_rates)  # fmt: skip
            if failed:
                return 1
        print((ns.output_dir / "stability.md").read_text())
        return 0

    return run_cli(_main, argv)
