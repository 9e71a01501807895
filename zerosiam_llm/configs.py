"""The recipe schema: ``ZeroSiamConfig`` (the entropy methods) and ``LabelFreeConfig`` (the GRPO-reward methods),
TRL config dataclasses with help metadata, and their validation.

A recipe is a flat YAML mapping of these fields; every field of ``trl.DistillationConfig`` /
``transformers.TrainingArguments`` is accepted as well.

``LabelFreeConfig``: the RL methods' config, ``ZeroSiamConfig``'s fields (model, data, protocols, monitors, guard)
plus TRL's ``GRPOConfig`` ones (loss_type, epsilon, scale_rewards, beta, vLLM, ...).

Both parents are TRL config dataclasses whose ``__post_init__`` calls ``super().__post_init__()``, so one instance
runs ZeroSiamConfig's validation, then GRPOConfig's (generation batch, ``num_generations``), then TrainingArguments'.
The command line picks this class when ``method`` is an RL method.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import textwrap
from dataclasses import dataclass, field
from typing import Any

import yaml
from trl import DistillationConfig, GRPOConfig

from zerosiam_llm.decoding import DECODINGS, EM_INF_HELP, EMInfSettings
from zerosiam_llm.errors import UserInputError, first_line
from zerosiam_llm.grading import GOLD_STYLES
from zerosiam_llm.methods import ENTROPY_METHODS, GRPO_METHODS, METHODS, REGISTRY, unused_fields
from zerosiam_llm.predictor import PREDICTOR_FORMS
from zerosiam_llm.prompts import DEFAULT_INSTRUCTION, INSTRUCTION_PLACEMENTS
from zerosiam_llm.rewards import VOTE_CLUSTERINGS
from zerosiam_llm.sar import MARGIN_UNITS, RESET_UNITS

PROTOCOLS = ("offline", "online")
OPTIMIZERS = ("adamw", "sgd")
ROLLOUT_DTYPES = ("auto", "bfloat16", "model")
LONG_PROMPT_POLICIES = ("skip", "truncate")
GENERATED_DATASET = "generated:arithmetic"
# fields that exist in TrainingArguments / DistillationConfig but mean nothing here: refused if set in a recipe
UNSUPPORTED_FIELDS = ("teacher_model_name_or_path", "teacher_model_revision", "teacher_model_init_kwargs", "beta")


def _cuda_bf16() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@dataclass
class ZeroSiamConfig(DistillationConfig):
    r"""Configuration of [`ZeroSiamTrainer`]: test-time entropy minimisation with the ZeroSiam predictor.

    Every field of [`trl.DistillationConfig`] / [`transformers.TrainingArguments`] is accepted as well (output_dir,
    learning_rate, max_steps, per_device_train_batch_size, gradient_accumulation_steps, max_completion_length,
    temperature, use_vllm, vllm_mode, report_to, push_to_hub, ...). Teacher fields and `beta` are not used.
    """

    trainer_methods = ENTROPY_METHODS  # the methods this config's trainer runs (LabelFreeConfig: the GRPO ones)
    unsupported_fields = UNSUPPORTED_FIELDS

    # ---- model ----
    model: str = field(
        default="embedded:smollm2-135m",
        metadata={"help": "Policy to adapt: a Hub id, a local folder, a .gguf file, or embedded:smollm2-135m."},
    )
    model_revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})
    model_dtype: str = field(
        default="float32",
        metadata={
            "help": "dtype the weights are loaded in: float32, bfloat16 or float16. LoRA and predictor are fp32."
        },
    )
    rollout_dtype: str = field(
        default="auto",
        metadata={
            "help": "Training rollouts with HF generate: bfloat16 = from a bf16 copy of the policy with LoRA merged, "
            "re-synced before each generation (about 2x faster on CPUs with AVX512-BF16/AMX); model = from the "
            "training model itself; auto = bfloat16 on such a CPU when the model is fp32 and vLLM is off, else model."
        },
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention kernel (eager, sdpa, flash_attention_2); None = transformers' pick."},
    )

    # ---- method ----
    method: str = field(
        default="zerosiam",
        metadata={
            "help": "zerosiam (predictor + stop-gradient alignment), tent (plain entropy minimisation), come (the "
            "entropy of a Dirichlet opinion, K = vocabulary size; Zhang et al., ICLR 2025), sar (reliable tokens, "
            "sharpness-aware, model recovery; Niu et al., ICLR 2023), or none (online protocol only: predictions "
            "without adaptation)."
        },
    )
    protocol: str = field(
        default="offline",
        metadata={"help": "offline: epochs over unlabeled prompts with k rollouts each; online: predict-then-adapt."},
    )
    alpha: float = field(
        default=1.0,
        metadata={"help": "Weight of the symmetric KL between online and stop-gradient target branches (paper: 1)."},
    )
    predictor: str = field(
        default="full", metadata={"help": "Predictor form: full (d x d, identity init; the paper) or lora (I + BA)."}
    )
    predictor_rank: int = field(default=32, metadata={"help": "Rank r of the lora predictor (1..hidden size)."})
    predictor_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Predictor learning rate; None = predictor_lr_ratio x learning_rate."},
    )
    predictor_lr_ratio: float = field(
        default=30.0,
        metadata={
            "help": "Predictor lr / LoRA lr when predictor_learning_rate is None. 30: in the stability study "
            "(results/stability/README.md) the AdamW predictor at 30x held longest before a guard rule fired (1 seed: "
            "3x, 10x, SGD 10x/100x, lora and alpha 2 degraded earlier)."
        },
    )
    predictor_weight_decay: float = field(
        default=0.0, metadata={"help": "Weight decay of the predictor's delta (pulls P towards I, not towards 0)."}
    )
    sar_margin: float = field(
        default=0.8,
        metadata={
            "help": "SAR's reliable-entropy threshold E0, in sar_margin_unit: tokens with entropy >= E0 are left out "
            "of the loss. Default: the 0.8-quantile of each batch (the top-entropy fifth dropped; docs/methods.md, "
            "'SAR on LLMs'). The reference's 0.4 x ln V (sar_margin_unit: ln_v) keeps 999 in 1000 of this model's "
            "tokens."
        },
    )
    sar_margin_unit: str = field(
        default="quantile",
        metadata={
            "help": "Unit of sar_margin: quantile (E0 = that quantile of the batch's token entropies, per micro-batch "
            "and process; in (0, 1]), nats (E0 = sar_margin), or ln_v (E0 = sar_margin x ln V, the reference's form)."
        },
    )
    sar_rho: float = field(
        default=0.05,
        metadata={
            "help": "SAR's sharpness-aware radius: a second pass at w + rho g/||g|| (reference: 0.05); 0 = one pass."
        },
    )
    sar_reset_below: float = field(
        default=0.2,
        metadata={
            "help": "SAR's model recovery: reset the adapter to its start when the moving average of the loss falls "
            "below this, in sar_reset_unit (default 0.2 x the stream's first loss; the reference: 0.2 nats); 0 "
            "disables."
        },
    )
    sar_reset_unit: str = field(
        default="initial",
        metadata={
            "help": "Unit of sar_reset_below: initial (a fraction of the stream's first loss) or nats (the "
            "reference's form, which a low-entropy reasoning model crosses at once and this model never)."
        },
    )
    sar_ema_decay: float = field(
        default=0.5,
        metadata={
            "help": "Decay of the loss moving average SAR's model recovery reads. The reference's 0.9 suits its "
            "hundreds of batches; on a 16-update stream it cannot fall below 0.2 x its start even if the loss drops "
            "to 0 at once (0.9^15 = 0.21), so the reset would never fire (docs/methods.md, 'SAR on LLMs')."
        },
    )
    predictor_max_grad_norm: float = field(
        default=1.0,
        metadata={
            "help": "Gradient clipping of the predictor group, separate from max_grad_norm (LoRA): the predictor's "
            "gradient is ~10-20x LoRA's and would otherwise dominate one global clip. 0 disables."
        },
    )
    optimizer: str = field(
        default="adamw", metadata={"help": "adamw, or sgd (with momentum; the paper's vision setting)."}
    )
    predictor_optimizer: str | None = field(
        default=None,
        metadata={
            "help": "Optimizer of the predictor group: adamw, or sgd (with momentum, as the paper's code trains it); "
            "None = the same as optimizer. AdamW by default: with SGD at 10x the predictor barely moves (||P - I|| "
            "< 1) and ZeroSiam collapsed like Tent in the stability study; at 100x it degraded by update 7."
        },
    )
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum (optimizer or predictor_optimizer: sgd)."})
    loss_temperature: float = field(
        default=1.0, metadata={"help": "Temperature of the loss softmax (not the sampling temperature). > 0."}
    )
    token_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Most tokens per loss chunk (chunks are made equal): the loss holds 2 fp32 [chunk, vocab] logit "
            "tiles (Tent 1), whatever the sequence length. None = as many as fit 128 MiB per tile (682 at V = 49152)."
        },
    )
    vocab_chunk_size: int = field(
        default=8192,
        metadata={"help": "Vocabulary slice in which a head that is not fp32 is cast to fp32 inside the loss."},
    )
    num_rollouts: int = field(
        default=1, metadata={"help": "k: rollouts sampled per prompt (offline protocol). Each is trained on."}
    )

    decoding: str = field(
        default="standard",
        metadata={
            "help": "How rollouts (and online predictions) are decoded: standard, or em-inf (EM-INF: a few Adam steps "
            "of each step's raw logits toward lower entropy, before HF's other logits processors, Agarwal et al. "
            "2025; HF generate only, not vLLM)."
        },
    )
    em_inf_learning_rate: float = field(default=0.1, metadata={"help": EM_INF_HELP["learning_rate"]})
    em_inf_steps: int = field(default=5, metadata={"help": EM_INF_HELP["steps"]})
    em_inf_kl_weight: float = field(default=1e-3, metadata={"help": EM_INF_HELP["kl_weight"]})
    em_inf_threshold: float = field(default=0.3, metadata={"help": EM_INF_HELP["threshold"]})

    # ---- online protocol ----
    stream_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Online: problems per stream batch (one prediction each, then the update), split across "
            "processes. None = 8."
        },
    )
    steps_per_batch: int = field(default=1, metadata={"help": "Online: optimisation steps per stream batch."})
    stream_seed: int | None = field(
        default=0, metadata={"help": "Online: seed of the fixed stream order; null keeps the data set's order."}
    )
    benchmarks: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Online: benchmark streams (e.g. math500,aime24) from benchmarks.yaml; each starts from the "
            "base model. None = the `dataset` as one stream."
        },
    )
    benchmarks_file: str | None = field(
        default=None, metadata={"help": "Benchmark definitions (YAML); default: the package's benchmarks.yaml."}
    )
    data_dir: str | None = field(
        default=None, metadata={"help": "Folder with local benchmark JSONL files (no network needed)."}
    )
    compare_methods: list[str] | str | None = field(
        default=None,
        metadata={"help": "Online: run these methods (e.g. none,tent,zerosiam) on the same streams and compare."},
    )
    compare_overrides: dict | str | None = field(
        default=None,
        metadata={
            "help": "Online, with compare_methods: fields set for some methods only, as JSON keyed by method, or rl "
            "(every RL method) / entropy (every other), e.g. "
            '\'{"rl": {"temperature": 1.0, "num_rollouts": 4}}\' (the RL methods need sampled rollouts).'
        },
    )

    # ---- monitors and the collapse guard ----
    guard_rules: list[dict] | str | None = field(
        default=None,
        metadata={
            "help": "Collapse-guard rules (a YAML list in a recipe, JSON on the command line), e.g. [{\"metric\": "
            "\"zerosiam/entropy_target\", \"below\": 0.1, \"for_steps\": 3, \"action\": \"stop\"}]; actions warn, "
            "stop (keep the last healthy adapter), rollback (restore it, lr_factor). null = "
            "monitoring.DEFAULT_GUARD_RULES, [] = off."
        },
    )
    healthy_checkpoints: int = field(
        default=2, metadata={"help": "Healthy checkpoints kept for stop/rollback, whatever save_total_limit deletes."}
    )
    base_nll_every: int = field(
        default=1, metadata={"help": "Frozen base model's NLL of the rollouts (coherence) every N steps; 0 = never."}
    )
    repetition_ngram: int = field(default=4, metadata={"help": "n of the repeated n-gram share monitor."})

    # ---- LoRA ----
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha; None = 2 x lora_r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | str = field(
        default="all-linear",
        metadata={"help": "Backbone modules that get LoRA (all-linear, or a list); never lm_head or embeddings."},
    )

    # ---- data ----
    dataset: str = field(
        default=GENERATED_DATASET,
        metadata={
            "help": "Prompts: a Hub data set id, a local .json/.jsonl/.parquet file, or generated:arithmetic "
            "(the project's own arithmetic word problems)."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub data set configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Split to read."})
    question_field: str = field(default="problem", metadata={"help": "Column holding the question."})
    answer_field: str | None = field(
        default=None,
        metadata={"help": "Column holding the gold answer, for monitor-only accuracy. It never reaches the loss."},
    )
    answer_style: str = field(
        default="plain", metadata={"help": "How to read the gold answer: plain, boxed (MATH solution), gsm8k (####)."}
    )
    id_field: str | None = field(default=None, metadata={"help": "Column with a problem id; None = row index."})
    num_problems: int | None = field(
        default=None, metadata={"help": "Use the first N problems (after a seeded shuffle for generated data)."}
    )
    instruction: str = field(default=DEFAULT_INSTRUCTION, metadata={"help": "Instruction added to every prompt."})
    instruction_placement: str = field(
        default="user", metadata={"help": "user: appended to the question; system: as the system message."}
    )
    max_prompt_length: int | None = field(
        default=512, metadata={"help": "Prompts longer than this many tokens are skipped or truncated (long_prompt)."}
    )
    long_prompt: str = field(default="skip", metadata={"help": "skip or truncate prompts over max_prompt_length."})

    # ---- run ----
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow a non-empty output_dir that holds no resumable run of this recipe."}
    )
    resume: bool = field(
        default=True, metadata={"help": "Resume from the last checkpoint in output_dir when there is one."}
    )
    monitor_every: int = field(default=1, metadata={"help": "Grade the rollouts (monitor accuracy) every N steps."})
    recipe: str | None = field(
        default=None,
        metadata={"help": "The bundled recipe (NAME) or YAML file to start from; recorded in resolved_config.yaml."},
    )

    # ---- run: TRL / HF fields whose defaults differ here ----
    output_dir: str | None = field(default="outputs/zerosiam", metadata={"help": "Where the run is written."})
    learning_rate: float = field(default=1e-4, metadata={"help": "LoRA learning rate."})
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 autocast; None = on when a CUDA GPU with bf16 is present."}
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for activation memory."})
    logging_steps: float = field(default=1, metadata={"help": "Log every N steps."})
    report_to: list[str] | str | None = field(
        default="none", metadata={"help": "Logging backends: none, trackio, wandb, tensorboard (or a list)."}
    )
    save_strategy: str = field(default="steps", metadata={"help": "When to checkpoint (steps, epoch, no)."})
    save_steps: float = field(default=50, metadata={"help": "Checkpoint every N steps."})
    save_total_limit: int | None = field(default=3, metadata={"help": "Checkpoints kept."})
    max_completion_length: int | None = field(default=256, metadata={"help": "Max new tokens per rollout."})
    temperature: float = field(
        default=1.0,
        metadata={
            "help": "Sampling temperature of the rollouts. 0 = greedy, recorded as temperature 1.0 with "
            "generation_kwargs {do_sample: false} (temperature: 0.0 for vLLM): TRL builds its GenerationConfig from "
            "this field, and transformers refuses temperature 0 without sampling."
        },
    )
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Rollouts per device per micro-step."})
    disable_dropout: bool = field(default=True, metadata={"help": "Disable dropout in the policy."})
    max_steps: int = field(
        default=-1, metadata={"help": "Optimisation steps (> 0); -1 = as many as num_train_epochs gives."}
    )
    disable_tqdm: bool | None = field(
        default=False, metadata={"help": "Hide the training progress bar (a short line per logged step instead)."}
    )
    # ---- TRL's names (its scripts' ModelConfig / ScriptArguments) for fields above: either spelling is accepted ----
    model_name_or_path: str | None = field(default=None, metadata={"help": "TRL's name for model (an alias)."})
    dataset_name: str | None = field(default=None, metadata={"help": "TRL's name for dataset (an alias)."})
    dataset_train_split: str | None = field(
        default=None, metadata={"help": "TRL's name for dataset_split (an alias)."}
    )

    def __post_init__(self) -> None:
        self._resolve_aliases()
        self._parse_structured_fields()
        self._validate()
        if self.bf16 is None:
            self.bf16 = _cuda_bf16()
        if self.protocol == "online":
            self._setup_online()
        if self.temperature == 0:
            # greedy decoding (a generation setting; the loss has its own loss_temperature): HF generate takes
            # do_sample=False, vLLM takes temperature 0; TRL's GenerationConfig keeps a valid temperature
            greedy = {"temperature": 0.0} if self.use_vllm else {"do_sample": False}
            self.generation_kwargs = {**(self.generation_kwargs or {}), **greedy}
            self.temperature = 1.0
        try:
            super().__post_init__()
        except (ValueError, TypeError) as err:
            raise UserInputError(first_line(err)) from None

    def _resolve_aliases(self) -> None:
        """TRL's spelling of a field and the project's name the same value; both given and different: refused."""
        fields = config_fields(type(self))
        for alias, name in FIELD_ALIASES.items():
            value = getattr(self, alias, None)
            if value is not None and getattr(self, name) not in (value, fields[name].default):
                raise UserInputError(f"{alias} is TRL's name for {name}: give one of them, not {name}="
                                     f"{getattr(self, name)!r} and {alias}={value!r}")  # fmt: skip
            if value is not None:
                setattr(self, name, value)
            setattr(self, alias, getattr(self, name))  # either spelling reads the value

    def _parse_structured_fields(self) -> None:
        # on the command line, structured fields come as JSON (as TRL's do) and lists as "a,b" or several values
        if isinstance(self.guard_rules, str):
            try:
                self.guard_rules = yaml.safe_load(self.guard_rules)
            except yaml.YAMLError:
                raise UserInputError(f"guard_rules: expected a JSON list of rules, got {self.guard_rules!r}") from None
        if isinstance(self.compare_overrides, str):
            try:
                self.compare_overrides = yaml.safe_load(self.compare_overrides)
            except yaml.YAMLError:
                self.compare_overrides = None
                raise UserInputError("compare_overrides: expected a JSON object of method: {field: value}") from None
        overrides = self.compare_overrides
        if overrides is not None and not (isinstance(overrides, dict) and all(isinstance(v, dict) for v in
                                                                              overrides.values())):  # fmt: skip
            raise UserInputError("compare_overrides: expected a JSON object of method: {field: value}")
        if isinstance(self.lora_target_modules, list):
            names = [n.strip() for item in self.lora_target_modules for n in str(item).split(",") if n.strip()]
            self.lora_target_modules = names[0] if names == ["all-linear"] else names

    def _setup_online(self) -> None:
        if self.gradient_accumulation_steps != 1:
            raise UserInputError("gradient_accumulation_steps must be 1 with protocol: online (one update per batch)")
        if self.max_steps != -1:  # the sampler would go round the stream again, updating on answers already scored
            raise UserInputError(
                f"max_steps must be -1 with protocol: online (one pass over each stream, one update per batch), got "
                f"{self.max_steps}; shorten a stream with num_problems"
            )
        if self.stream_batch_size is None:
            self.stream_batch_size = 8
        # one generation batch = one stream batch, k answers per problem, in the stream's fixed order, split across
        # the processes a launcher started (WORLD_SIZE): each answers ceil(stream_batch_size / processes) problems
        processes = int(os.environ.get("WORLD_SIZE", "1"))
        per_device = math.ceil(self.stream_batch_size / processes) * self.rollouts_per_prompt
        given = self.per_device_train_batch_size
        if given not in (per_device, config_fields(type(self))["per_device_train_batch_size"].default):
            raise UserInputError(
                f"per_device_train_batch_size ({given}) is set by protocol: online: stream_batch_size / processes x "
                f"rollouts per problem = {per_device}; remove it, or change stream_batch_size"
            )
        self.per_device_train_batch_size = per_device
        self.shuffle_dataset = False
        self.num_train_epochs = 1
        for name in ("benchmarks", "compare_methods"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [v.strip() for v in value.split(",") if v.strip()])
        for method in self.compare_methods or []:
            if method not in METHODS:
                raise UserInputError(f"compare_methods: {method!r} is not allowed; allowed: {', '.join(METHODS)}")
        for key in self.compare_overrides or {}:
            if key not in (*METHODS, "rl", "entropy"):
                raise UserInputError(f"compare_overrides: {key!r} is not a method; allowed: rl, entropy, "
                                     f"{', '.join(METHODS)}")  # fmt: skip

    @property
    def greedy(self) -> bool:
        kwargs = self.generation_kwargs if isinstance(self.generation_kwargs, dict) else {}
        return kwargs.get("do_sample") is False or kwargs.get("temperature") == 0.0

    @property
    def uses_predictor(self) -> bool:
        return self.method == "zerosiam"

    @property
    def resolved_predictor_optimizer(self) -> str:
        return self.predictor_optimizer or self.optimizer

    @property
    def resolved_predictor_learning_rate(self) -> float:
        if self.predictor_learning_rate is not None:
            return self.predictor_learning_rate
        return self.predictor_lr_ratio * self.learning_rate

    def _validate(self) -> None:
        for f in dataclasses.fields(self):  # every float field, ours and TrainingArguments' (nan passes `< 0`)
            value = getattr(self, f.name, None)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserInputError(f"{f.name} must be a finite number, got {value}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise UserInputError(f"max_steps must be > 0, or -1 to train num_train_epochs; got {self.max_steps}")
        if self.protocol == "offline" and self.max_steps == -1 and not self.num_train_epochs > 0:
            raise UserInputError(f"num_train_epochs must be > 0 when max_steps is -1, got {self.num_train_epochs}")
        if self.method in METHODS and self.method not in self.trainer_methods:
            other = "LabelFreeConfig (GRPO)" if REGISTRY[self.method].family == "grpo" else "ZeroSiamConfig"
            raise UserInputError(f"method: {self.method!r} is a {other} method; {type(self).__name__} runs "
                                 f"{', '.join(self.trainer_methods)}")  # fmt: skip
        choices = {
            "method": METHODS,
            "predictor": PREDICTOR_FORMS,
            "protocol": PROTOCOLS,
            "optimizer": OPTIMIZERS,
            "predictor_optimizer": (None, *OPTIMIZERS),
            "instruction_placement": INSTRUCTION_PLACEMENTS,
            "long_prompt": LONG_PROMPT_POLICIES,
            "answer_style": GOLD_STYLES,
            "model_dtype": ("float32", "bfloat16", "float16"),
            "rollout_dtype": ROLLOUT_DTYPES,
            "decoding": DECODINGS,
            "sar_margin_unit": MARGIN_UNITS,
            "sar_reset_unit": RESET_UNITS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                allowed_text = ", ".join("null" if a is None else a for a in allowed)
                raise UserInputError(f"{name}: {getattr(self, name)!r} is not allowed; allowed: {allowed_text}")
        positive = ["loss_temperature", "vocab_chunk_size", "lora_r", "monitor_every"]
        positive += ["num_rollouts", "per_device_train_batch_size", "predictor_rank", "predictor_lr_ratio"]
        positive += ["steps_per_batch", "sar_margin"]
        if self.token_chunk_size is not None:
            positive.append("token_chunk_size")
        for name in positive:
            if getattr(self, name) is None or getattr(self, name) <= 0:
                raise UserInputError(f"{name} must be > 0, got {getattr(self, name)}")
        non_negative = ["alpha", "learning_rate", "predictor_weight_decay", "predictor_max_grad_norm", "momentum"]
        non_negative += ["weight_decay", "max_grad_norm", "lora_dropout", "temperature", "sar_rho", "sar_reset_below"]
        for name in non_negative:
            if getattr(self, name) < 0:
                raise UserInputError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.predictor_learning_rate is not None and self.predictor_learning_rate < 0:
            raise UserInputError(f"predictor_learning_rate must be >= 0, got {self.predictor_learning_rate}")
        if self.stream_batch_size is not None and self.stream_batch_size < 1:
            raise UserInputError(f"stream_batch_size must be >= 1, got {self.stream_batch_size}")
        if self.method == "none" and self.protocol != "online":
            raise UserInputError("method: none (no adaptation) exists only with protocol: online")
        if self.compare_methods and self.protocol != "online":
            raise UserInputError("compare_methods needs protocol: online")
        if self.max_completion_length is None or self.max_completion_length <= 0:
            raise UserInputError(f"max_completion_length must be > 0, got {self.max_completion_length}")
        if self.max_prompt_length is not None and self.max_prompt_length <= 0:
            raise UserInputError(f"max_prompt_length must be > 0 or null, got {self.max_prompt_length}")
        if self.num_problems is not None and self.num_problems <= 0:
            raise UserInputError(f"num_problems must be > 0 or null, got {self.num_problems}")
        if self.sar_margin_unit == "quantile" and self.sar_margin > 1:
            raise UserInputError(f"sar_margin must be in (0, 1] with sar_margin_unit: quantile, got {self.sar_margin}")
        if not 0 <= self.sar_ema_decay < 1:
            raise UserInputError(f"sar_ema_decay must be in [0, 1), got {self.sar_ema_decay}")
        if not self.lora_dropout < 1:
            raise UserInputError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        from zerosiam_llm.monitoring import parse_guard_rules

        rules = parse_guard_rules(self.guard_rules)  # refused here, before any work starts
        if any(r.action == "rollback" for r in rules) and (self.deepspeed or self.fsdp):
            raise UserInputError("guard action rollback needs unsharded weights (single GPU or DDP); use warn or stop")
        if self.base_nll_every < 0 or self.healthy_checkpoints < 1 or self.repetition_ngram < 1:
            raise UserInputError("base_nll_every must be >= 0, healthy_checkpoints and repetition_ngram >= 1")
        self.em_inf_settings.check()
        if self.use_vllm and self.decoding == "em-inf":
            raise UserInputError(
                "decoding em-inf needs HF generate: vLLM runs no HF logits processor; set use_vllm: false"
            )
        if self.use_vllm:
            from trl.import_utils import is_vllm_available

            if not is_vllm_available():
                raise UserInputError(
                    "use_vllm: true needs vLLM, which is not installed: pip install 'zerosiam-llm[vllm]' (the vllm "
                    "extra; GPU only), or set use_vllm: false"
                )
        self._refuse_unused_fields()
        defaults = {f.name: f.default for f in dataclasses.fields(DistillationConfig)}
        for name in self.unsupported_fields:
            if getattr(self, name) != defaults.get(name):
                raise UserInputError(f"{name} is a distillation setting and has no meaning here; remove it")

    def _refuse_unused_fields(self) -> None:
        """A method-specific field (``zerosiam_llm.methods``) given a value for a method that does not read it."""
        fields = config_fields(type(self))
        for name in unused_fields(self.method, fields):
            if getattr(self, name) != fields[name].default:
                readers = [m for m, entry in REGISTRY.items() if name in entry.fields]
                raise UserInputError(f"{name} is read by method {' / '.join(readers)} only, not by {self.method}; "
                                     "remove it")  # fmt: skip

    @property
    def em_inf_settings(self) -> EMInfSettings:
        return EMInfSettings.of(self)

    @property
    def rollouts_per_prompt(self) -> int:
        """Rollouts generated per prompt: k, or more where a method votes over more than it trains on."""
        return self.num_rollouts

    def resolved_dict(self) -> dict[str, Any]:
        """Every field's value, for ``resolved_config.yaml`` (tokens never recorded)."""
        names = config_fields(type(self))
        return {k: _plain(v) for k, v in self.to_dict().items()
                if k in names and k not in SECRET_FIELDS and k not in FIELD_ALIASES}  # fmt: skip


SECRET_FIELDS = ("hub_token",)
FIELD_ALIASES = {"model_name_or_path": "model", "dataset_name": "dataset", "dataset_train_split": "dataset_split"}


def _plain(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def config_fields(config_class: type | None = None) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(config_class or ZeroSiamConfig) if f.init}


SELF_CERTAINTY_POSITIONS = ("shifted", "aligned")


@dataclass
class LabelFreeConfig(ZeroSiamConfig, GRPOConfig):
    r"""Configuration of [`LabelFreeTrainer`]: GRPO with a label-free reward, on the same data, protocols, monitors and
    guard as the entropy methods.

    Every field of [`ZeroSiamConfig`] and of [`trl.GRPOConfig`] is accepted (the ZeroSiam-only ones, such as the
    predictor's, are unused). `num_rollouts` is GRPO's group size k (`num_generations`); online, each stream batch is
    one generation batch and `steps_per_batch` is GRPO's `num_iterations`.
    """

    trainer_methods = GRPO_METHODS
    unsupported_fields = tuple(f for f in UNSUPPORTED_FIELDS if f != "beta")  # beta is GRPO's KL coefficient here

    method: str = field(
        default="majority-vote",
        metadata={
            "help": "majority-vote (TTRL: 1 if the answer grades equal to the group's most common answer string), "
            "semantic-vote (EMPO: the share of the group in the answer's cluster, 0 for a group of all-distinct "
            "answers), entropy-reward (RENT / EM-RL: minus the mean token entropy; no_answer_reward without a box), "
            "or self-certainty (Intuitor: the mean KL(uniform || p_t)). Each default is its authors' code "
            "(docs/methods.md)."
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
    num_generations: int | None = field(
        default=None,
        metadata={
            "help": "GRPO's rollouts generated per prompt: TRL's name for num_rollouts (or for num_vote_rollouts "
            "when the vote uses more). Set from them when not given."
        },
    )

    @property
    def rollouts_per_prompt(self) -> int:
        return self.num_vote_rollouts or self.num_rollouts

    def _resolve_num_generations(self) -> None:
        """``num_generations`` (TRL's field: rollouts generated per prompt) given: it must agree with num_rollouts /
        num_vote_rollouts, or it sets num_rollouts when neither was given."""
        given = self.num_generations
        if given is None or given == self.rollouts_per_prompt:
            return
        default_k = config_fields(LabelFreeConfig)["num_rollouts"].default
        if self.num_vote_rollouts is None and self.num_rollouts == default_k:
            self.num_rollouts = given
            return
        raise UserInputError(
            f"num_generations ({given}) is TRL's name for the rollouts generated per prompt, here "
            f"{self.rollouts_per_prompt} (num_rollouts / num_vote_rollouts): give one of them"
        )

    def __post_init__(self) -> None:
        self._resolve_num_generations()
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


# The Parameters section of each config's docstring (TRL's GRPOConfig layout), built from the fields' help so the help
# has one home: (title, the section's first field), in the order the class defines its fields.
PARAMETER_SECTIONS = {
    "ZeroSiamConfig": (
        ("the model", "model"), ("the method", "method"), ("the online protocol", "stream_batch_size"),
        ("the monitors and the collapse guard", "guard_rules"), ("LoRA", "lora_r"), ("the data", "dataset"),
        ("the run", "overwrite_output_dir"), ("TRL / HF fields whose defaults differ", "output_dir"),
        ("TRL's names for the fields above (aliases)", "model_name_or_path"),
    ),
    "LabelFreeConfig": (("the GRPO reward and its group", "method"),),
}


def _describe_default(value: Any) -> str:
    if isinstance(value, enum.Enum):
        value = value.value
    return f"`{value!r}`" if isinstance(value, str) else f"`{value}`"


def parameters_section(config_class: type) -> str:
    """``Parameters:`` grouped as TRL's config docstrings: ``name (`type`, *optional*, defaults to `x`):`` + help."""
    own = list(config_class.__dict__["__annotations__"])
    fields = config_fields(config_class)
    sections = PARAMETER_SECTIONS[config_class.__name__]
    starts = {first: title for title, first in sections}
    lines = ["", "    Parameters:"]
    for name in own:
        if name in starts:
            lines += ["", f"        > Parameters that control {starts[name]}", ""]
        f = fields[name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        lines.append(f"        {name} (`{kind}`, *optional*, defaults to {_describe_default(default)}):")
        text = textwrap.wrap(f.metadata.get("help", ""), 108, break_on_hyphens=False)
        lines += [f"            {line}" for line in text]
    return "\n".join(lines) + "\n"


for _config in (ZeroSiamConfig, LabelFreeConfig):
    _config.__doc__ = (_config.__doc__ or "").rstrip() + "\n" + parameters_section(_config)
