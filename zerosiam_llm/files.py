"""Atomic file writes and append-only JSONL (a killed run never leaves a half-written file that looks complete),
and the one reader of JSONL and YAML files, whose errors name the file and line."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from zerosiam_llm.errors import UserInputError

logger = logging.getLogger(__name__)


def check_writable(folder: str | os.PathLike, what: str) -> None:
    """Refuse a folder this process cannot write into, probed with a temporary file in it (or in its nearest existing
    parent): ``os.access`` says yes to root even on a read-only mount. Leaves nothing behind."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        where = "" if probe == folder else f": {probe}"
        raise UserInputError(f"{what} {folder}{where} exists and is not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".zerosiam-write-test-"):
            pass
    except OSError as err:
        raise UserInputError(f"{what} {folder} is not writable ({err.strerror}: {probe})") from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it is renamed over ``path`` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def append_jsonl(path: str | os.PathLike, records: list[dict] | dict) -> None:
    """Append whole lines and flush them to disk, so a kill loses at most the line being written."""
    records = [records] if isinstance(records, dict) else records
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, default=str, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def parse_jsonl(raw: bytes, path: str | os.PathLike, what: str, torn_tail: bool = False) -> list[dict]:
    """The JSON objects of a JSONL file's bytes, one per non-blank line; a bad line is refused by number.

    ``torn_tail``: bytes after the last newline are a line cut short by a kill (run files written by
    :func:`append_jsonl`) and are ignored, a torn multi-byte character included; data files may simply end without a
    newline. ``what`` names the file in errors ("data file", "results file").
    """
    lines = raw.split(b"\n")
    if torn_tail:
        lines = lines[:-1]  # empty when the file ends with a newline
    records = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise UserInputError(f"{what} {path}, line {lineno}: not UTF-8 text") from None
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserInputError(f"{what} {path}, line {lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise UserInputError(f"{what} {path}, line {lineno}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def repair_torn_tail(path: str | os.PathLike) -> None:
    """Cut a last line without its newline (the process was killed mid-write) so that appends start on a fresh line.
    Readers need not call it: :func:`read_jsonl` ignores that line anyway."""
    path = Path(path)
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
        keep = f.read().rfind(b"\n") + 1
        f.truncate(keep)
    logger.warning("%s: dropped a torn last line (%d bytes) left by an interrupted run", path, size - keep)


def read_jsonl(path: str | os.PathLike, what: str = "run file") -> list[dict]:
    """All complete lines of a JSONL file written by :func:`append_jsonl` ([] when it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    return parse_jsonl(path.read_bytes(), path, what, torn_tail=True)


def load_yaml(path: str | os.PathLike, what: str) -> Any:
    """Safe-load a YAML file (no Python tags); a missing, non-UTF-8 or invalid file is one line naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserInputError(f"{what} {path} does not exist") from None
    except UnicodeDecodeError:
        raise UserInputError(f"{what} {path} is not UTF-8 text") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise UserInputError(f"{what} {path} is not valid YAML{where}: {problem}") from None
