"""What every zerosiam-llm trainer adds to its TRL trainer, whatever its loss: ``RunTrainerMixin``.

``ZeroSiamTrainer`` (entropy methods on ``DistillationTrainer``) and ``LabelFreeTrainer`` (RL methods on
``GRPOTrainer``) share, through this mixin:

- the online stream's batches (``get_train_dataloader`` + :class:`StreamBatchSampler`): every problem, in order,
  split across processes;
- the per-rollout record (``samples.jsonl``), the online predictions (``predictions.jsonl``, recorded before the
  batch's update) and the monitors computed from decoded rollouts, graded by the project's one grader;
- the run's callbacks (run record, step bar, collapse guard), resume of a finished run as a no-op, the reset between
  online streams, and the model card.

The mixin comes first in the bases (``class ZeroSiamTrainer(RunTrainerMixin, DistillationTrainer)``) and reads only
what both TRL trainers have.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from transformers import TrainerState
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from trl.trainer.utils import maybe_gather_lm_head_ctx

import zerosiam_llm.trainers.trl_private as trl_private
from zerosiam_llm.errors import UserInputError
from zerosiam_llm.files import append_jsonl, read_jsonl
from zerosiam_llm.methods import REGISTRY
from zerosiam_llm.modeling import causal_lm, check_plain_head
from zerosiam_llm.monitoring import base_model_nll, parse_guard_rules, repetition_stats, rollout_metrics
from zerosiam_llm.run_dir import (
    GUARD_STATE_FILE,
    METRICS_FILE,
    PREDICTIONS_FILE,
    SAMPLES_FILE,
    last_complete_checkpoint,
)
from zerosiam_llm.trainers.callbacks import (
    CollapseGuardCallback,
    RunRecordCallback,
    StepProgressCallback,
)

logger = logging.getLogger(__name__)


def model_short_name(model) -> str:
    """The last part of a model's id or path, for a default ``output_dir`` (as TRL names one)."""
    name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
    return name.rstrip("/").split("/")[-1].split(":")[-1]


class RunTrainerMixin:
    """The project's run behaviour on top of a TRL trainer (see the module docstring)."""

    config_class: type  # the subclass's config dataclass

    @classmethod
    def _trainer_inputs(cls, model, args, processing_class):
        """As TRL's trainers: ``args=None`` is a default config writing to ``<model name>-<trainer name>``; ``model``
        may be a Hub id, a folder, a ``.gguf`` file or ``embedded:NAME`` (loaded with the config's ``model_dtype``,
        ``model_revision``, ``attn_implementation``, ``trust_remote_code``), the tokenizer then the model's. The LM
        head must be a plain linear layer (the losses project hidden states through its weight)."""
        if args is None:
            args = cls.config_class(output_dir=f"{model_short_name(model)}-{cls._name}")
        if not isinstance(args, cls.config_class):
            raise TypeError(f"{cls.__name__} needs a {cls.config_class.__name__}, got {type(args).__name__}")
        runs = REGISTRY[args.method].trainer_class
        if not issubclass(cls, runs):  # e.g. a LabelFreeConfig (a ZeroSiamConfig subclass) for ZeroSiamTrainer
            raise TypeError(f"{cls.__name__} needs a {cls.config_class.__name__}: method {args.method} is "
                            f"{runs.__name__}'s")  # fmt: skip
        if isinstance(model, str):
            from zerosiam_llm.modeling import load_model, resolve_model

            source = resolve_model(model)
            model = load_model(source, args.model_dtype, args.trust_remote_code, args.model_revision,
                               args.attn_implementation)  # fmt: skip
            if processing_class is None:
                from zerosiam_llm.modeling import load_tokenizer

                processing_class = load_tokenizer(source, args.trust_remote_code)
        check_plain_head(model)
        return model, args, processing_class  # a model object without a tokenizer: TRL loads the one it names

    def _setup_run(self, grader=None) -> None:
        """Called at the end of the subclass's ``__init__``, after TRL's (the model is wrapped, peft applied)."""
        self._grader = grader
        self._owns_grader = grader is None
        # the fresh adapter (and P = I), restored between online streams (each starts from the base model)
        self.initial_trainable = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        self.stream_name: str | None = None
        self._recorded_ids: set[str] | None = None  # problem ids already in this stream's predictions.jsonl
        self.already_finished = False  # set by train() when the checkpoint resumed was already at the last step
        self.add_callback(RunRecordCallback(self))
        # a step bar with ETA instead of HF's bar + a raw dict per step (the dict is in metrics.jsonl / report_to)
        self.remove_callback(PrinterCallback)
        self.remove_callback(ProgressCallback)
        self.add_callback(StepProgressCallback(self, bar=not self.args.disable_tqdm))
        rules = parse_guard_rules(self.args.guard_rules)
        self.guard_callback = CollapseGuardCallback(self, rules) if rules else None
        if self.guard_callback is not None:
            self.add_callback(self.guard_callback)

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

    # ---------------------------------------------------------------- generation

    def _generate_single_turn(self, *args, **kwargs):
        if self.args.decoding != "em-inf" or self.use_vllm:
            return super()._generate_single_turn(*args, **kwargs)
        from zerosiam_llm.decoding import em_inf_before_processors

        # TRL calls generate on the unwrapped model: EM-INF rewrites that model's raw logits for this call only
        model = self.accelerator.unwrap_model(self.model_wrapped)
        with em_inf_before_processors(model, self.args.em_inf_settings.processor()):
            return super()._generate_single_turn(*args, **kwargs)

    # ---------------------------------------------------------------- online stream

    def get_train_dataloader(self):
        if self.args.protocol != "online":
            return super().get_train_dataloader()
        # online: explicit batches so that the stream's last, shorter batch is answered, scored and trained on too
        # (TRL's RepeatSampler drops it); each batch repeats steps_per_batch times, k rows a problem, and is split
        # across the processes here (accelerate would hand whole batches to each process in turn)
        from torch.utils.data import DataLoader

        dataset = self._remove_unused_columns(self.train_dataset, description="Training")
        processes = self.accelerator.num_processes
        batches = StreamBatchSampler(len(dataset), self.args.stream_batch_size, self.args.rollouts_per_prompt,
                                     self.args.steps_per_batch, self.accelerator.process_index, processes)  # fmt: skip
        per_process = batches.per_process * self.args.rollouts_per_prompt
        if per_process != self.args.per_device_train_batch_size:
            raise UserInputError(
                f"per_device_train_batch_size is {self.args.per_device_train_batch_size} but a stream batch of "
                f"{self.args.stream_batch_size} over {processes} processes needs {per_process}: the config was "
                "resolved for another number of processes (set WORLD_SIZE as the launcher does)"
            )
        loader = DataLoader(dataset, batch_sampler=batches, collate_fn=self.data_collator,
                            num_workers=self.args.dataloader_num_workers)  # fmt: skip
        return self.accelerator.prepare(loader) if processes == 1 else loader

    def record_metric(self, name: str, value: float, mode: str = "train") -> None:
        """One value for this step's log line (``metrics.jsonl``, ``report_to``), averaged over the step's records."""
        trl_private.record_metric(self, name, value, mode)

    def reset_stream(self, train_dataset, output_dir: str) -> None:
        """Start a new online stream from the base model: fresh adapter (and P = I), fresh optimizer and state."""
        self.load_trainable(self.initial_trainable)
        self.optimizer, self.lr_scheduler = None, None
        trl_private.reset_generation(self)
        trl_private.clear_metrics(self)
        self.train_dataset = train_dataset
        self.args.output_dir = output_dir
        self._recorded_ids = None
        if self.guard_callback is not None:
            self.guard_callback.reset()
        if self.use_vllm:
            self._last_loaded_step = -1  # push the reset weights to vLLM before the first prediction

    @torch.no_grad()
    def load_trainable(self, saved: dict[str, torch.Tensor]) -> None:
        """Copy saved trainable tensors (by parameter name: the run's start, a healthy checkpoint) into the model."""
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                param.copy_(saved[name].to(param.device, param.dtype))

    def _load_guard_state(self, checkpoint: str) -> None:
        guard_state = Path(checkpoint) / GUARD_STATE_FILE
        if self.guard_callback is not None and guard_state.is_file():
            self.guard_callback.guard.load_state_dict(json.loads(guard_state.read_text(encoding="utf-8")))

    # ---------------------------------------------------------------- record of the rollouts

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
            trl_private.record_metric(self, "coherence/base_nll", (total[0] / total[1]).item(), mode)

    @property
    def grader(self):
        if self._grader is None:
            from zerosiam_llm.grading import Grader

            self._grader = Grader(num_workers=1)
        return self._grader

    def _record_rollouts(self, inputs, completion_ids, completion_mask, extra: dict[str, list] | None = None) -> None:
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
        for name, values in (extra or {}).items():  # e.g. each rollout's reward (the RL methods)
            for row, value in zip(rows, values, strict=True):
                row[name] = value
        rows = gather_object(rows)
        mode = "train" if self.model.training else "eval"
        for name, value in rollout_metrics(rows).items():
            trl_private.record_metric(self, name, value, mode)
        if self.args.protocol == "online" and mode == "train":
            self._record_predictions(inputs, rows)
            return
        graded = [r for r in rows if r["gold"] is not None]
        if graded and (step - 1) % self.args.monitor_every == 0 and self.accelerator.is_main_process:
            verdicts = self.grader.grade([r["gold"] for r in graded], [r["answer"] for r in graded])
            for row, ok in zip(graded, verdicts, strict=True):
                row["correct"] = bool(ok)
            trl_private.record_metric(self, "monitor/accuracy", sum(verdicts) / len(verdicts), mode)
        if self.accelerator.is_main_process and mode == "train" and self.args.output_dir:
            append_jsonl(Path(self.args.output_dir) / SAMPLES_FILE, rows)

    def _record_predictions(self, inputs, rows) -> None:
        """Online protocol: one line per problem, appended before this batch's update (the scored prediction)."""
        from accelerate.utils import gather_object

        from zerosiam_llm.grading import majority_answer

        if self.args.steps_per_batch > 1 and trl_private.generation_step(self) % self.args.steps_per_batch:
            return
        k = self.args.rollouts_per_prompt
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
            if "reward" in pick:  # the RL methods: each rollout's label-free reward
                line["rewards"] = [r["reward"] for r in group]
            lines.append(line)
        append_jsonl(path, lines)
        if correct:
            trl_private.record_metric(self, "monitor/accuracy", sum(correct.values()) / len(correct))

    # ---------------------------------------------------------------- card and close

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None, tags=None) -> None:
        """TRL's card (front matter, the method's paper, versions, citations) completed with the adapter's use, the
        settings and the collapse metrics (``card.py``)."""
        if not self.is_world_process_zero():
            return
        from zerosiam_llm.card import card_dataset, complete_model_card

        out = Path(self.args.output_dir)
        paper = REGISTRY[self.args.method].paper or REGISTRY["tent"].paper  # the method this run used
        self._paper = paper.as_trl()  # TRL's card reads the class's _paper / _name
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
