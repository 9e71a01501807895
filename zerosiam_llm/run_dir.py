"""The run folder: the names of the files a run writes, what a folder holds, and the decisions made before anything
is written there (resume, overwrite, refuse another run's folder, nothing to do). One "same run?" check,
:func:`changed_fields`, serves training (``resolved_config.yaml``), evaluation (``run_config.json``) and the stability
sweep's cells (``cell_args.json``). Light on purpose: no torch or TRL import, so a bad folder is refused at once.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from zerosiam_llm.errors import UserInputError
from zerosiam_llm.files import atomic_write_text, check_writable

if TYPE_CHECKING:
    from zerosiam_llm.configs import ZeroSiamConfig

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
PREDICTIONS_FILE = "predictions.jsonl"
GUARD_EVENTS_FILE = "guard_events.jsonl"
GUARD_STATE_FILE = "collapse_guard.json"
RECOVERY_STATE_FILE = "sar_recovery.json"
HEALTHY_DIR = "healthy"
STREAM_SUMMARY = "stream_summary.json"  # one per online stream, beside its metrics.jsonl
RESOLVED_CONFIG = "resolved_config.yaml"
# fields that may change between a run and its resumption (output_dir: a run folder can be moved)
RESUMABLE_CHANGES = {
    "output_dir", "project", "max_steps", "num_train_epochs", "save_steps", "save_total_limit", "logging_steps",
    "report_to", "push_to_hub", "hub_model_id", "hub_strategy", "hub_private_repo", "resume", "overwrite_output_dir",
    "disable_tqdm", "monitor_every", "run_name", "dataloader_num_workers",
}  # fmt: skip
RUN_FILES = (METRICS_FILE, SAMPLES_FILE, SUMMARY_FILE, RESOLVED_CONFIG, "README.md", "completions", GUARD_EVENTS_FILE,
             HEALTHY_DIR, PREDICTIONS_FILE)  # fmt: skip


def changed_fields(old: Mapping[str, Any], new: Mapping[str, Any], ignore: Iterable[str] = (),
                   keys: Iterable[str] | None = None) -> list[str]:
    """The fields whose values differ between a folder's recorded run and this command's (``keys`` in their order,
    default the sorted union), less ``ignore``: empty means the same run."""
    ignored = set(ignore)
    names = list(keys) if keys is not None else sorted(set(old) | set(new))
    return [k for k in names if k not in ignored and old.get(k) != new.get(k)]


@dataclass
class OutputPlan:
    """What ``output_dir`` holds and what this command will do with it (decided before anything is written)."""

    path: Path
    overwrite: bool = False  # delete the previous run's files once every input has been validated
    resume_from: str | None = None  # the checkpoint to resume from
    finished: str | None = None  # the reason there is nothing to do (a finished run re-run with the same target)


def is_run_file(child: Path) -> bool:
    """Files and folders a run writes (an online stream folder included): what --overwrite_output_dir deletes."""
    if child.name in RUN_FILES or child.name.startswith(("checkpoint-", "adapter_", "zerosiam_predictor")):
        return True
    return child.is_dir() and any((child / name).exists() for name in (STREAM_SUMMARY, PREDICTIONS_FILE))


def plan_output_dir(config: ZeroSiamConfig) -> OutputPlan:
    """Refuse an unusable output_dir, or one holding something else; deletes and writes nothing."""

    out = Path(config.output_dir)
    check_writable(out, "output_dir")  # also: a file in the way
    if not out.exists() or not any(out.iterdir()):
        return OutputPlan(out)
    if config.overwrite_output_dir:
        return OutputPlan(out, overwrite=True)
    previous = out / RESOLVED_CONFIG
    if not previous.is_file():
        raise UserInputError(
            f"output_dir {out} is not empty and holds no zerosiam-llm run; choose another or pass "
            "--overwrite_output_dir"
        )
    try:
        old = yaml.safe_load(previous.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError):
        raise UserInputError(f"{previous} is unreadable; pass --overwrite_output_dir to start over") from None
    new = yaml.safe_load(yaml.safe_dump(config.resolved_dict()))
    changed = changed_fields(old, new, ignore=RESUMABLE_CHANGES)
    if changed:
        raise UserInputError(
            f"output_dir {out} holds another run (differs in {', '.join(changed[:6])}); choose another output_dir "
            "or pass --overwrite_output_dir"
        )
    plan = OutputPlan(out, resume_from=last_complete_checkpoint(out) if config.resume else None)
    if config.protocol == "offline":
        plan.finished = finished_offline_run(config, out, old)
    return plan


def finished_offline_run(config: ZeroSiamConfig, out: Path, old: dict) -> str | None:
    """Why a finished run needs nothing more (same target reached, or stopped by the guard); None to train on."""
    summary_path = out / SUMMARY_FILE
    if not summary_path.is_file():
        return None  # never finished (killed): resume
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    steps = summary.get("steps") or 0
    if summary.get("stopped_by_guard"):
        return f"it was stopped by the collapse guard at step {steps} ({summary['stopped_by_guard']['message']})"
    if config.max_steps > 0:
        target = config.max_steps
    elif old.get("max_steps", -1) <= 0 and old.get("num_train_epochs") == config.num_train_epochs:
        target = summary.get("max_steps") or steps  # the same epochs: the step count that run planned
    else:
        return None  # epochs changed: the trainer works out the new target
    if steps >= target:
        return f"it finished {steps} of {target} steps"
    return None


def commit_output_dir(plan: OutputPlan, config: ZeroSiamConfig) -> None:
    """After validation: delete the previous run when overwriting, then record this run's config."""
    if plan.overwrite and plan.path.is_dir():
        for child in plan.path.iterdir():
            if is_run_file(child):
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    write_resolved_config(config)


def write_resolved_config(config: ZeroSiamConfig) -> None:
    atomic_write_text(
        Path(config.output_dir) / RESOLVED_CONFIG, yaml.safe_dump(config.resolved_dict(), sort_keys=True)
    )


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest ``checkpoint-N`` that was fully written (HF writes ``trainer_state.json`` last, not atomically: a
    kill while it is written leaves it empty or cut, so it must parse); a checkpoint torn by a kill mid-save is
    skipped."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    complete = []
    for path in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        suffix = path.name.rsplit("-", 1)[-1]
        if suffix.isdigit() and _parses(path / "trainer_state.json"):
            complete.append((int(suffix), path))
        elif suffix.isdigit():
            logger.warning("ignoring incomplete checkpoint %s (killed while saving)", path)
    return str(max(complete)[1]) if complete else None


def _parses(path: Path) -> bool:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True
