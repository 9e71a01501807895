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
from zerosiam_llm.rewards import RL_METHODS, VOTE_CLUSTERINGS, VOTE_METHODS
from zerosiam_llm.zerosiam_config import UNSUPPORTED_FIELDS, ZeroSiamConfig

SELF_CERTAINTY_POSITIONS = ("shifted", "aligned")


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
            "help": "majority-vote (TTRL: 1 if the answer grades equal to the group's most common answer string), "
            "semantic-vote (EMPO: the share of the group in the answer's cluster, 0 for a group of all-distinct "
            "answers), entropy-reward (RENT / EM-RL: minus the mean token entropy; no_answer_reward without a box), "
            "or self-certainty (Intuitor: the mean KL(uniform || p_t)). Each default is its authors' code (README)."
        },
    )
    num_rollouts: int = field(
        default=4,
        metadata={"help": "k: rollouts per prompt that GRPO trains on, its group (num_generations); at least 2."},
    )
    num_vote_rollouts: int | None = field(
        default=None,
        metadata={
            "help": "Vote methods: m >= k rollouts generated per prompt; the vote (and the online prediction) uses "
            "all m, GRPO trains on the first k of each group, its baseline over those k (TTRL: m = 64, k = 32). "
            "None = k."
        },
    )
    vote_clustering: str | None = field(
        default=None,
        metadata={
            "help": "How vote answers are grouped: string (TTRL: equal strings after its normalisation; no-answer "
            "rollouts vote as '') or equivalence (clusters by the grader's math equivalence; majority-vote then "
            "leaves no-answer rollouts out of the vote, the project's earlier rule). None = the method's reference: "
            "string for majority-vote, equivalence for semantic-vote (the EMPO paper and its verl code)."
        },
    )
    no_answer_reward: float | None = field(
        default=-7.0,
        metadata={
            "help": "entropy-reward: the reward of a rollout without a \\boxed{} / \\fbox answer, in place of its "
            "entropy reward (RENT's format rule: -7); null = no rule (the entropy reward for every rollout)."
        },
    )
    reward_temperature: float | None = field(
        default=None,
        metadata={
            "help": "Temperature of the logits the logit rewards read. None = the reference's: the rollout "
            "temperature for entropy-reward (RENT), raw logits (1.0) for self-certainty (Intuitor's TRL code)."
        },
    )
    self_certainty_positions: str = field(
        default="shifted",
        metadata={
            "help": "self-certainty: shifted (Intuitor's TRL code: the logits at each completion token's own "
            "position, i.e. the distribution after it, the one after the last token included and the first "
            "token's left out) or aligned (the distribution each token was sampled from, as Intuitor's verl code)."
        },
    )
    beta: float = field(
        default=0.0,
        metadata={"help": "KL coefficient towards the base model (GRPO's beta); 0 = no reference model."},
    )

    @property
    def rollouts_per_prompt(self) -> int:
        return self.num_vote_rollouts or self.num_rollouts

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
        if self.num_vote_rollouts is not None:
            if self.method not in VOTE_METHODS:
                raise UserInputError(f"num_vote_rollouts is for the vote methods ({', '.join(VOTE_METHODS)}), not "
                                     f"{self.method}")  # fmt: skip
            if self.num_vote_rollouts < self.num_rollouts:
                raise UserInputError(f"num_vote_rollouts ({self.num_vote_rollouts}) must be >= num_rollouts "
                                     f"({self.num_rollouts}): the vote uses every rollout GRPO trains on")  # fmt: skip
        if self.vote_clustering not in (None, *VOTE_CLUSTERINGS):
            raise UserInputError(f"vote_clustering: {self.vote_clustering!r} is not allowed; allowed: null, "
                                 f"{', '.join(VOTE_CLUSTERINGS)}")  # fmt: skip
        if self.self_certainty_positions not in SELF_CERTAINTY_POSITIONS:
            raise UserInputError(f"self_certainty_positions: {self.self_certainty_positions!r} is not allowed; "
                                 f"allowed: {', '.join(SELF_CERTAINTY_POSITIONS)}")  # fmt: skip
        if self.reward_temperature is not None and not self.reward_temperature > 0:
            raise UserInputError(f"reward_temperature must be > 0 or null, got {self.reward_temperature}")
        self.num_generations = self.rollouts_per_prompt  # TRL generates m; the trainer drops all but k after the vote
        if self.protocol == "online":  # one generation per stream batch, steps_per_batch updates on it
            self.num_iterations = self.steps_per_batch
        super().__post_init__()
