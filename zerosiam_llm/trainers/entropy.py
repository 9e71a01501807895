"""``ZeroSiamTrainer``: TRL's on-policy ``DistillationTrainer`` with no teacher and the ZeroSiam loss.

TRL does the rollouts (HF ``generate``, vLLM colocate or server, LoRA-merged weight sync), batching, DDP / FSDP /
DeepSpeed plumbing, logging and checkpoints; ``RunTrainerMixin`` the online stream, the rollout record and the run's
callbacks (shared with the RL methods' trainer). This subclass overrides only what the entropy methods need:

- ``_compute_loss``: backbone hidden states -> chunked ZeroSiam / Tent / COME / SAR objective (``objectives.py``);
- ``training_step``: SAR's sharpness-aware second pass (``sar.py``), and no update for ``method: none``;
- ``create_optimizer``: LoRA and predictor parameter groups, each AdamW or SGD-momentum, predictor lr of its own;
- ``_clip_grad_norm`` / ``_get_grad_norm``: per-group clipping and per-group grad-norm logs;
- ``_save`` / ``_load_from_checkpoint``: the predictor sidecar next to the normal peft adapter;
- ``_get_train_sampler``: k rollouts per prompt (offline protocol);
- ``_generate_and_score_completions``: after TRL returns the rollout tensors, decode and grade them for monitor-only
  metrics and the per-sample record. Nothing computed from gold answers goes back into the returned batch.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import is_peft_model
from transformers import TrainerCallback
from trl import DistillationTrainer
from trl.trainer.utils import RepeatSampler, maybe_gather_lm_head_ctx

import zerosiam_llm.trainers.trl_private as trl_private
from zerosiam_llm.configs import ZeroSiamConfig
from zerosiam_llm.errors import UserInputError
from zerosiam_llm.methods import REGISTRY
from zerosiam_llm.modeling import (
    PREDICTOR_ATTRIBUTE,
    attach_predictor,
    causal_lm,
    cpu_supports_bf16,
    get_predictor,
    lm_head_weight,
)
from zerosiam_llm.objectives import come_loss, sar_loss, zerosiam_loss
from zerosiam_llm.optimizers import AdamWWithSGDGroups
from zerosiam_llm.predictor import Predictor, has_predictor, load_predictor_state_, save_predictor
from zerosiam_llm.rollout_copy import MergedRolloutCopy
from zerosiam_llm.run_dir import RECOVERY_STATE_FILE
from zerosiam_llm.sar import sam_ascend, sam_return
from zerosiam_llm.trainers.base import RunTrainerMixin
from zerosiam_llm.trainers.callbacks import ModelRecoveryCallback

logger = logging.getLogger(__name__)


class ZeroSiamTrainer(RunTrainerMixin, DistillationTrainer):
    """Test-time entropy minimisation with the ZeroSiam predictor (``method: zerosiam``) or plain Tent (``tent``)."""

    _tag_names = ["trl", "zerosiam", "test-time-adaptation", "entropy-minimization"]
    _name = "ZeroSiam"
    _paper = REGISTRY["zerosiam"].paper.as_trl()  # create_model_card cites the paper of the method a run used
    config_class = ZeroSiamConfig

    def __init__(
        self,
        model,
        args: ZeroSiamConfig | None = None,
        train_dataset=None,
        processing_class=None,
        peft_config=None,
        callbacks: list[TrainerCallback] | None = None,
        grader=None,
    ) -> None:
        model, args, processing_class = self._trainer_inputs(model, args, processing_class)
        generation_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps
        if generation_batch % args.num_rollouts:
            raise UserInputError(
                f"num_rollouts ({args.num_rollouts}) must divide per_device_train_batch_size x "
                f"gradient_accumulation_steps ({generation_batch})"
            )
        super().__init__(
            model=model,
            teacher_model=None,
            args=args,
            train_dataset=train_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            peft_config=peft_config,
        )
        check_group_clipping(args, sharded=self.is_deepspeed_enabled or self.is_fsdp_enabled)
        _check_sam_supported(args, self.is_deepspeed_enabled or self.is_fsdp_enabled, self.accelerator.num_processes)
        # made before the predictor is attached: the copy generates, it never holds P
        self._rollout_copy = self._make_rollout_copy()
        self.predictor: Predictor | None = None
        if args.uses_predictor:
            hidden = lm_head_weight(self.model).shape[1]
            self.predictor = Predictor(hidden, args.predictor, args.predictor_rank, seed=args.seed)
            # attached after peft wrapping (peft never saves it) and after TRL's QLoRA bf16 cast (it stays fp32)
            attach_predictor(self.model, self.predictor)
        if self.use_vllm:
            self._keep_predictor_out_of_vllm_sync()
        self.nonfinite_streak = 0  # consecutive skipped (non-finite) updates
        self.nonfinite_total = 0
        self._setup_run(grader)
        # SAR: which pass of the sharpness-aware step runs (0: none, 1: at w, 2: at w + e), its rollouts and the
        # tokens (and E0) the first pass kept; the step's summed loss and kept tokens feed the model recovery
        self._sam_pass, self._sam_inputs, self._sam_kept, self._sam_threshold = 0, None, None, None
        self.sar_step_loss: list[float] = [0.0, 0.0]  # [sum of the update's loss over its kept tokens, kept tokens]
        self.recovery_callback = None
        if args.method == "sar" and args.sar_reset_below > 0:
            self.recovery_callback = ModelRecoveryCallback(self)
            self.add_callback(self.recovery_callback)

    # ---------------------------------------------------------------- rollouts

    def _get_train_sampler(self, dataset=None):
        # offline, k rollouts per prompt: each prompt index repeats k times in a row within its generation batch (as
        # in GRPO); the online stream has its own batches (get_train_dataloader)
        dataset = self.train_dataset if dataset is None else dataset
        k = self.args.num_rollouts
        generation_batch = (
            self.args.per_device_train_batch_size
            * self.accelerator.num_processes
            * self.args.gradient_accumulation_steps
        )
        return RepeatSampler(
            data_source=dataset,
            mini_repeat_count=k,
            batch_size=generation_batch // k,
            repeat_count=self.args.gradient_accumulation_steps,
            shuffle=self.shuffle_dataset,
            seed=self.args.seed,
        )

    def _make_rollout_copy(self) -> MergedRolloutCopy | None:
        choice = self.args.rollout_dtype
        if choice == "model" or self.use_vllm:
            return None
        model = self.accelerator.unwrap_model(self.model)
        plain_cpu = model.device.type == "cpu" and self.accelerator.num_processes == 1 and is_peft_model(model)
        if choice == "auto" and not (plain_cpu and model.dtype == torch.float32 and cpu_supports_bf16()):
            return None
        if not is_peft_model(model):
            raise UserInputError("rollout_dtype: bfloat16 needs a LoRA policy (the copy merges the adapter)")
        return MergedRolloutCopy(model, "bfloat16")

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
        if self._rollout_copy is None or images is not None:  # no copy under vLLM (see _make_rollout_copy)
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
        # TRL generates from `self.model_wrapped`: point it at the merged bf16 copy for this call only
        self._rollout_copy.sync()
        wrapped, self.model_wrapped = self.model_wrapped, self._rollout_copy.model
        try:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
        finally:
            self.model_wrapped = wrapped

    def _prepare_inputs(self, generation_batch):
        if self._sam_pass == 2:  # SAR's second pass: the first pass's rollouts, at the perturbed weights
            return self._sam_inputs
        inputs = self._prepare_rollouts(generation_batch)
        if self._sam_pass == 1:
            self._sam_inputs = inputs
        return inputs

    def _prepare_rollouts(self, generation_batch):
        online_repeats = self.args.protocol == "online" and self.args.steps_per_batch > 1 and self.model.training
        if not online_repeats:
            return super()._prepare_inputs(generation_batch)
        # predict once per stream batch, then reuse those rollouts for steps_per_batch updates
        new_batch = trl_private.generation_step(self) % self.args.steps_per_batch == 0
        if new_batch or not trl_private.buffered_generation(self):
            trl_private.set_buffered_generation(self, [self._generate_and_score_completions(generation_batch)])
        return trl_private.buffered_generation(self)[0]

    def training_step(self, model, inputs, num_items_in_batch):
        if self.args.method == "none":  # online baseline: the same stream and predictions, no update
            self._prepare_inputs(inputs)
            trl_private.count_generation_step(self)
            return torch.zeros((), device=self.accelerator.device)
        if self.args.method == "sar" and self.args.sar_rho > 0:
            return self._sharpness_aware_step(model, inputs, num_items_in_batch)
        return super().training_step(model, inputs, num_items_in_batch)

    def _sharpness_aware_step(self, model, inputs, num_items_in_batch):
        """SAR's SAM: the gradient at ``w`` sets the ascent ``e = rho g / ||g||``; the gradient kept for the update is
        the one at ``w + e``, on the same rollouts and over the tokens reliable in both passes. Returns the first
        pass's loss (the objective at the current weights)."""
        params = [p for p in model.parameters() if p.requires_grad]
        held = [p.grad for p in params]  # earlier micro-batches' gradients stay out of this one's ascent
        for p in params:
            p.grad = None
        try:
            self._sam_pass = 1
            loss = super().training_step(model, inputs, num_items_in_batch)  # rollouts, loss and gradient at w
            steps = sam_ascend(params, self.args.sar_rho)
            if steps is not None:  # a zero gradient (no reliable token) or a non-finite one: no second pass
                started = time.perf_counter()
                self._sam_pass = 2
                for p in params:
                    p.grad = None
                try:
                    trl_private.hf_training_step(self, model, inputs, num_items_in_batch)
                finally:
                    sam_return(params, steps)
                trl_private.drop_last_metric(self, "entropy")  # the perturbed model's, logged by compute_loss
                logged = trl_private.generation_step(self) % self.current_gradient_accumulation_steps == 0
                trl_private.add_step_time(self, time.perf_counter() - started, logged)
        finally:
            self._sam_pass, self._sam_inputs, self._sam_kept, self._sam_threshold = 0, None, None, None
            for p, grad in zip(params, held, strict=True):
                if grad is not None:
                    p.grad = grad if p.grad is None else p.grad.add_(grad)
        return loss

    def reset_stream(self, train_dataset, output_dir: str) -> None:
        super().reset_stream(train_dataset, output_dir)
        if self.recovery_callback is not None:
            self.recovery_callback.reset()

    def _keep_predictor_out_of_vllm_sync(self) -> None:
        # vLLM raises on parameter names it does not know; generation uses base + merged LoRA only
        trl_private.exclude_from_vllm_sync(self.vllm_generation, lambda name: PREDICTOR_ATTRIBUTE not in name)

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)
        # Monitoring only: decode the finished rollouts; the returned batch is TRL's, untouched.
        self._record_rollouts(inputs, output["completion_ids"], output["completion_mask"])
        self._record_base_nll(output)
        return output

    # ---------------------------------------------------------------- loss

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            loss_mask = loss_mask * inputs["tool_mask"]
        logits_to_keep = inputs["completion_ids"].size(1)
        # row t of `hidden` predicts completion token t: the positions of the model's own generated tokens
        hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, logits_to_keep)
        head = causal_lm(unwrapped_student).get_output_embeddings()
        weight = head.weight
        if isinstance(weight, torch.distributed.tensor.DTensor):  # FSDP2: gather the head once
            weight = weight.full_tensor()
        hidden = hidden.to(weight.device)
        loss_mask = loss_mask.to(weight.device).bool()
        if not bool(loss_mask.any()):  # every completion empty: a zero loss that still touches the graph (DDP)
            zero = hidden.sum() * 0.0
            return zero, zero.detach(), torch.zeros((), device=hidden.device)
        predictor = get_predictor(unwrapped_student) if self.args.uses_predictor else None
        common = {
            "temperature": self.args.loss_temperature,
            "num_items": num_items_in_batch,
            "vocab_chunk": self.args.vocab_chunk_size,
            "token_chunk": self.args.token_chunk_size,
            "gather": lambda: maybe_gather_lm_head_ctx(head.weight),
        }
        mode = "train" if self.model.training else "eval"
        if self.args.method == "come":
            out = come_loss(hidden, loss_mask, weight, **common)  # its value carries the reference's epsilon
            trl_private.record_metric(self, "come/opinion_entropy_exact", out.opinion_entropy_exact, mode)
        elif self.args.method == "sar":
            if self._sam_pass == 2:  # the first pass's reliable tokens and E0 (a per-batch quantile is not re-ranked)
                out = sar_loss(hidden, loss_mask, weight, self._sam_threshold, self._sam_kept, margin_unit="nats",
                               **common)  # fmt: skip
            else:
                out = sar_loss(hidden, loss_mask, weight, self.args.sar_margin, margin_unit=self.args.sar_margin_unit,
                               **common)  # fmt: skip
            if self._sam_pass == 1:
                self._sam_kept, self._sam_threshold = out.kept, out.entropy_below
            elif mode == "train":  # the loss the update is taken on, every micro-batch: SAR's recovery follows it
                self.sar_step_loss[0] += out.kept_total
                self.sar_step_loss[1] += float(out.kept.sum())
            if self._sam_pass == 2:  # the perturbed model's statistics are not the run's
                n = torch.tensor(float(out.num_tokens), device=hidden.device)
                return out.loss, torch.zeros((), device=hidden.device), n
            trl_private.record_metric(self, "sar/reliable_share", out.kept_share, mode)
        else:
            alpha = self.args.alpha if self.args.method == "zerosiam" else 0.0  # Tent: no alignment term
            out = zerosiam_loss(hidden, loss_mask, weight, predictor, alpha=alpha, **common)
        for name, value in out.metrics("zerosiam/").items():
            trl_private.record_metric(self, name, value, mode)
        deviation = predictor.deviation() if predictor else 0.0
        trl_private.record_metric(self, "zerosiam/predictor_deviation", deviation, mode)
        n = torch.tensor(float(out.num_tokens), device=hidden.device)
        # the parent logs sum/n as "entropy": report H(p_r), the distribution answers come from
        return out.loss, torch.tensor(out.entropy_target, device=hidden.device) * n, n

    # ---------------------------------------------------------------- optimizer and clipping

    def _parameter_groups(self, model) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
        lora, predictor = [], []
        for name, param in model.named_parameters():
            if param.requires_grad:
                (predictor if PREDICTOR_ATTRIBUTE in name else lora).append(param)
        return lora, predictor

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        args = self.args
        lora, predictor = self._parameter_groups(self.model if model is None else model)
        groups = [{"params": lora, "lr": args.learning_rate, "weight_decay": args.weight_decay, "group": "lora"}]
        if predictor:
            groups.append(
                {
                    "params": predictor,
                    "lr": args.resolved_predictor_learning_rate,
                    "weight_decay": args.predictor_weight_decay,
                    "group": "predictor",
                }
            )
        algorithms = {"lora": args.optimizer, "predictor": args.resolved_predictor_optimizer}
        for group in groups:
            group["algorithm"] = algorithms[group["group"]]
        if all(group["algorithm"] == "sgd" for group in groups):
            self.optimizer = torch.optim.SGD(groups, lr=args.learning_rate, momentum=args.momentum)
        else:  # AdamW, with an SGD-momentum step for a group that asks for it (e.g. the paper's predictor)
            self.optimizer = AdamWWithSGDGroups(
                groups, momentum=args.momentum, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                eps=args.adam_epsilon,
            )  # fmt: skip
        return self.optimizer

    def _per_group_norms(self, model, clip: bool) -> float:
        """Per-group gradient norms (logged), per-group clipping, and skipping of non-finite steps."""
        lora, predictor = self._parameter_groups(model)
        lora = [p for p in lora if p.grad is not None]
        predictor = [p for p in predictor if p.grad is not None]
        # the accelerator's call unscales fp16 gradients (once); with an infinite max it only measures
        lora_norm = float(self.accelerator.clip_grad_norm_(lora, math.inf)) if lora else 0.0
        pred_norm = float(torch.nn.utils.clip_grad_norm_(predictor, math.inf)) if predictor else 0.0
        self.record_metric("grad_norm/lora", lora_norm)
        if self.predictor is not None:
            self.record_metric("grad_norm/predictor", pred_norm)
        if not (math.isfinite(lora_norm) and math.isfinite(pred_norm)):
            # a non-finite loss or gradient: drop this step's gradients so the optimizer step is a no-op
            for p in lora + predictor:
                p.grad = None
            self.nonfinite_streak += 1
            self.nonfinite_total += 1
            self.record_metric("train/nonfinite_skipped", 1.0)
            logger.warning("non-finite gradient at step %d: update skipped", self.state.global_step + 1)
            return float("nan")
        self.nonfinite_streak = 0
        self.record_metric("train/nonfinite_skipped", 0.0)
        if clip:
            for params, norm, max_norm in (
                (lora, lora_norm, self.args.max_grad_norm),
                (predictor, pred_norm, self.args.predictor_max_grad_norm),
            ):
                if max_norm > 0 and norm > max_norm:
                    scale = max_norm / (norm + 1e-6)
                    for p in params:
                        p.grad.mul_(scale)
        return math.sqrt(lora_norm**2 + pred_norm**2)

    def _clip_grad_norm(self, model):
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or self._has_mixed_mesh_grads(model):
            return super()._clip_grad_norm(model)  # sharded gradients: the engine's global clip
        return self._per_group_norms(model, clip=True)

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None and not (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            # max_grad_norm 0: transformers never calls _clip_grad_norm, but the predictor's own clip still holds
            return self._per_group_norms(model, clip=True)
        return super()._get_grad_norm(model, grad_norm)

    # ---------------------------------------------------------------- save / load

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        # the pickled training_args.bin must not carry a Hub token; the push reads it before or after this call
        token, self.args.hub_token = self.args.hub_token, None
        try:
            super()._save(output_dir, state_dict)  # peft keeps only adapter keys: the predictor is not in it
        finally:
            self.args.hub_token = token
        if self.predictor is not None:
            with self._dist.gather_params(list(self.predictor.parameters())):
                if self.args.should_save:
                    save_predictor(self.predictor, output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.predictor is not None:
            if not has_predictor(resume_from_checkpoint):
                raise UserInputError(f"checkpoint {resume_from_checkpoint} has no predictor sidecar to resume from")
            load_predictor_state_(self.predictor, resume_from_checkpoint)
        self._load_guard_state(resume_from_checkpoint)
        recovery_state = Path(resume_from_checkpoint) / RECOVERY_STATE_FILE
        if self.recovery_callback is not None and recovery_state.is_file():
            self.recovery_callback.average.load_state_dict(json.loads(recovery_state.read_text(encoding="utf-8")))


def check_group_clipping(args: ZeroSiamConfig, sharded: bool) -> None:
    """Per-group clipping needs the gradients in one process's hands; DeepSpeed and FSDP clip every gradient together
    with ``max_grad_norm`` inside the engine, where the predictor's larger gradient would set the scale for LoRA."""
    if sharded and args.uses_predictor and args.predictor_max_grad_norm > 0:
        raise UserInputError(
            "predictor_max_grad_norm clips the predictor's gradients apart from LoRA's, which DeepSpeed and FSDP "
            "cannot do (they clip all gradients together with max_grad_norm); train with DDP "
            "(recipes/accelerate/ddp.yaml), or set predictor_max_grad_norm: 0 to accept one global clip"
        )


def _check_sam_supported(args: ZeroSiamConfig, sharded: bool, num_processes: int) -> None:
    """SAR's two passes move each process's parameters by their full gradient, between two backward passes."""
    if args.method != "sar" or args.sar_rho == 0:
        return
    if sharded:
        raise UserInputError(
            "method: sar with sar_rho > 0 needs unsharded parameters and gradients (one process or DDP); DeepSpeed "
            "and FSDP keep them in the engine. Use recipes/accelerate/ddp.yaml, or sar_rho: 0 (one pass)"
        )
    if num_processes > 1 and args.gradient_accumulation_steps > 1:
        raise UserInputError(
            "method: sar with sar_rho > 0 under several processes needs gradient_accumulation_steps: 1 (each "
            "micro-batch's two passes would be synchronised out of step); raise per_device_train_batch_size instead"
        )
