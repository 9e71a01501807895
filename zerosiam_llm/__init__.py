"""zerosiam-llm: ZeroSiam and the other label-free test-time methods for LLMs, on TRL.

    from zerosiam_llm import ZeroSiamConfig, ZeroSiamTrainer

    trainer = ZeroSiamTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", args=ZeroSiamConfig(output_dir="out"),
                              train_dataset=dataset)  # a datasets.Dataset with a "prompt" column
    trainer.train()

The names are imported on first use (PEP 562), so ``import zerosiam_llm.grading`` does not load torch and TRL.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "ZeroSiamConfig": "zerosiam_llm.configs",
    "LabelFreeConfig": "zerosiam_llm.configs",
    "ZeroSiamTrainer": "zerosiam_llm.trainers.entropy",
    "LabelFreeTrainer": "zerosiam_llm.trainers.grpo",
    "zerosiam_loss": "zerosiam_llm.objectives",
    "zerosiam_loss_reference": "zerosiam_llm.objectives",
    "tent_loss": "zerosiam_llm.objectives",
    "come_loss": "zerosiam_llm.objectives",
    "sar_loss": "zerosiam_llm.objectives",
    "Predictor": "zerosiam_llm.predictor",
    "METHODS": "zerosiam_llm.methods",
    "get_method": "zerosiam_llm.methods",
}
__all__ = [
    "METHODS", "LabelFreeConfig", "LabelFreeTrainer", "Predictor", "ZeroSiamConfig", "ZeroSiamTrainer", "come_loss",
    "get_method", "sar_loss", "tent_loss", "zerosiam_loss", "zerosiam_loss_reference",
]  # fmt: skip

if TYPE_CHECKING:
    from zerosiam_llm.configs import LabelFreeConfig, ZeroSiamConfig
    from zerosiam_llm.methods import METHODS, get_method
    from zerosiam_llm.objectives import come_loss, sar_loss, tent_loss, zerosiam_loss, zerosiam_loss_reference
    from zerosiam_llm.predictor import Predictor
    from zerosiam_llm.trainers.entropy import ZeroSiamTrainer
    from zerosiam_llm.trainers.grpo import LabelFreeTrainer


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'zerosiam_llm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
