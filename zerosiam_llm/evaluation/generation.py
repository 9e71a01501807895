"""Generation backends for evaluation and the online benchmarks' scoring: HF ``generate`` (CPU/GPU) and vLLM (GPU).

Training rollouts come from TRL (its own HF / vLLM generation and LoRA weight sync); this module serves code that
generates outside a trainer. Both backends take rendered prompts (the exact text from
:func:`zerosiam_llm.prompts.render_prompt`), tokenise them without adding special tokens (the chat template already
holds them), and return, per prompt, ``n`` :class:`Completion` objects that say how many tokens were generated and
whether ``max_new_tokens`` cut the completion short.

Decoding is exactly what :class:`SamplingConfig` says: the model's own ``generation_config`` defaults (top_k,
repetition penalty, temperature) are not applied, so a recorded protocol is the protocol that ran.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from zerosiam_llm.errors import UserInputError, first_line
from zerosiam_llm.modeling import adapter_location, cpu_supports_bf16, load_adapter

logger = logging.getLogger(__name__)


BACKENDS = ("hf", "vllm")
VLLM_INSTALL_HINT = "pip install 'zerosiam-llm[vllm]'"


@dataclass(frozen=True)
class SamplingConfig:
    """How to decode. ``temperature == 0`` is greedy (``top_p`` is then ignored and recorded as 1.0)."""

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise UserInputError(f"n (samples per problem) must be an integer >= 1, got {self.n!r}")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature <= 100:
            raise UserInputError(f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise UserInputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        tokens = self.max_new_tokens
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise UserInputError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.greedy and self.top_p != 1.0:
            object.__setattr__(self, "top_p", 1.0)  # greedy ignores top_p; record what actually ran

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def describe(self) -> str:
        if self.greedy:
            return f"greedy, n={self.n}, max_new_tokens={self.max_new_tokens}"
        return f"T={self.temperature:g}, top_p={self.top_p:g}, n={self.n}, max_new_tokens={self.max_new_tokens}"


@dataclass(frozen=True)
class Completion:
    """One generated completion. ``truncated``: stopped by ``max_new_tokens`` rather than an end-of-turn token."""

    text: str
    num_tokens: int
    truncated: bool


def prompt_seed(seed: int, prompt: str) -> int:
    """A per-prompt seed: the same prompt gets the same samples whatever batch or order it is generated in."""
    return (int(seed) * 1_000_003 + zlib.crc32(prompt.encode("utf-8"))) % (2**31 - 1)


class Generator(ABC):
    """A generation backend. Use as a context manager, or call :meth:`close`."""

    tokenizer: Any

    def generate(
        self, prompts: Sequence[str], sampling: SamplingConfig, progress: bool = False, desc: str = "generating"
    ) -> Iterator[tuple[int, list[Completion]]]:
        """Yield ``(index into prompts, its n completions)`` as chunks finish (not in prompt order), so callers can
        write results as they go. Greedy decoding with ``n > 1`` generates once and repeats the completion (the n
        samples would be identical)."""
        if isinstance(prompts, str):
            raise UserInputError("prompts must be a list of strings, not a single string")
        if not prompts:
            return
        repeat = sampling.n if sampling.greedy else 1
        inner = replace(sampling, n=1) if repeat > 1 else sampling
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(prompts) * sampling.n, desc=desc, unit="sample")
        try:
            for index, completions in self._generate(list(prompts), inner):
                if repeat > 1:
                    completions = completions * repeat
                if bar is not None:
                    bar.update(len(completions))
                yield index, completions
        finally:
            if bar is not None:
                bar.close()

    def generate_all(self, prompts: Sequence[str], sampling: SamplingConfig) -> list[list[Completion]]:
        """All completions, in prompt order."""
        results: list[list[Completion]] = [[] for _ in prompts]
        for index, completions in self.generate(prompts, sampling):
            results[index] = completions
        return results

    @abstractmethod
    def _generate(self, prompts: list[str], sampling: SamplingConfig) -> Iterator[tuple[int, list[Completion]]]:
        """Backend work: ``sampling.n`` completions per prompt."""

    def describe(self) -> dict[str, Any]:
        """What ran, for the run record (backend, dtype, device)."""
        return {}

    def close(self) -> None:  # noqa: B027  (optional hook: most backends have nothing to free)
        """Free the model (no-op by default)."""

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()



def resolve_dtype(dtype: str, device: str) -> str:
    """``auto``: bf16 on GPUs that support it (else fp16) and on CPUs with bf16 instructions; fp32 otherwise."""
    allowed = ("auto", "float32", "bfloat16", "float16")
    if dtype not in allowed:
        raise UserInputError(f"dtype must be one of {', '.join(allowed)}; got {dtype!r}")
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if cpu_supports_bf16() else "float32"


def _resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserInputError(f"device {device} was asked for but no CUDA GPU is available")
    return device


# HF generate
# ---------------------------------------------------------------------------------------------------------------


class HFGenerator(Generator):
    """Batched ``model.generate``: left padding, prompts sorted longest first (less padding per batch, and an
    out-of-memory batch shows up at the start), greedy when ``temperature == 0``.

    ``batch_size`` counts sequences per ``generate`` call (prompts x samples). Sampling is seeded per batch from
    the seed and the batch's first prompt; greedy output does not depend on the seed.
    """

    def __init__(self, model, tokenizer, batch_size: int = 32, decoding: str = "standard", em_inf=None) -> None:
        from zerosiam_llm.decoding import DECODINGS, EMInfSettings

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserInputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if decoding not in DECODINGS:
            raise UserInputError(f"decoding: {decoding!r} is not allowed; allowed: {', '.join(DECODINGS)}")
        self.decoding = decoding
        self.em_inf = em_inf or EMInfSettings()  # EM-INF's hyper-parameters (the reference's defaults)
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        if not eos_ids:
            raise UserInputError("the model and tokenizer define no end-of-sequence token; cannot stop generation")
        self.eos_token_ids = sorted(eos_ids)
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.eos_token_ids[0]
        self._info: dict[str, Any] = {"backend": "hf"}

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        adapter: str | None = None,
        tokenizer=None,
        dtype: str = "auto",
        device: str | None = None,
        batch_size: int = 32,
        trust_remote_code: bool = False,
        revision: str | None = None,
        decoding: str = "standard",
        em_inf=None,
    ) -> HFGenerator:
        """Load a model spec (Hub id, folder, ``.gguf``, ``embedded:...``) plus an optional adapter, merged."""
        from zerosiam_llm.modeling import load_model, load_tokenizer, resolve_model

        source = resolve_model(model)
        device = _resolve_device(device)
        dtype_name = resolve_dtype(dtype, device)
        lm = load_model(source, dtype_name, trust_remote_code, revision)
        if adapter:
            lm = load_adapter(lm, adapter, merge=True)
        lm.to(device).eval()
        tok = tokenizer if tokenizer is not None else load_tokenizer(source, trust_remote_code)
        generator = cls(lm, tok, batch_size, decoding, em_inf)
        generator._info.update(dtype=dtype_name, device=device)
        return generator

    def describe(self) -> dict[str, Any]:
        info = dict(self._info)
        info.setdefault("dtype", str(getattr(self.model, "dtype", "")).replace("torch.", ""))
        info.setdefault("device", str(getattr(self.model, "device", "")))
        info["batch_size"] = self.batch_size
        if self.decoding != "standard":
            info["decoding"] = self.decoding
            info["em_inf"] = dataclasses.asdict(self.em_inf)
        return info

    def _generate(self, prompts: list[str], sampling: SamplingConfig) -> Iterator[tuple[int, list[Completion]]]:
        import torch
        from transformers import GenerationConfig

        tok = self.tokenizer
        lengths = [len(ids) for ids in tok(prompts, add_special_tokens=False)["input_ids"]]
        order = sorted(range(len(prompts)), key=lambda i: (-lengths[i], i))
        per_call = max(1, self.batch_size // sampling.n)
        # Every decoding knob is set explicitly: transformers fills unset (None) fields from the model's own
        # generation_config (e.g. a repetition penalty or top_k=50), which would silently change the protocol.
        config = GenerationConfig(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=not sampling.greedy,
            temperature=1.0 if sampling.greedy else float(sampling.temperature),
            top_p=1.0 if sampling.greedy else float(sampling.top_p),
            top_k=50 if sampling.greedy else 0,  # greedy: unused (50 = the no-warning default); sampling: 0 = off
            repetition_penalty=1.0,
            num_beams=1,
            num_return_sequences=sampling.n,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
        )
        device = next(self.model.parameters()).device
        eos = torch.tensor(self.eos_token_ids, device=device)
        from zerosiam_llm.decoding import em_inf_before_processors

        def decoding_context():
            if self.decoding != "em-inf":
                return contextlib.nullcontext()
            return em_inf_before_processors(self.model, self.em_inf.processor())  # raw logits, before HF's processors
        for start in range(0, len(order), per_call):
            idx = order[start : start + per_call]
            batch = tok(
                [prompts[i] for i in idx],
                add_special_tokens=False,
                padding=True,
                padding_side="left",
                return_tensors="pt",
            ).to(device)
            if not sampling.greedy:
                torch.manual_seed(prompt_seed(sampling.seed, prompts[idx[0]]))
            with torch.inference_mode(), decoding_context():
                out = self.model.generate(**batch, generation_config=config)
            generated = out[:, batch["input_ids"].shape[1] :]
            # Length = tokens before the first end-of-sequence token (finished rows are padded after it).
            is_eos = torch.isin(generated, eos)
            has_eos = is_eos.any(dim=1)
            first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), generated.shape[1])
            for k, i in enumerate(idx):
                completions = []
                for row in range(k * sampling.n, (k + 1) * sampling.n):
                    length = int(first_eos[row])
                    text = tok.decode(generated[row, :length], skip_special_tokens=True)
                    completions.append(Completion(text, length, not bool(has_eos[row])))
                yield i, completions

    def close(self) -> None:
        self.model = None


# ---------------------------------------------------------------------------------------------------------------
# vLLM
# ---------------------------------------------------------------------------------------------------------------


def _import_vllm():
    try:
        import vllm
    except ImportError:
        raise UserInputError(f"the vllm backend needs vLLM on a GPU machine: {VLLM_INSTALL_HINT}") from None
    return vllm


def _lora_rank_limit(rank: int) -> int:
    """vLLM's ``max_lora_rank`` takes a fixed set of sizes: the smallest power of two >= rank, at least 8."""
    limit = 8
    while limit < rank:
        limit *= 2
    return limit


class VLLMGenerator(Generator):
    """vLLM offline generation (``LLM.generate``); an adapter is served through vLLM's LoRA support
    (``enable_lora=True`` + a ``LoRARequest``), not merged. Each prompt gets its own seed (see :func:`prompt_seed`)
    so its samples do not depend on batching. Prompts go to vLLM as token ids, tokenised as the HF backend does."""

    def __init__(
        self,
        model: str,
        adapter: str | None = None,
        tokenizer=None,
        dtype: str = "auto",
        seed: int = 0,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        tensor_parallel_size: int = 1,
        trust_remote_code: bool = False,
        revision: str | None = None,
        chunk_size: int = 512,
    ) -> None:
        vllm = _import_vllm()
        from zerosiam_llm.modeling import load_tokenizer, resolve_model

        source = resolve_model(model)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(source, trust_remote_code)
        self.chunk_size = chunk_size
        model_path = str(Path(source.name_or_path) / source.gguf_file) if source.is_gguf else source.name_or_path
        kwargs: dict[str, Any] = {
            "model": model_path,
            "dtype": dtype,
            "seed": seed,
            "gpu_memory_utilization": gpu_memory_utilization,
            "tensor_parallel_size": tensor_parallel_size,
            "trust_remote_code": trust_remote_code,
        }
        if revision:
            kwargs["revision"] = revision
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        self.lora_request = None
        if adapter:
            from vllm.lora.request import LoRARequest

            path = self._adapter_path(adapter)
            rank = int(json.loads((Path(path) / "adapter_config.json").read_text(encoding="utf-8")).get("r", 16))
            kwargs.update(enable_lora=True, max_lora_rank=_lora_rank_limit(rank), max_loras=1)
            self.lora_request = LoRARequest("adapter", 1, path)
        self.llm = vllm.LLM(**kwargs)
        self._sampling_params = vllm.SamplingParams
        self._info = {"backend": "vllm", "dtype": dtype, "tensor_parallel_size": tensor_parallel_size}

    @staticmethod
    def _adapter_path(adapter: str) -> str:
        """A local folder for ``LoRARequest``: Hub adapters are downloaded first."""
        location, is_local = adapter_location(adapter)
        if is_local:
            return location
        from huggingface_hub import snapshot_download

        try:
            return snapshot_download(location)
        except Exception as err:  # noqa: BLE001  (hub errors come in many types; one line for the user)
            first = first_line(err)
            raise UserInputError(f"cannot download adapter {adapter} from the Hub: {first}") from None

    def describe(self) -> dict[str, Any]:
        return dict(self._info)

    def _generate(self, prompts: list[str], sampling: SamplingConfig) -> Iterator[tuple[int, list[Completion]]]:
        token_ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        for start in range(0, len(prompts), self.chunk_size):
            chunk = range(start, min(start + self.chunk_size, len(prompts)))
            params = [
                self._sampling_params(
                    n=sampling.n,
                    temperature=float(sampling.temperature),
                    top_p=float(sampling.top_p),
                    max_tokens=sampling.max_new_tokens,
                    seed=None if sampling.greedy else prompt_seed(sampling.seed, prompts[i]),
                )
                for i in chunk
            ]
            requests = [{"prompt_token_ids": token_ids[i]} for i in chunk]
            outputs = self.llm.generate(requests, params, lora_request=self.lora_request, use_tqdm=False)
            for i, output in zip(chunk, outputs, strict=True):
                yield i, [Completion(o.text, len(o.token_ids), o.finish_reason == "length") for o in output.outputs]

    def close(self) -> None:
        self.llm = None


def make_generator(
    backend: str,
    model: str,
    adapter: str | None = None,
    tokenizer=None,
    dtype: str = "auto",
    seed: int = 0,
    trust_remote_code: bool = False,
    revision: str | None = None,
    **backend_kwargs: Any,
) -> Generator:
    """A generator for ``backend`` (``hf`` or ``vllm``) over a model spec plus an optional adapter.

    ``backend_kwargs``: ``device`` and ``batch_size`` for hf; ``gpu_memory_utilization``, ``max_model_len``,
    ``tensor_parallel_size`` and ``chunk_size`` for vllm.
    """
    if backend == "hf":
        return HFGenerator.from_pretrained(
            model, adapter, tokenizer, dtype, trust_remote_code=trust_remote_code, revision=revision, **backend_kwargs
        )
    if backend == "vllm":
        return VLLMGenerator(
            model,
            adapter,
            tokenizer,
            dtype,
            seed=seed,
            trust_remote_code=trust_remote_code,
            revision=revision,
            **backend_kwargs,
        )
    raise UserInputError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
