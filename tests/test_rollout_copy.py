"""The training rollout copy: a bf16 copy of the policy with LoRA merged, re-synced from the live weights."""

from __future__ import annotations

import torch

from zerosiam_llm.rollout_copy import MergedRolloutCopy


def test_merged_rollout_copy_follows_the_lora_weights(tiny_model_dir):
    """The bf16 copy holds exactly bf16(W + scale B A) after each sync, generates like the fp32 policy (to bf16
    rounding), and never touches the training model."""
    from zerosiam_llm.modeling import apply_lora, load_model, make_lora_config

    model = apply_lora(load_model(str(tiny_model_dir)), make_lora_config(4))
    copy = MergedRolloutCopy(model)
    assert not any("lora_" in n for n, _ in copy.model.named_parameters())
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in copy.model.parameters())
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    ids = torch.tensor([[5, 17, 42, 8, 99, 3]])
    for scale in (0.05, 0.2):  # LoRA B starts at 0; two "updates" later the copy must follow each
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, scale, generator=torch.Generator().manual_seed(int(scale * 100)))
        copy.sync()
        want = (q_proj.base_layer.weight + q_proj.get_delta_weight("default")).bfloat16()
        assert torch.equal(copy.model.model.layers[0].self_attn.q_proj.weight, want)
        with torch.no_grad():
            ref, got = model(ids).logits, copy.model(ids).logits.float()
        assert (got - ref).abs().max() <= 0.05 * ref.abs().max()
    assert q_proj.base_layer.weight.dtype == torch.float32 and q_proj.lora_B["default"].weight.requires_grad
    with model.disable_adapter():  # a disabled adapter adds nothing
        copy.sync()
        assert torch.equal(copy.model.model.layers[0].self_attn.q_proj.weight, q_proj.base_layer.weight.bfloat16())
