"""Coherence: the frozen base model's per-token NLL of the rollouts (drift without an entropy collapse).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch

from zerosiam_llm.chunked import DEFAULT_VOCAB_CHUNK, Stat, siamese_entropy
from zerosiam_llm.errors import UserInputError

# ---------------------------------------------------------------------------------------------------------------
# Coherence: the frozen base model's NLL of the completions
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _base_model_eval(model):
    """Adapters off (peft) and eval mode (no dropout), restored afterwards."""
    unwrapped = getattr(model, "module", model)  # DDP
    modes = [(m, m.training) for m in unwrapped.modules()]
    adapters_off = unwrapped.disable_adapter() if hasattr(unwrapped, "disable_adapter") else contextlib.nullcontext()
    try:
        unwrapped.eval()
        with adapters_off, torch.no_grad():
            yield unwrapped
    finally:
        for module, training in modes:
            module.training = training


def base_model_nll(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    token_chunk: int | None = None,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    gather: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> float:
    """Mean per-token NLL (nats) of the completions under the frozen base model: a coherence check.

    A peft model is run inside ``disable_adapter()`` (the base weights, whatever LoRA has learnt); the predictor is
    never involved (it only exists inside the loss). A model without adapters is scored as it is. Prompts are left-
    padded ``[B, P]`` and completions right-padded ``[B, C]``, as TRL's rollout batch holds them.

    Memory stays bounded: the backbone gives hidden states (no vocabulary projection), and the logsumexp comes from the
    loss's chunked projection (``objectives.siamese_entropy``, one ``[token_chunk, V]`` fp32 tile at a time).
    ``gather`` materialises a sharded head weight (DeepSpeed ZeRO-3), as in the loss. Returns NaN when no completion
    token is selected.
    """
    from zerosiam_llm.modeling import final_hidden_states, lm_head_weight

    if prompt_ids.shape[1] < 1:
        raise UserInputError("base_model_nll needs at least one prompt token to predict the first completion token")
    mask = completion_mask.bool()
    if not bool(mask.any()):
        return math.nan
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    width = prompt_ids.shape[1]
    with _base_model_eval(model) as base, (gather or contextlib.nullcontext)():
        hidden = final_hidden_states(base, input_ids, attention_mask)
        # position P-1+t predicts completion token t
        hidden = hidden[:, width - 1 : width - 1 + completion_ids.shape[1]][mask.to(hidden.device)]
        weight = lm_head_weight(base)
        if hasattr(weight, "full_tensor"):  # FSDP2 DTensor: gather the head once
            weight = weight.full_tensor()
        hidden = hidden.to(weight.device)
        targets = completion_ids.to(weight.device)[mask.to(weight.device)]
        # the loss's own projection path (target branch only, no gradient work): row 6 is the logsumexp
        with torch.no_grad():
            _, stats = siamese_entropy(hidden, None, weight, (0.0, 0.0, 0.0), 1.0, token_chunk, vocab_chunk)
        dtype = stats.dtype
        # the target token's logit, a bounded slice of head rows at a time
        target_logit = torch.cat([
            (h.to(dtype) * weight[t].to(dtype)).sum(-1)
            for h, t in zip(hidden.split(4096), targets.split(4096), strict=True)
        ])  # fmt: skip
        total = (stats[Stat.LOGSUMEXP_TARGET] - target_logit).double().sum()
    return float(total) / hidden.shape[0]
