"""Every read or write of TRL's (and transformers') private trainer state, in one place.

TRL 1.16 keeps its logged metrics, its generation buffer and its step timer in private attributes, and its vLLM
weight sync has no filter argument. The trainers and callbacks call these functions instead of touching the
attributes, so a TRL release that renames one breaks here, and ``tests/test_trainers_entropy.py`` /
``tests/test_trainers_grpo.py`` check each attribute and hook this module relies on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

MODES = ("train", "eval")


def record_metric(trainer, name: str, value: float, mode: str = "train") -> None:
    """One value for TRL's per-step log (``trainer._metrics[mode][name]``, averaged and cleared at each log)."""
    trainer._metrics[mode][name].append(value)


def metric_values(trainer, name: str, mode: str = "train") -> list[float]:
    """The values recorded since the last log (a live list: TRL averages it at the next log)."""
    return trainer._metrics[mode][name]


def drop_last_metric(trainer, name: str, mode: str = "train") -> None:
    trainer._metrics[mode][name].pop()


def clear_metrics(trainer) -> None:
    """Forget the values not logged yet (a new online stream starts its log afresh)."""
    for metrics in trainer._metrics.values():
        metrics.clear()


def add_step_time(trainer, seconds: float, logged: bool) -> None:
    """Count extra work (SAR's second pass) in TRL's ``step_time``: into the value logged for this step when TRL has
    already logged it (``logged``), else into the running timer it logs at the step's end."""
    if logged:
        trainer._metrics["train"]["step_time"][-1] += seconds
    else:
        trainer._current_train_step_time += seconds


def generation_step(trainer) -> int:
    """TRL's count of micro-steps (``_step``): a new generation batch every ``steps_per_generation`` of them."""
    return trainer._step


def count_generation_step(trainer) -> None:
    trainer._step += 1


def reset_generation(trainer) -> None:
    """Forget TRL's current generation batch and step count (a new online stream)."""
    trainer._step, trainer._buffered_inputs = 0, None


def buffered_generation(trainer) -> Any:
    """TRL's buffer of the current generation batch (``_buffered_inputs``), None when there is none."""
    return trainer._buffered_inputs


def set_buffered_generation(trainer, value: Any) -> None:
    trainer._buffered_inputs = value


def exclude_from_vllm_sync(generation, keep: Callable[[str], bool]) -> None:
    """Leave parameters out of TRL's weight sync to vLLM (vLLM raises on names it does not know, such as the
    predictor's). ``VLLMGeneration`` has no filter argument: its ``_iter_named_params`` is wrapped on this instance."""
    original = generation._iter_named_params

    def filtered() -> Iterator[tuple[str, torch.nn.Parameter]]:
        for name, param in original():
            if keep(name):
                yield name, param

    generation._iter_named_params = filtered


def hf_training_step(trainer, model, inputs, num_items_in_batch) -> torch.Tensor:
    """``transformers.Trainer.training_step`` itself, past TRL's override (which would generate rollouts again and
    advance its step counter): SAR's second pass on the same rollouts."""
    from transformers import Trainer

    return Trainer.training_step(trainer, model, inputs, num_items_in_batch)
