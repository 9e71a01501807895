"""The training rollout copy: a bf16 copy of the policy with LoRA merged, that TRL's HF generation path samples from
on CPUs with native bf16 (about 2x faster than the fp32 training model), re-synced before each generation.
"""

from __future__ import annotations

import logging

from zerosiam_llm.errors import UserInputError

logger = logging.getLogger(__name__)


class MergedRolloutCopy:
    """A copy of a peft policy in another dtype with its LoRA weights merged, for training rollouts on CPU.

    On CPUs with native bf16 (AVX512-BF16, AMX) a bf16 model generates about twice as fast as the fp32 training model,
    and merged weights cost no LoRA matmuls. :meth:`sync` writes ``W + scale * B A`` of every LoRA layer, cast, into
    the copy: the trainer calls it before each generation (0.06 s for the 135M model), so rollouts always come
    from the current weights. The copy holds no predictor, adapters or optimizer state; only LoRA layers change, the
    rest is frozen and copied once. Greedy tokens can differ from the fp32 model's at near-ties (bf16 rounding), as
    vLLM's bf16 rollouts do on GPU.
    """

    def __init__(self, peft_model, dtype: str = "bfloat16") -> None:
        import copy

        import torch
        from peft.tuners.lora import LoraLayer

        self.dtype = getattr(torch, dtype)
        base = peft_model.get_base_model()
        self.model = copy.deepcopy(base).to(self.dtype).eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        # (LoRA layer of the training model, the plain Linear at the same place in the copy)
        self._pairs = []
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer):
                # in the copy, the LoRA wrapper gives way to its base Linear: merged weights need no adapter
                plain = self.model.get_submodule(name).get_base_layer()
                self.model.set_submodule(name, plain)
                self._pairs.append((module, plain))
        if not self._pairs:
            raise UserInputError("rollout copy: the model has no LoRA layers to merge")

    def sync(self) -> None:
        """Write the current merged weights into the copy (a disabled or already merged adapter adds nothing)."""
        import torch

        with torch.no_grad():
            for lora, linear in self._pairs:
                weight = lora.get_base_layer().weight
                if not lora.merged and not lora.disable_adapters:
                    for adapter in lora.active_adapters:
                        if adapter in lora.lora_A:
                            weight = weight + lora.get_delta_weight(adapter)
                linear.weight.copy_(weight)


# ---------------------------------------------------------------------------------------------------------------
