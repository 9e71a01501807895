"""The trainers: ``ZeroSiamTrainer`` runs the entropy methods (ZeroSiam, Tent, COME, SAR, and ``none``),
``LabelFreeTrainer`` the GRPO-reward methods; ``zerosiam_llm.methods`` says which method each runs."""

from __future__ import annotations

from zerosiam_llm.trainers.entropy import ZeroSiamTrainer
from zerosiam_llm.trainers.grpo import LabelFreeTrainer

__all__ = ["LabelFreeTrainer", "ZeroSiamTrainer"]
