"""``LabelFreeTrainer``: TRL's ``GRPOTrainer`` with a label-free reward (``rewards.py``), on the project's run.

TRL does the k rollouts per prompt (HF ``generate`` or vLLM, LoRA, weight sync), the group advantages and its loss
types; ``RunTrainerMixin`` adds the online stream, the rollout record and predictions, the callbacks (run record,
step bar, collapse guard) and the card. This subclass overrides only:

- ``_calculate_rewards``: the vote rewards go through TRL's reward-function API (text only); the logit rewards
  (``entropy-reward``, ``self-certainty``) are computed here from the policy's hidden states of the rollouts, in token
  chunks through the loss module's projection (``objectives.sequence_scores``), without gradient. With
  ``num_vote_rollouts`` m > k, the rollouts past the first k of each group get a NaN reward (TRL's "unscorable":
  out of the group baseline, advantage 0);
- ``_generate``: keeps the rollouts' prompt and completion token ids for the logit rewards and monitors;
- ``_generate_and_score_completions``: records each rollout (and its reward) after TRL scored the batch, and drops
  the m - k vote-only rollouts from the batch GRPO trains on.

Gold answers reach no reward: a data set's ``answer`` column is passed to TRL reward functions as a keyword
argument, which the vote rewards never read.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import TrainerCallback
from trl import GRPOTrainer
from trl.trainer.utils import maybe_gather_lm_head_ctx

import zerosiam_llm.trainers.trl_private as trl_private
from zerosiam_llm.configs import LabelFreeConfig
from zerosiam_llm.errors import UserInputError
from zerosiam_llm.grading import has_boxed
from zerosiam_llm.methods import REGISTRY
from zerosiam_llm.modeling import causal_lm, final_hidden_states
from zerosiam_llm.objectives import SequenceScores, sequence_scores
from zerosiam_llm.rewards import LOGIT_METHODS, VoteReward, completion_text
from zerosiam_llm.trainers.base import RunTrainerMixin

logger = logging.getLogger(__name__)


class LogitReward:
    """A TRL reward function for a logit method (entropy-reward, self-certainty): it scores the rollouts TRL has just
    generated under the current policy (:meth:`LabelFreeTrainer._logit_rewards`); ``last`` holds the last call's."""

    def __init__(self, trainer: LabelFreeTrainer) -> None:
        self.trainer = trainer
        self.last: list[float] | None = None
        self.__name__ = trainer.args.method.replace("-", "_")  # TRL names the logged reward column after it

    def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float]:
        self.last = self.trainer._logit_rewards(completions).tolist()
        return self.last


class LabelFreeTrainer(RunTrainerMixin, GRPOTrainer):
    """GRPO with a label-free reward: majority vote, semantic vote, entropy or self-certainty (``method``)."""

    _tag_names = ["trl", "grpo", "zerosiam", "test-time-adaptation", "label-free"]
    _name = "LabelFree"
    _paper = REGISTRY["majority-vote"].paper.as_trl()
    config_class = LabelFreeConfig

    def __init__(
        self,
        model,
        args: LabelFreeConfig | None = None,
        train_dataset=None,
        processing_class=None,
        peft_config=None,
        callbacks: list[TrainerCallback] | None = None,
        grader=None,
    ) -> None:
        model, args, processing_class = self._trainer_inputs(model, args, processing_class)
        self.args = args  # the logit reward reads it before TRL's __init__ sets it
        if args.method in LOGIT_METHODS:
            reward = LogitReward(self)
        else:  # the grader's math equivalence clusters the answers (1/2 and 0.5 are one answer)
            reward = VoteReward(args.method, args.rollouts_per_prompt, lambda a, b: self.grader.equivalent(a, b),
                                args.vote_clustering, trained=args.num_rollouts)  # fmt: skip
        self.reward = reward  # the one reward function, passed to GRPOTrainer as a public argument
        self._rollout_ids: tuple[list[list[int]], list[list[int]]] | None = None
        # this generation batch's rollout scores, one pass per (temperature, shifted), computed once
        self._scores: dict[tuple[float, bool], SequenceScores] = {}
        super().__init__(
            model=model,
            reward_funcs=[reward],
            args=args,
            train_dataset=train_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            peft_config=peft_config,
        )
        local_batch = args.per_device_train_batch_size * args.steps_per_generation
        m, k = args.rollouts_per_prompt, args.num_rollouts
        if local_batch % m or (local_batch // m * k) % args.steps_per_generation:
            raise UserInputError(
                f"each process must hold whole groups of {m} rollouts (the rewards compare the rollouts of one "
                f"prompt), and the {k} trained of each split into steps_per_generation equal parts: "
                f"per_device_train_batch_size x steps_per_generation = {local_batch}"
            )
        self._setup_run(grader)

    # ---------------------------------------------------------------- rewards

    def _generate(self, prompts: list):
        out = super()._generate(prompts)
        self._rollout_ids, self._scores = (out[0], out[1]), {}  # prompt and completion token ids, per rollout
        return out

    def _logit_rewards(self, completions: list) -> torch.Tensor:
        """RENT's reward (minus the mean token entropy on logits / the rollout temperature, or ``no_answer_reward``
        for a rollout without a box) or Intuitor's self-certainty (raw logits; ``self_certainty_positions``)."""
        args = self.args
        if args.method == "entropy-reward":
            temperature = args.reward_temperature or args.temperature
            scores = self._rollout_scores(temperature, shifted=False)
            rewards = -scores.entropy
            if args.no_answer_reward is not None:
                boxed = torch.tensor([has_boxed(completion_text(c)) for c in completions], device=rewards.device)
                rewards = torch.where(boxed, rewards, torch.full_like(rewards, float(args.no_answer_reward)))
            return rewards
        temperature = args.reward_temperature or 1.0
        return self._rollout_scores(temperature, shifted=args.self_certainty_positions == "shifted").self_certainty

    @torch.no_grad()
    def _rollout_scores(self, temperature: float | None = None, shifted: bool = False) -> SequenceScores:
        """Each rollout's mean token entropy and self-certainty under the current policy, from the backbone's hidden
        states projected in token chunks (prompts left-padded, completions right-padded), at ``temperature`` (None:
        ``loss_temperature``, the monitors'); ``shifted``: the logits at each completion token's own position (the
        distribution after it) instead of the one that generated it. The logged ``zerosiam/*`` monitors come from
        the unshifted pass at ``loss_temperature``; each pass is computed once per generation batch."""
        key = (self.args.loss_temperature if temperature is None else temperature, shifted)
        if key not in self._scores:
            self._scores[key] = self._score_rollouts(*key)
        return self._scores[key]

    def _score_rollouts(self, temperature: float, shifted: bool) -> SequenceScores:
        prompt_ids, completion_ids = self._rollout_ids
        device = self.accelerator.device
        if not any(completion_ids):  # every completion empty: nothing to score
            nan = torch.full((len(prompt_ids),), torch.nan, dtype=torch.float64, device=device)
            return SequenceScores(nan, nan.clone(), None)
        pad = getattr(self.processing_class, "pad_token_id", None) or 0  # masked out: any id will do
        width_p = max(len(p) for p in prompt_ids)
        width_c = max(1, max(len(c) for c in completion_ids))
        ids = torch.full((len(prompt_ids), width_p + width_c), pad, dtype=torch.long)
        attention = torch.zeros_like(ids)
        completion_mask = torch.zeros(len(prompt_ids), width_c, dtype=torch.bool)
        for i, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
            ids[i, width_p - len(p) : width_p + len(c)] = torch.tensor(list(p) + list(c))
            attention[i, width_p - len(p) : width_p + len(c)] = 1
            completion_mask[i, : len(c)] = True
        model = self.accelerator.unwrap_model(self.model)
        hidden = final_hidden_states(model, ids.to(device), attention.to(device))
        head = causal_lm(model).get_output_embeddings()
        # row width_p - 1 + t predicts completion token t; shifted, row width_p + t (the logits at token t itself)
        start = width_p if shifted else width_p - 1
        selected = hidden[:, start : start + width_c]
        return sequence_scores(selected, completion_mask.to(device), head.weight, temperature,
                               self.args.token_chunk_size, self.args.vocab_chunk_size,
                               lambda: maybe_gather_lm_head_ctx(head.weight))  # fmt: skip

    # ---------------------------------------------------------------- record

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)
        # the same collapse monitors as the entropy methods, over this batch's rollouts under the current policy
        scores = self._rollout_scores()
        if scores.monitors is not None:
            mode = "train" if self.model.training else "eval"
            for name, value in scores.monitors.metrics("zerosiam/").items():
                trl_private.record_metric(self, name, value, mode)
        rewards = self.reward.last or [None] * len(inputs)
        self._record_rollouts(inputs, output["completion_ids"], output["completion_mask"], {"reward": rewards})
        self._record_base_nll(output)
        if self.args.rollouts_per_prompt > self.args.num_rollouts:
            output = self._drop_vote_only_rollouts(output, len(inputs))
        return output

    def _trained_rows(self, rows: int, device) -> torch.Tensor:
        """``[rows]`` bool: the first k rollouts of each consecutive group of m, the ones GRPO trains on (TTRL's
        ``_select_top_k_per_prompt``)."""
        return torch.arange(rows, device=device) % self.args.rollouts_per_prompt < self.args.num_rollouts

    def _drop_vote_only_rollouts(self, output: dict[str, Any], rows: int) -> dict[str, Any]:
        """The batch GRPO trains on: the trained rollouts only (:meth:`_trained_rows`); the token count that
        normalises the loss is recounted over them, across processes."""
        keep = self._trained_rows(rows, self.accelerator.device)
        kept = {key: value[keep] if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == rows
                else value for key, value in output.items()}  # fmt: skip
        if "num_items_in_batch" in output:
            kept["num_items_in_batch"] = self.accelerator.gather(kept["completion_mask"].sum()).sum()
        return kept
