"""Tests for zerosiam_llm.evaluation.generation: the HF generate backend, adapter merging, and the vLLM backend's
wiring."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from transformers import GenerationConfig

from zerosiam_llm.errors import UserInputError
from zerosiam_llm.evaluation.generation import (
    Completion,
    HFGenerator,
    SamplingConfig,
    make_generator,
    prompt_seed,
    resolve_dtype,
)
from zerosiam_llm.modeling import cpu_supports_bf16, load_adapter
from zerosiam_llm.prompts import build_messages, render_prompt
from zerosiam_llm.testing import build_tokenizer

QUESTIONS = ["Tom has 3 apples and buys 4 more. How many apples?", "2 * 3", "What is 12 + 30? Think step by step."]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tiny model gains nothing from threads, and on a busy shared CPU the thread barrier made generation
    ~100x slower (measured: 9 s instead of 0.04 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_generator(tiny_model_dir):
    """fp32 so that greedy outputs do not depend on batch composition."""
    return HFGenerator.from_pretrained(str(tiny_model_dir), dtype="float32", device="cpu", batch_size=4)


def prompts_for(tokenizer):
    return [render_prompt(tokenizer, build_messages(q)) for q in QUESTIONS]


def test_sampling_config_validation_and_greedy():
    greedy = SamplingConfig(n=2, temperature=0, top_p=0.5, max_new_tokens=8)
    assert greedy.greedy and greedy.top_p == 1.0  # greedy ignores top_p and records 1.0
    assert "greedy" in greedy.describe()
    assert SamplingConfig(temperature=0.6, top_p=0.95).describe().startswith("T=0.6, top_p=0.95")
    for bad in ({"n": 0}, {"n": 1.5}, {"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"max_new_tokens": 0}):
        with pytest.raises(UserInputError):
            SamplingConfig(**bad)


def test_resolve_dtype():
    assert resolve_dtype("float32", "cpu") == "float32"
    assert resolve_dtype("auto", "cpu") == ("bfloat16" if cpu_supports_bf16() else "float32")
    with pytest.raises(UserInputError, match="auto, float32, bfloat16, float16"):
        resolve_dtype("int8", "cpu")


def test_hf_generator_shapes_lengths_and_determinism(tiny_generator):
    prompts = prompts_for(tiny_generator.tokenizer)
    greedy = SamplingConfig(n=1, max_new_tokens=12)
    out = tiny_generator.generate_all(prompts, greedy)
    assert [len(c) for c in out] == [1, 1, 1]
    for (c,) in out:
        assert 0 <= c.num_tokens <= 12 and c.truncated == (c.num_tokens == 12)
    # batch composition (padding) does not change greedy output; n > 1 greedy repeats the one completion
    one_by_one = HFGenerator(tiny_generator.model, tiny_generator.tokenizer, batch_size=1)
    assert one_by_one.generate_all(prompts, greedy) == out
    repeated = tiny_generator.generate_all(prompts, SamplingConfig(n=3, max_new_tokens=12))
    assert repeated == [c * 3 for c in out]
    # sampling: n completions per prompt, reproducible for a seed
    sampled = SamplingConfig(n=3, temperature=1.0, top_p=0.95, max_new_tokens=12, seed=1)
    first = tiny_generator.generate_all(prompts, sampled)
    assert [len(c) for c in first] == [3, 3, 3]
    assert tiny_generator.generate_all(prompts, sampled) == first
    assert len({c.text for c in first[0]}) > 1  # a random model at T=1 does not repeat itself


def test_generate_yields_indices_and_refuses_a_string(tiny_generator):
    prompts = prompts_for(tiny_generator.tokenizer)
    seen = sorted(i for i, _ in tiny_generator.generate(prompts, SamplingConfig(max_new_tokens=2)))
    assert seen == [0, 1, 2]
    with pytest.raises(UserInputError):
        list(tiny_generator.generate("one prompt", SamplingConfig()))
    assert list(tiny_generator.generate([], SamplingConfig())) == []


class _ScriptedLM(torch.nn.Module):
    """A stand-in for a causal LM whose ``generate`` returns fixed continuations: checks the length, truncation and
    padding bookkeeping exactly. Prompts containing "stop" answer "42" then end-of-turn; others run to the limit."""

    def __init__(self, tokenizer):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer = tokenizer
        self.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id)
        self.configs = []

    def generate(self, input_ids, attention_mask, generation_config):
        self.configs.append(generation_config)
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        limit = generation_config.max_new_tokens
        rows = []
        for ids in input_ids:
            text = self.tokenizer.decode(ids[ids != pad])
            if "stop" in text:
                rows.append(self.tokenizer("42", add_special_tokens=False)["input_ids"] + [eos])
            else:
                rows.append((self.tokenizer(" 7", add_special_tokens=False)["input_ids"] * limit)[:limit])
        width = max(len(r) for r in rows)
        rows = [r + [pad] * (width - len(r)) for r in rows]  # HF pads finished rows (pad == eos here)
        rows = [row for row in rows for _ in range(generation_config.num_return_sequences)]
        prompt = input_ids.repeat_interleave(generation_config.num_return_sequences, dim=0)
        return torch.cat([prompt, torch.tensor(rows)], dim=1)


def test_hf_generator_counts_tokens_until_end_of_turn_and_flags_truncation():
    tokenizer = build_tokenizer()
    lm = _ScriptedLM(tokenizer)
    generator = HFGenerator(lm, tokenizer, batch_size=8)
    prompts = [render_prompt(tokenizer, build_messages(q)) for q in ["please stop", "go on and on"]]
    (stopped,), (running,) = generator.generate_all(prompts, SamplingConfig(max_new_tokens=6))
    answer_len = len(tokenizer("42", add_special_tokens=False)["input_ids"])
    assert stopped == Completion("42", answer_len, truncated=False)
    assert running.truncated and running.num_tokens == 6 and running.text.strip().startswith("7")
    greedy_config = lm.configs[-1]
    assert not greedy_config.do_sample and greedy_config.repetition_penalty == 1.0
    generator.generate_all(prompts, SamplingConfig(n=2, temperature=0.6, top_p=0.9, max_new_tokens=6))
    sampled_config = lm.configs[-1]
    # the protocol is exactly what SamplingConfig says: no top_k=50 or repetition penalty from model defaults
    assert sampled_config.do_sample and sampled_config.top_k == 0 and sampled_config.top_p == 0.9
    assert sampled_config.temperature == 0.6 and sampled_config.num_return_sequences == 2


def test_adapter_is_merged_and_matches_the_unmerged_model(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = HFGenerator.from_pretrained(str(tiny_model_dir), adapter=str(tmp_path / "adapter"), dtype="float32")
    plain = HFGenerator.from_pretrained(str(tiny_model_dir), dtype="float32")
    assert not hasattr(merged.model, "peft_config")  # merged into the weights: plain forward cost
    ids = merged.tokenizer(prompts_for(merged.tokenizer)[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = peft_model(ids).logits
        assert torch.allclose(merged.model(ids).logits, want, atol=1e-4)
        assert not torch.allclose(plain.model(ids).logits, want, atol=1e-3)


def test_adapter_errors(tiny_model_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="no adapter_config.json"):
        load_adapter(None, str(tmp_path / "empty"))
    with pytest.raises(UserInputError, match="does not exist"):
        load_adapter(None, str(tmp_path / "missing" / "adapter"))
    with pytest.raises(UserInputError, match="backend must be one of hf, vllm"):
        make_generator("tgi", str(tiny_model_dir))


def test_vllm_missing_names_the_install_command(monkeypatch, tiny_model_dir):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(UserInputError, match=r"pip install 'zerosiam-llm\[vllm\]'"):
        make_generator("vllm", str(tiny_model_dir))


def test_vllm_generator_wiring(monkeypatch, tiny_model_dir, tmp_path):
    """vLLM is not installed here (no GPU): a stand-in module records what the backend asks of it."""
    calls: dict = {"generate": []}

    class LLM:
        def __init__(self, **kwargs):
            calls["llm"] = kwargs

        def generate(self, requests, params, lora_request=None, use_tqdm=True):
            calls["generate"].append((requests, params, lora_request))
            return [
                types.SimpleNamespace(
                    outputs=[
                        types.SimpleNamespace(
                            text=f"\\boxed{{{k}}}", token_ids=[1] * (k + 1), finish_reason="length" if k else "stop"
                        )
                        for k in range(p.n)
                    ]
                )
                for p in params
            ]

    class SamplingParams:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    class LoRARequest:
        def __init__(self, name, lora_id, path):
            self.args = (name, lora_id, path)

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = LoRARequest
    for name, module in (("vllm", vllm), ("vllm.lora", lora), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, module)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 12}))

    generator = make_generator("vllm", str(tiny_model_dir), adapter=str(adapter), dtype="bfloat16", seed=3,
                               gpu_memory_utilization=0.5, max_model_len=4096)  # fmt: skip
    llm_kwargs = calls["llm"]
    assert llm_kwargs["model"] == str(tiny_model_dir.resolve()) and llm_kwargs["dtype"] == "bfloat16"
    assert llm_kwargs["enable_lora"] and llm_kwargs["max_lora_rank"] == 16 and llm_kwargs["max_model_len"] == 4096
    prompts = prompts_for(generator.tokenizer)
    out = generator.generate_all(prompts, SamplingConfig(n=2, temperature=0.6, top_p=0.95, max_new_tokens=7, seed=3))
    requests, params, lora_request = calls["generate"][-1]
    assert requests[0] == {"prompt_token_ids": generator.tokenizer(prompts[0], add_special_tokens=False).input_ids}
    assert (params[0].n, params[0].temperature, params[0].top_p, params[0].max_tokens) == (2, 0.6, 0.95, 7)
    assert [p.seed for p in params] == [prompt_seed(3, p) for p in prompts]  # per prompt, not per batch
    assert lora_request.args[2] == str(adapter.resolve())
    assert out[0] == [Completion("\\boxed{0}", 1, False), Completion("\\boxed{1}", 2, True)]
    greedy = generator.generate_all(prompts, SamplingConfig(n=3, max_new_tokens=7))
    _, params, _ = calls["generate"][-1]
    assert params[0].n == 1 and params[0].seed is None and params[0].temperature == 0.0
    assert greedy[0] == [Completion("\\boxed{0}", 1, False)] * 3
