"""Decoding-time entropy minimisation: EM-INF (Agarwal et al. 2025, "The Unreasonable Effectiveness of Entropy
Minimization in LLM Reasoning"), as a logits processor for HF ``generate``.

Before each token is chosen, the step's logits ``z`` take a few Adam steps on ``H(softmax(z)) + kl_weight *
KL(p_0 || softmax(z))`` (``p_0``: the model's own distribution at that step); a row stops as soon as its entropy is
below ``threshold``. The defaults are the reference code's (shivamag125/EM_PT @ 91cda30b, ``eval/utils/
em_inf_utils.py`` L192-195, ``ent_sample``: lr 0.1, 5 steps, KL weight 0.001, threshold 0.3); the authors' own
evaluation script uses KL weight 0.05 and 3 steps (``evaluation_scripts/em_inf_eval.sh`` L18-21). Applied per row,
as the reference does with its batch of one. The gradient is written out (no autograd), so it runs inside
``torch.inference_mode``:

    dH/dz = -p (log p + H),   dKL(p_0 || p)/dz = p - p_0

As in the reference (L285-324), the raw logits are optimised before every HF logits processor (repetition penalty,
temperature, top-k/p): :func:`em_inf_before_processors` rewrites the LM head's output for the step's last position
through a forward hook, for the duration of one ``generate`` call. Not reproduced: the reference's clamp of the
sampling probabilities to >= 1e-9. vLLM samples in its own engine: EM-INF needs HF generate.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

DECODINGS = ("standard", "em-inf")


@dataclass(frozen=True)
class EMInfSettings:
    """EM-INF's four hyper-parameters (the reference code's defaults)."""

    learning_rate: float = 0.1
    steps: int = 5
    kl_weight: float = 1e-3
    threshold: float = 0.3

    def check(self, prefix: str = "em_inf_") -> None:
        from zerosiam_llm.errors import UserInputError

        for name in ("learning_rate", "threshold"):
            if not getattr(self, name) > 0:
                raise UserInputError(f"{prefix}{name} must be > 0, got {getattr(self, name)}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise UserInputError(f"{prefix}steps must be an integer >= 1, got {self.steps!r}")
        if not self.kl_weight >= 0:
            raise UserInputError(f"{prefix}kl_weight must be >= 0, got {self.kl_weight}")

    @classmethod
    def of(cls, config) -> EMInfSettings:
        """The settings a config holds as ``em_inf_learning_rate`` / ``_steps`` / ``_kl_weight`` / ``_threshold``
        (the training config and ``zerosiam-eval``'s arguments both do)."""
        return cls(config.em_inf_learning_rate, config.em_inf_steps, config.em_inf_kl_weight, config.em_inf_threshold)

    def processor(self) -> EMInfLogitsProcessor:
        return EMInfLogitsProcessor(self.learning_rate, self.steps, self.kl_weight, self.threshold)


EM_INF_HELP = {
    "learning_rate": "EM-INF: Adam learning rate of the logits (reference: 0.1).",
    "steps": "EM-INF: most Adam steps per token (reference code: 5; the authors' evaluation script: 3).",
    "kl_weight": "EM-INF: weight of KL(p_0 || p) (reference code: 0.001; the authors' evaluation script: 0.05).",
    "threshold": "EM-INF: a token's logits stop moving once its entropy is below this, in nats (reference: 0.3).",
}


@contextlib.contextmanager
def em_inf_before_processors(model: torch.nn.Module, processor: EMInfLogitsProcessor) -> Iterator[None]:
    """During one ``generate`` call: EM-INF on the raw logits of each step's last position, before any HF logits
    processor, as the reference's ``ent_sample``; a forward hook on the LM head (returns fp32 logits)."""
    head = model.get_output_embeddings()  # peft and HF models both answer it

    def rewrite(module, inputs, logits):
        out = logits.float()
        out[:, -1, :] = processor(None, out[:, -1, :])
        return out

    handle = head.register_forward_hook(rewrite)
    try:
        yield
    finally:
        handle.remove()


class EMInfLogitsProcessor(LogitsProcessor):
    """EM-INF: bounded gradient steps of each step's logits toward lower entropy (see the module docstring)."""

    def __init__(
        self,
        learning_rate: float = 0.1,
        steps: int = 5,
        kl_weight: float = 1e-3,
        threshold: float = 0.3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.learning_rate, self.steps, self.kl_weight, self.threshold = learning_rate, steps, kl_weight, threshold
        self.betas, self.eps = betas, eps

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32  # fp32 at least, as the reference
        z = scores.to(dtype)
        finite = torch.isfinite(z)  # -inf entries (masked tokens) stay masked
        z = torch.where(finite, z, torch.finfo(dtype).min)
        p0 = z.softmax(-1)
        m, v = torch.zeros_like(z), torch.zeros_like(z)
        active = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
        b1, b2 = self.betas
        for step in range(1, self.steps + 1):
            log_p = z.log_softmax(-1)
            p = log_p.exp()
            entropy = -(p * log_p).sum(-1)
            active &= entropy >= self.threshold  # the reference checks before each step
            if not bool(active.any()):
                break
            grad = -p * (log_p + entropy[:, None]) + self.kl_weight * (p - p0)
            m = torch.where(active[:, None], b1 * m + (1 - b1) * grad, m)
            v = torch.where(active[:, None], b2 * v + (1 - b2) * grad * grad, v)
            update = self.learning_rate * (m / (1 - b1**step)) / ((v / (1 - b2**step)).sqrt() + self.eps)
            z = torch.where(active[:, None], z - update, z)
        return torch.where(finite, z, scores.to(dtype)).to(scores.dtype)
