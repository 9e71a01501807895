"""Decoding-time entropy minimisation: EM-INF (Agarwal et al. 2025, "The Unreasonable Effectiveness of Entropy
Minimization in LLM Reasoning"), as a logits processor for HF ``generate``.

Before each token is chosen, the step's logits ``z`` take a few Adam steps on ``H(softmax(z)) + kl_weight *
KL(p_0 || softmax(z))`` (``p_0``: the model's own distribution at that step); a row stops as soon as its entropy is
below ``threshold``. The defaults are the reference code's (``ent_sample``: lr 0.1, 5 steps, KL weight 0.001,
threshold 0.3), applied per row, as the reference does with its batch of one. The gradient is written out (no
autograd), so it runs inside ``torch.inference_mode``:

    dH/dz = -p (log p + H),   dKL(p_0 || p)/dz = p - p_0

vLLM samples in its own engine and runs no HF logits processor: EM-INF needs the HF backend.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

DECODINGS = ("standard", "em-inf")


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
