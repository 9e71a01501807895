"""The trainer of each method: ``ZeroSiamTrainer`` (entropy methods) or ``LabelFreeTrainer`` (RL methods)."""

from __future__ import annotations

from zerosiam_llm.label_free_config import LabelFreeConfig
from zerosiam_llm.label_free_trainer import LabelFreeTrainer
from zerosiam_llm.zerosiam_config import ZeroSiamConfig
from zerosiam_llm.zerosiam_trainer import ZeroSiamTrainer


def trainer_class(config: ZeroSiamConfig) -> type:
    """The trainer that runs ``config.method`` (the config's class says which: ``LabelFreeConfig`` is GRPO's)."""
    return LabelFreeTrainer if isinstance(config, LabelFreeConfig) else ZeroSiamTrainer
