"""The trainer's callbacks: the run record (``metrics.jsonl`` / ``samples.jsonl``, kept consistent across resume), the
step progress bar, and the collapse guard with its healthy checkpoints; and the checkpoint helper resume uses.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from zerosiam_llm.files import append_jsonl, atomic_path, atomic_write_json, read_jsonl
from zerosiam_llm.monitoring import CollapseGuard
from zerosiam_llm.run_dir import (
    GUARD_EVENTS_FILE,
    GUARD_STATE_FILE,
    HEALTHY_DIR,
    METRICS_FILE,
    RECOVERY_STATE_FILE,
    SAMPLES_FILE,
)

if TYPE_CHECKING:
    from zerosiam_llm.trainers.entropy import ZeroSiamTrainer

logger = logging.getLogger(__name__)



class RunRecordCallback(TrainerCallback):
    """``metrics.jsonl`` (one line per logged step) and ``samples.jsonl``, kept consistent across resume."""

    def __init__(self, trainer: ZeroSiamTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not args.output_dir:
            return
        out = Path(args.output_dir)
        # a resumed run restarts after its checkpoint: drop the lines of steps it will redo, and a torn last line
        # (killed mid-write) that later appends would otherwise glue onto
        for name in (METRICS_FILE, SAMPLES_FILE, GUARD_EVENTS_FILE):
            if not (out / name).exists():
                continue
            kept = [r for r in read_jsonl(out / name) if r.get("step", 0) <= state.global_step]
            with atomic_path(out / name) as tmp:
                append_jsonl(tmp, kept) if kept else tmp.touch()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and args.output_dir and logs:
            append_jsonl(Path(args.output_dir) / METRICS_FILE, {"step": state.global_step, **logs})

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.close()


class StepProgressCallback(ProgressCallback):
    """A tqdm bar over optimisation steps (count, ETA) with loss, H(p_r) and monitor accuracy as its postfix; with
    ``disable_tqdm`` one short line per logged step instead. The full per-step dict goes to ``metrics.jsonl`` and
    ``report_to``, not to the terminal."""

    SHOWN = (("loss", "loss"), ("entropy", "H(p_r)"), ("monitor/accuracy", "acc"))

    def __init__(self, trainer: ZeroSiamTrainer, bar: bool) -> None:
        super().__init__()
        self.trainer, self.bar = trainer, bar

    def on_train_begin(self, args, state, control, **kwargs):
        self.current_step = state.global_step
        if state.is_world_process_zero and self.bar:
            desc = " ".join(x for x in (args.method, self.trainer.stream_name) if x)
            self.training_bar = tqdm(total=state.max_steps, initial=state.global_step, desc=desc, unit="step",
                                     dynamic_ncols=True)  # fmt: skip

    def on_step_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_step_end(args, state, control, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        shown = {label: f"{logs[key]:.4g}" for key, label in self.SHOWN if isinstance(logs.get(key), (int, float))}
        if self.training_bar is not None:
            self.training_bar.set_postfix(shown, refresh=True)
        else:
            values = ", ".join(f"{k} {v}" for k, v in shown.items())
            print(f"step {state.global_step}/{state.max_steps}: {values}", flush=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            self.training_bar.close()
            self.training_bar = None


class CollapseGuardCallback(TrainerCallback):
    """Feeds each logged step to the :class:`CollapseGuard` and acts on its events on every process.

    Healthy checkpoints: the metrics logged at step N describe rollouts made with the weights saved at step N-1, so
    a checkpoint becomes "healthy" only when the next logged step raises nothing and no rule is mid-streak. The last
    ``healthy_checkpoints`` of them are copied to ``output_dir/healthy/step-N`` (trainable weights + a normal peft
    adapter + predictor), independent of ``save_total_limit``. ``stop`` restores the last healthy weights (the run's
    start if none yet) and ends training; ``rollback`` restores them, clears the optimizer moments, scales the lr by
    ``lr_factor`` and continues.
    """

    def __init__(self, trainer: ZeroSiamTrainer, rules) -> None:
        self.trainer, self.guard = trainer, CollapseGuard(rules)
        self.stop_event = None
        self.rollbacks: list[dict] = []
        self._pending: tuple[Path, dict] | None = None  # the checkpoint (and its weights) awaiting a verdict

    def reset(self) -> None:
        self.guard.reset()
        self.guard.last_step = None  # online streams count steps from 1 again
        self.stop_event, self._pending = None, None

    @property
    def healthy_root(self) -> Path:
        return Path(self.trainer.args.output_dir) / HEALTHY_DIR

    def last_healthy(self) -> Path | None:
        dirs = sorted(self.healthy_root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
        return dirs[-1] if dirs else None

    def _trainable(self):
        return [(n, p) for n, p in self.trainer.model.named_parameters() if p.requires_grad]

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:  # the end-of-training summary line
            return
        from accelerate.utils import broadcast_object_list

        trainer = self.trainer
        # logged monitors are per-process averages: the main process decides, every process acts
        events = [self.guard.update(state.global_step, logs) if state.is_world_process_zero else None]
        if trainer.accelerator.num_processes > 1:
            broadcast_object_list(events)
        events = events[0] or []
        for event in events:
            logger.warning(event.message)
        if events and state.is_world_process_zero and args.output_dir:
            append_jsonl(Path(args.output_dir) / GUARD_EVENTS_FILE, [e.to_dict() for e in events])
        quiet = not events and not any(self.guard.counters.values())
        if self._pending is not None:
            if quiet and state.is_world_process_zero:
                self._promote(*self._pending)
            self._pending = None
        stops = [e for e in events if e.action == "stop"]
        rollbacks = [e for e in events if e.action == "rollback"]
        if stops:
            self.stop_event = stops[0]
            self._restore_last_healthy()
            control.should_training_stop = True
        elif rollbacks:
            factor = min(e.rule.lr_factor or 1.0 for e in rollbacks)
            source = self._restore_last_healthy()
            optimizer = trainer.optimizer
            optimizer.state.clear()  # moments built while collapsing would push straight back
            for group in optimizer.param_groups:
                group["lr"] *= factor
            scheduler = getattr(trainer.lr_scheduler, "scheduler", trainer.lr_scheduler)
            if hasattr(scheduler, "base_lrs"):  # LambdaLR-style schedules recompute the lr from base_lrs
                scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
            self.guard.reset_counters()
            self.rollbacks.append({"step": state.global_step, "restored": source, "lr_factor": factor})

    def on_save(self, args, state, control, **kwargs):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            atomic_write_json(folder / GUARD_STATE_FILE, self.guard.state_dict())
            # the verdict comes at the next logged step, after the next update: keep this step's weights now
            weights = {n: p.detach().to("cpu", torch.float32, copy=True).contiguous() for n, p in self._trainable()}
            self._pending = (folder, weights)

    def _promote(self, checkpoint: Path, weights: dict) -> None:
        from safetensors.torch import save_file

        target = self.healthy_root / f"step-{checkpoint.name.split('-')[-1]}"
        tmp = self.healthy_root / f".{target.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name in os.listdir(checkpoint) if checkpoint.is_dir() else ():  # the normal adapter + predictor
            if name.startswith(("adapter_", "zerosiam_predictor")):
                shutil.copy2(checkpoint / name, tmp / name)
        save_file(weights, str(tmp / "trainable.safetensors"))  # exact tensors by parameter name, for restoring
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        dirs = sorted(self.healthy_root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
        for old in dirs[: -self.trainer.args.healthy_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def _restore_last_healthy(self) -> str:
        """Load the last healthy weights into the model (every process); returns where they came from."""
        from safetensors.torch import load_file

        healthy = self.last_healthy()
        if healthy is not None:
            saved, source = load_file(str(healthy / "trainable.safetensors")), str(healthy)
        else:  # nothing promoted yet: the weights the run started from (fresh adapter, P = I)
            saved, source = self.trainer.initial_trainable, "the run's initial adapter"
        self.trainer.load_trainable(saved)
        logger.warning("collapse guard: restored weights from %s", source)
        return source


class ModelRecoveryCallback(TrainerCallback):
    """SAR's model recovery (``sar.py``): after each update, the moving average of the second-pass loss (the mean over
    processes) is updated; when it falls below ``sar_reset_below`` the trainable weights go back to the run's (or the
    stream's) start and the optimizer's moments are cleared. Each reset is a ``reset`` line in ``guard_events.jsonl``
    and counts in ``sar/resets``; the average is saved with each checkpoint, so a resumed run continues it."""

    def __init__(self, trainer: ZeroSiamTrainer) -> None:
        from zerosiam_llm.sar import RecoveryAverage

        self.trainer = trainer
        args = trainer.args
        self.average = RecoveryAverage(args.sar_ema_decay, args.sar_reset_below, args.sar_reset_unit)

    def reset(self) -> None:
        self.average.reset()

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        # the update's loss: the mean over every kept token of its micro-batches (and processes), so each rank decides
        # alike and gradient accumulation does not leave the earlier micro-batches out
        local, trainer.sar_step_loss = trainer.sar_step_loss, [0.0, 0.0]
        if trainer.accelerator.num_processes > 1:
            local = trainer.accelerator.reduce(torch.tensor(local, device=trainer.accelerator.device), "sum").tolist()
        loss = local[0] / local[1] if local[1] > 0 else None
        fired = self.average.update(loss)
        trainer.record_metric("sar/loss_ema", self.average.ema if self.average.ema is not None else float("nan"))
        trainer.record_metric("sar/resets", float(self.average.resets))
        if not fired:
            return
        trainer.load_trainable(trainer.initial_trainable)
        trainer.optimizer.state.clear()
        below = self.average.threshold
        message = (
            f"SAR model recovery at step {state.global_step}: the loss average fell below {below:.4g} (last loss "
            f"{loss:.4g}); the adapter is back at its start and the optimizer state cleared"
        )
        logger.warning(message)
        if state.is_world_process_zero and args.output_dir:
            event = {"step": state.global_step, "metric": "sar/loss_ema", "condition": f"< {below:.4g}",
                     "value": loss, "action": "reset", "lr_factor": None, "message": message}  # fmt: skip
            append_jsonl(Path(args.output_dir) / GUARD_EVENTS_FILE, [event])

    def on_save(self, args, state, control, **kwargs):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            atomic_write_json(folder / RECOVERY_STATE_FILE, self.average.state_dict())
