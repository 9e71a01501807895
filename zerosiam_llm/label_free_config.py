"""``LabelFreeConfig``: the RL methods' config, ``ZeroSiamConfig``'s fields (model, data, protocols, monitors, guard)
plus TRL's ``GRPOConfig`` ones (loss_type, epsilon, scale_rewards, beta, vLLM, ...).

Both parents are TRL config dataclasses whose ``__post_init__`` calls ``super().__post_init__()``, so one instance
runs ZeroSiamConfig's validation, then GRPOConfig's (generation batch, ``num_generations``), then TrainingArguments'.
The command line picks this class when ``method`` is an RL method.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

from zerosiam_llm.errors import UserInputError
from zerosiam_llm.rewards import RL_METHODS
from zerosiam_llm.zerosiam_config import UNSUPPORTED_FIELDS, ZeroSiamConfig


@dataclass
class LabelFreeConfig(ZeroSiamConfig, GRPOConfig):
    r"""Configuration of [`LabelFreeTrainer`]: GRPO with a label-free reward, on the same data, protocols, monitors and
    guard as the entropy methods.

    Every field of [`ZeroSiamConfig`] and of [`trl.GRPOConfig`] is accepted (the ZeroSiam-only ones, such as the
    predictor's, are unused). `num_rollouts` is GRPO's group size k (`num_generations`); online, each stream batch is
    one generation batch and `steps_per_batch` is GRPO's `num_iterations`.
    """

    trainer_methods = RL_METHODS
    unsupported_fields = tuple(f for f in UNSUPPORTED_FIELDS if f != "beta")  # beta is GRPO's KL coefficient here

    method: str = field(
        default="majority-vote",
        metadata={
            "help": "majority-vote (TTRL: 1 if the answer agrees with the group's majority), semantic-vote (EMPO: the "
            "share of the group in the answer's math-equivalence cluster), entropy-reward (RENT / EM-RL: minus the "
            "mean token entropy), or self-certainty (Intuitor: the mean KL(uniform || p_t))."
        },
    )
    num_rollouts: int = field(
        default=4, metadata={"help": "k: rollouts per prompt, GRPO's group (num_generations); at least 2."}
    )
    beta: float = field(
        default=0.0,
        metadata={"help": "KL coefficient towards the base model (GRPO's beta); 0 = no reference model."},
    )

    def __post_init__(self) -> None:
        if self.num_rollouts is None or self.num_rollouts < 2:
            raise UserInputError(
                f"num_rollouts must be >= 2 for method {self.method} (GRPO's group advantages), got "
                f"{self.num_rollouts}"
            )
        if self.temperature == 0:
            raise UserInputError(
                f"temperature must be > 0 for method {self.method}: greedy rollouts of one prompt are identical, so "
                "every group advantage is 0 (the online prediction is the majority answer of the k sampled rollouts)"
            )
        self.num_generations = self.num_rollouts
        if self.protocol == "online":  # one generation per stream batch, steps_per_batch updates on it
            self.num_iterations = self.steps_per_batch
        super().__post_init__()
