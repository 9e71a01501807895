"""The trainer of each method: ``ZeroSiamTrainer`` (entropy methods) or ``LabelFreeTrainer`` (RL methods)."""

from __future__ import annotations

from zerosiam_llm.configs import LabelFreeConfig, ZeroSiamConfig
from zerosiam_llm.trainers.entropy import ZeroSiamTrainer
from zerosiam_llm.trainers.grpo import LabelFreeTrainer


def trainer_class(config: ZeroSiamConfig) -> type:
    """The trainer that runs ``config.method`` (the config's class says which: ``LabelFreeConfig`` is GRPO's)."""
    return LabelFreeTrainer if isinstance(config, LabelFreeConfig) else ZeroSiamTrainer
