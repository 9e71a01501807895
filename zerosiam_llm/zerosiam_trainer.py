"""``ZeroSiamTrainer``: TRL's on-policy ``DistillationTrainer`` with no teacher and the ZeroSiam loss.

TRL does the rollouts (HF ``generate``, vLLM colocate or server, LoRA-merged weight sync), batching, DDP / FSDP /
DeepSpeed plumbing, logging and checkpoints. This subclass overrides only what ZeroSiam needs:

- ``_compute_loss``: backbone hidden states -> chunked ZeroSiam / Tent / COME / SAR objective (``objectives.py``);
- ``training_step``: SAR's sharpness-aware second pass (``sar.py``), and no update for ``method: none``;
- ``create_optimizer``: LoRA and predictor parameter groups, each AdamW or SGD-momentum, predictor lr of its own;
- ``_clip_grad_norm`` / ``_get_grad_norm``: per-group clipping and per-group grad-norm logs;
- ``_save`` / ``_load_from_checkpoint``: the predictor sidecar next to the normal peft adapter;
- ``_get_train_sampler``: k rollouts per prompt (offline protocol);
- ``get_train_dataloader``: the online stream's batches in order, its last shorter batch included, split across
  processes;
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
from transformers import TrainerCallback, TrainerState
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from trl import DistillationTrainer
from trl.trainer.utils import RepeatSampler, maybe_gather_lm_head_ctx

from zerosiam_llm.callbacks import (
    GUARD_STATE_FILE,
    METRICS_FILE,
    PREDICTIONS_FILE,
    RECOVERY_STATE_FILE,
    SAMPLES_FILE,
    CollapseGuardCallback,
    ModelRecoveryCallback,
    RunRecordCallback,
    StepProgressCallback,
    last_complete_checkpoint,
)
from zerosiam_llm.card import PAPERS
from zerosiam_llm.errors import UserInputError
from zerosiam_llm.files import append_jsonl, read_jsonl
from zerosiam_llm.modeling import (
    PREDICTOR_ATTRIBUTE,
    attach_predictor,
    causal_lm,
    cpu_supports_bf16,
    get_predictor,
    lm_head_weight,
)
from zerosiam_llm.monitoring import base_model_nll, parse_guard_rules, repetition_stats, rollout_metrics
from zerosiam_llm.objectives import come_loss, sar_loss, zerosiam_loss
from zerosiam_llm.optimizers import AdamWWithSGDGroups
from zerosiam_llm.predictor import Predictor, has_predictor, load_predictor_state_, save_predictor
from zerosiam_llm.rollout_copy import MergedRolloutCopy
from zerosiam_llm.sar import sam_ascend, sam_return
from zerosiam_llm.zerosiam_config import ZeroSiamConfig

logger = logging.getLogger(__name__)

class ZeroSiamTrainer(DistillationTrainer):
    """Test-time entropy minimisation with the ZeroSiam predictor (``method: zerosiam``) or plain Tent (``tent``)."""

    _tag_names = ["trl", "zerosiam", "test-time-adaptation", "entropy-minimization"]
    _name = "ZeroSiam"
    _paper = PAPERS["zerosiam"]  # create_model_card cites the paper of the method a run used

    def __init__(
        self,
        model,
        args: ZeroSiamConfig,
        train_dataset=None,
        processing_class=None,
        peft_config=None,
        callbacks: list[TrainerCallback] | None = None,
        grader=None,
    ) -> None:
        if not isinstance(args, ZeroSiamConfig):
            raise TypeError("ZeroSiamTrainer needs a ZeroSiamConfig")
        _check_head_supported(model)
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
        self._grader = grader
        self._owns_grader = grader is None
        # the fresh adapter and P = I, restored between online streams (each starts from the base model)
        self._initial_trainable = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        self.stream_name: str | None = None
        self._recorded_ids: set[str] | None = None  # problem ids already in this stream's predictions.jsonl
        self.nonfinite_streak = 0  # consecutive skipped (non-finite) updates
        self.nonfinite_total = 0
        self.already_finished = False  # set by train() when the checkpoint resumed was already at the last step
        self.add_callback(RunRecordCallback(self))
        # a step bar with ETA instead of HF's bar + a raw dict per step (the dict is in metrics.jsonl / report_to)
        self.remove_callback(PrinterCallback)
        self.remove_callback(ProgressCallback)
        self.add_callback(StepProgressCallback(self, bar=not args.disable_tqdm))
        rules = parse_guard_rules(args.guard_rules)
        self.guard_callback = CollapseGuardCallback(self, rules) if rules else None
        if self.guard_callback is not None:
            self.add_callback(self.guard_callback)
        # SAR: which pass of the sharpness-aware step runs (0: none, 1: at w, 2: at w + e), its rollouts and the
        # tokens the first pass kept; the last loss feeds the model recovery
        self._sam_pass, self._sam_inputs, self._sam_kept = 0, None, None
        self.sar_last_loss: float | None = None
        self.recovery_callback = None
        if args.method == "sar" and args.sar_reset_below > 0:
            self.recovery_callback = ModelRecoveryCallback(self)
            self.add_callback(self.recovery_callback)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """HF ``train``, except that resuming a checkpoint already at the planned step count trains nothing.

        transformers resumes mid-epoch without checking ``global_step >= max_steps`` first, so re-running a finished
        run would take one more step; here the checkpoint's weights are loaded and training is skipped.
        """
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
        if resume_from_checkpoint:
            done = TrainerState.load_from_json(str(Path(resume_from_checkpoint) / "trainer_state.json")).global_step
            planned = self.planned_steps()
            if done >= planned:
                logger.warning("%s is at step %d of %d: nothing to train", resume_from_checkpoint, done, planned)
                self._load_from_checkpoint(resume_from_checkpoint)
                self.state = TrainerState.load_from_json(str(Path(resume_from_checkpoint) / "trainer_state.json"))
                self.already_finished = True
                return None
        self.already_finished = False
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def planned_steps(self) -> int:
        """The optimisation steps a full run of this config takes (``max_steps``, or epochs x batches per epoch)."""
        return self.set_initial_training_values(self.args, self.get_train_dataloader())[-1]

    # ---------------------------------------------------------------- rollouts

    def get_train_dataloader(self):
        if self.args.protocol != "online":
            return super().get_train_dataloader()
        # online: explicit batches so that the stream's last, shorter batch is answered, scored and trained on too
        # (TRL's RepeatSampler drops it); each batch repeats steps_per_batch times, k rows a problem, and is split
        # across the processes here (accelerate would hand whole batches to each process in turn)
        from torch.utils.data import DataLoader

        dataset = self._remove_unused_columns(self.train_dataset, description="Training")
        processes = self.accelerator.num_processes
        batches = StreamBatchSampler(len(dataset), self.args.stream_batch_size, self.args.num_rollouts,
                                     self.args.steps_per_batch, self.accelerator.process_index, processes)  # fmt: skip
        per_process = batches.per_process * self.args.num_rollouts
        if per_process != self.args.per_device_train_batch_size:
            raise UserInputError(
                f"per_device_train_batch_size is {self.args.per_device_train_batch_size} but a stream batch of "
                f"{self.args.stream_batch_size} over {processes} processes needs {per_process}: the config was "
                "resolved for another number of processes (set WORLD_SIZE as the launcher does)"
            )
        loader = DataLoader(dataset, batch_sampler=batches, collate_fn=self.data_collator,
                            num_workers=self.args.dataloader_num_workers)  # fmt: skip
        return self.accelerator.prepare(loader) if processes == 1 else loader

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
        if self._step % self.args.steps_per_batch == 0 or self._buffered_inputs is None:
            self._buffered_inputs = [self._generate_and_score_completions(generation_batch)]
        return self._buffered_inputs[0]

    def training_step(self, model, inputs, num_items_in_batch):
        if self.args.method == "none":  # online baseline: the same stream and predictions, no update
            self._prepare_inputs(inputs)
            self._step += 1
            return torch.zeros((), device=self.accelerator.device)
        if self.args.method == "sar" and self.args.sar_rho > 0:
            return self._sharpness_aware_step(model, inputs, num_items_in_batch)
        return super().training_step(model, inputs, num_items_in_batch)

    def _sharpness_aware_step(self, model, inputs, num_items_in_batch):
        """SAR's SAM: the gradient at ``w`` sets the ascent ``e = rho g / ||g||``; the gradient kept for the update is
        the one at ``w + e``, on the same rollouts and over the tokens reliable in both passes. Returns the first
        pass's loss (the objective at the current weights)."""
        from transformers import Trainer

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
                    Trainer.training_step(self, model, inputs, num_items_in_batch)
                finally:
                    sam_return(params, steps)
                self._metrics["train"]["entropy"].pop()  # the perturbed model's, logged by compute_loss
                elapsed = time.perf_counter() - started
                if self._step % self.current_gradient_accumulation_steps == 0:  # TRL logged this step's time
                    self._metrics["train"]["step_time"][-1] += elapsed
                else:
                    self._current_train_step_time += elapsed
        finally:
            self._sam_pass, self._sam_inputs = 0, None
            for p, grad in zip(params, held, strict=True):
                if grad is not None:
                    p.grad = grad if p.grad is None else p.grad.add_(grad)
        return loss

    def reset_stream(self, train_dataset, output_dir: str) -> None:
        """Start a new online stream from the base model: fresh adapter, P = I, fresh optimizer and state."""
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if name in self._initial_trainable:
                    param.copy_(self._initial_trainable[name])
        self.optimizer, self.lr_scheduler = None, None
        self._step, self._buffered_inputs = 0, None
        for metrics in self._metrics.values():
            metrics.clear()
        self.train_dataset = train_dataset
        self.args.output_dir = output_dir
        self._recorded_ids = None
        if self.guard_callback is not None:
            self.guard_callback.reset()
        if self.recovery_callback is not None:
            self.recovery_callback.reset()
        if self.use_vllm:
            self._last_loaded_step = -1  # push the reset weights to vLLM before the first prediction

    def _keep_predictor_out_of_vllm_sync(self) -> None:
        # vLLM raises on parameter names it does not know; generation uses base + merged LoRA only
        generation = self.vllm_generation
        original = generation._iter_named_params

        def iter_without_predictor():
            for name, param in original():
                if PREDICTOR_ATTRIBUTE not in name:
                    yield name, param

        generation._iter_named_params = iter_without_predictor

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)
        # Monitoring only: decode the finished rollouts; the returned batch is TRL's, untouched.
        self._record_rollouts(inputs, output["completion_ids"], output["completion_mask"])
        self._record_base_nll(output)
        return output

    def _record_base_nll(self, output) -> None:
        # coherence: the frozen base model's NLL of the rollouts (adapter disabled, never the predictor); every
        # process joins the forward pass, the token-weighted mean is gathered
        every, step = self.args.base_nll_every, self.state.global_step + 1
        if not every or (step - 1) % every or self.args.method == "none":
            return
        mask = output["completion_mask"]
        head = causal_lm(self.model).get_output_embeddings()
        nll = base_model_nll(
            self.accelerator.unwrap_model(self.model), output["prompt_ids"], output["prompt_mask"],
            output["completion_ids"], mask, token_chunk=self.args.token_chunk_size,
            vocab_chunk=self.args.vocab_chunk_size, gather=lambda: maybe_gather_lm_head_ctx(head.weight),
        )  # fmt: skip
        n = mask.sum().to(torch.float64)
        local = torch.stack([torch.nan_to_num(torch.tensor(nll, dtype=torch.float64, device=n.device)) * n, n])
        total = self.accelerator.gather(local[None]).sum(0)
        if total[1] > 0:
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["coherence/base_nll"].append((total[0] / total[1]).item())

    @property
    def grader(self):
        if self._grader is None:
            from zerosiam_llm.grading import Grader

            self._grader = Grader(num_workers=1)
        return self._grader

    def _record_rollouts(self, inputs, completion_ids, completion_mask) -> None:
        from accelerate.utils import gather_object

        from zerosiam_llm.grading import extract_answer, has_boxed

        ids_list = [ids[mask.bool()].tolist() for ids, mask in zip(completion_ids, completion_mask, strict=True)]
        texts = self.processing_class.batch_decode(ids_list, skip_special_tokens=True)
        lengths = completion_mask.sum(-1).tolist()
        step = self.state.global_step + 1  # the optimisation step these rollouts train
        rows = []
        for example, ids, text, length in zip(inputs, ids_list, texts, lengths, strict=True):
            extraction = extract_answer(text)
            rep = repetition_stats(ids, self.args.repetition_ngram)
            rows.append(
                {
                    "step": step,
                    "id": example.get("id"),
                    "completion": text,
                    "completion_tokens": int(length),
                    "truncated": int(length) >= self.args.max_completion_length,
                    "answer": extraction.answer,
                    "boxed": has_boxed(text),
                    "gold": example.get("answer"),
                    "repeated_ngram_share": rep["repeated_ngram_share"],
                    "longest_repeated_span": int(rep["longest_repeated_span"]),
                }
            )
        rows = gather_object(rows)
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        for name, value in rollout_metrics(rows).items():
            metrics[name].append(value)
        if self.args.protocol == "online" and mode == "train":
            self._record_predictions(inputs, rows)
            return
        graded = [r for r in rows if r["gold"] is not None]
        if graded and (step - 1) % self.args.monitor_every == 0 and self.accelerator.is_main_process:
            verdicts = self.grader.grade([r["gold"] for r in graded], [r["answer"] for r in graded])
            for row, ok in zip(graded, verdicts, strict=True):
                row["correct"] = bool(ok)
            metrics["monitor/accuracy"].append(sum(verdicts) / len(verdicts))
        if self.accelerator.is_main_process and mode == "train" and self.args.output_dir:
            append_jsonl(Path(self.args.output_dir) / SAMPLES_FILE, rows)

    def _record_predictions(self, inputs, rows) -> None:
        """Online protocol: one line per problem, appended before this batch's update (the scored prediction)."""
        from accelerate.utils import gather_object

        from zerosiam_llm.grading import majority_answer

        if self.args.steps_per_batch > 1 and self._step % self.args.steps_per_batch:
            return
        k = self.args.num_rollouts
        # `rows` are every process's, in process order: the problems (one per k rows) are gathered the same way
        examples = gather_object(list(inputs[::k])) if self.accelerator.num_processes > 1 else inputs[::k]
        if not self.accelerator.is_main_process:
            return
        from zerosiam_llm.prompts import render_prompt

        path = Path(self.args.output_dir) / PREDICTIONS_FILE
        if self._recorded_ids is None:  # read once per stream; a resumed stream re-predicts a batch: keep the first
            self._recorded_ids = {r["id"] for r in read_jsonl(path)}
        done = self._recorded_ids
        groups = [rows[i : i + k] for i in range(0, len(rows), k)]
        golds = [g[0]["gold"] for g in groups]
        chosen = []
        for group in groups:
            index, _ = majority_answer([r["answer"] for r in group]) if k > 1 else (0, 1)
            chosen.append(group[index if index is not None else 0])
        graded = [i for i, gold in enumerate(golds) if gold is not None]
        verdicts = self.grader.grade([golds[i] for i in graded], [chosen[i]["answer"] for i in graded])
        correct = dict(zip(graded, verdicts, strict=True))
        lines = []
        for i, (example, group, pick) in enumerate(zip(examples, groups, chosen, strict=True)):
            if pick["id"] in done:  # recorded before a resume, or a padding repeat of the last batch
                continue
            done.add(pick["id"])
            line = {
                "benchmark": self.stream_name,
                "id": pick["id"],
                "step": pick["step"],
                "method": self.args.method,
                "prompt": render_prompt(self.processing_class, example["prompt"]),
                "completion": pick["completion"],
                "answer": pick["answer"],
                "gold": golds[i],
                "correct": bool(correct[i]) if i in correct else None,
                "completion_tokens": pick["completion_tokens"],
                "truncated": pick["truncated"],
            }
            if k > 1:
                line["completions"] = [r["completion"] for r in group]
                line["answers"] = [r["answer"] for r in group]
            lines.append(line)
        append_jsonl(path, lines)
        if correct:
            self._metrics["train"]["monitor/accuracy"].append(sum(correct.values()) / len(correct))

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
            out = come_loss(hidden, loss_mask, weight, **common)
        elif self.args.method == "sar":
            keep = self._sam_kept if self._sam_pass == 2 else None
            out = sar_loss(hidden, loss_mask, weight, self.args.sar_margin, keep, **common)
            if self._sam_pass == 1:
                self._sam_kept = out.kept
            elif mode == "train":  # the loss the update is taken on: SAR's recovery average follows it
                self.sar_last_loss = out.kept_loss
            if self._sam_pass == 2:  # the perturbed model's statistics are not the run's
                n = torch.tensor(float(out.num_tokens), device=hidden.device)
                return out.loss, torch.zeros((), device=hidden.device), n
            self._metrics[mode]["sar/reliable_share"].append(out.kept_share)
        else:
            out = zerosiam_loss(hidden, loss_mask, weight, predictor, alpha=self.args.alpha, **common)
        for name, value in out.metrics("zerosiam/").items():
            self._metrics[mode][name].append(value)
        self._metrics[mode]["zerosiam/predictor_deviation"].append(predictor.deviation() if predictor else 0.0)
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
        metrics = self._metrics["train"]
        metrics["grad_norm/lora"].append(lora_norm)
        if self.predictor is not None:
            metrics["grad_norm/predictor"].append(pred_norm)
        if not (math.isfinite(lora_norm) and math.isfinite(pred_norm)):
            # a non-finite loss or gradient: drop this step's gradients so the optimizer step is a no-op
            for p in lora + predictor:
                p.grad = None
            self.nonfinite_streak += 1
            self.nonfinite_total += 1
            metrics["train/nonfinite_skipped"].append(1.0)
            logger.warning("non-finite gradient at step %d: update skipped", self.state.global_step + 1)
            return float("nan")
        self.nonfinite_streak = 0
        metrics["train/nonfinite_skipped"].append(0.0)
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
        guard_state = Path(resume_from_checkpoint) / GUARD_STATE_FILE
        if self.guard_callback is not None and guard_state.is_file():
            self.guard_callback.guard.load_state_dict(json.loads(guard_state.read_text(encoding="utf-8")))
        recovery_state = Path(resume_from_checkpoint) / RECOVERY_STATE_FILE
        if self.recovery_callback is not None and recovery_state.is_file():
            self.recovery_callback.average.load_state_dict(json.loads(recovery_state.read_text(encoding="utf-8")))

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None, tags=None) -> None:
        """TRL's card (front matter, the method's paper, versions, citations) completed with the adapter's use, the
        settings and the collapse metrics (``card.py``)."""
        if not self.is_world_process_zero():
            return
        from zerosiam_llm.card import card_dataset, complete_model_card

        out = Path(self.args.output_dir)
        self._paper = PAPERS.get(self.args.method, PAPERS["tent"])  # the method this run used
        self._name = self._paper["name"]
        super().create_model_card(model_name or out.name, dataset_name or card_dataset(self.args), tags)
        complete_model_card(out / "README.md", self.args, read_jsonl(out / METRICS_FILE))

    def close(self) -> None:
        if self._owns_grader and self._grader is not None:
            self._grader.close()
            self._grader = None


class StreamBatchSampler(torch.utils.data.Sampler):
    """The online stream's batches in order: ``batch_size`` problems at a time, the last batch shorter when the stream
    does not divide evenly; each problem index ``k`` times in a row, each batch ``repeats`` times (one prediction,
    then ``steps_per_batch`` updates on it).

    Under several processes each batch is split into equal consecutive parts, ``ceil(batch_size / processes)``
    problems each (every process must generate for the same number of prompts, e.g. for vLLM); a last batch too
    short to fill them is padded by repeating its first problems, whose prediction is recorded once.
    """

    def __init__(self, num_problems: int, batch_size: int, k: int = 1, repeats: int = 1, process_index: int = 0,
                 num_processes: int = 1) -> None:  # fmt: skip
        self.num_problems, self.batch_size, self.k, self.repeats = num_problems, batch_size, k, repeats
        self.process_index, self.num_processes = process_index, num_processes
        self.per_process = math.ceil(batch_size / num_processes)

    def __iter__(self):
        for start in range(0, self.num_problems, self.batch_size):
            problems = list(range(start, min(start + self.batch_size, self.num_problems)))
            share = math.ceil(len(problems) / self.num_processes)
            slots = [problems[i % len(problems)] for i in range(share * self.num_processes)]
            mine = slots[self.process_index * share : (self.process_index + 1) * share]
            batch = [i for i in mine for _ in range(self.k)]
            for _ in range(self.repeats):
                yield batch

    def __len__(self) -> int:
        return math.ceil(self.num_problems / self.batch_size) * self.repeats


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


def _check_head_supported(model) -> None:
    lm = causal_lm(model)
    config = lm.config.get_text_config()
    for name in (
        "logit_scale",
        "final_logit_softcapping",
        "logits_scaling",
        "output_multiplier",
        "lm_head_multiplier",
    ):
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise UserInputError(
                f"model {config.model_type} transforms its logits ({name}={value}); the chunked ZeroSiam loss "
                "supports plain linear heads only (Llama, Qwen2/3, Mistral, SmolLM...)"
            )
    head = lm.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise UserInputError(f"model {config.model_type} has an LM-head bias; only bias-free heads are supported")
