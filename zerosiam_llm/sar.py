"""SAR's two steps around its loss (Niu et al., ICLR 2023, "Towards Stable Test-Time Adaptation in Dynamic Wild
World"): sharpness-aware minimisation and model recovery. The loss itself, the mean entropy over the reliable tokens,
is ``objectives.sar_loss``.

As the reference code's ``SAM`` optimizer and ``forward_and_adapt_sar``::

    g1 = grad of the reliable entropy at w             (tokens with H < E0)
    e  = rho * g1 / (||g1|| + 1e-12);  w <- w + e      first_step
    g2 = grad at w + e, over the tokens reliable at w and at w + e
    w <- w - e;  optimizer step with g2                 second_step
    ema <- 0.9 ema + 0.1 loss2   (the first value as it is)
    ema < 0.2: reset the model and optimizer to the start, forget ema      model recovery

``ZeroSiamTrainer`` runs the two passes in ``training_step``; the recovery is ``callbacks.ModelRecoveryCallback``.
"""

from __future__ import annotations

import math
from typing import Any

import torch


@torch.no_grad()
def sam_ascend(params: list[torch.nn.Parameter], rho: float) -> list[torch.Tensor] | None:
    """Move each parameter to ``w + rho g / ||g||`` (``g`` its ``.grad``, the norm over all of them) and return the
    steps taken, for :func:`sam_return`; ``None`` (nothing moved) when the gradient is zero or not finite."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    if not bool(torch.isfinite(norm)) or float(norm) == 0.0:
        return None
    scale = rho / (norm + 1e-12)
    steps = []
    for p in params:
        step = torch.zeros_like(p) if p.grad is None else (p.grad.float() * scale).to(p.dtype)
        p.add_(step)
        steps.append(step)
    return steps


@torch.no_grad()
def sam_return(params: list[torch.nn.Parameter], steps: list[torch.Tensor]) -> None:
    """Undo :func:`sam_ascend`: back to ``w``, where the optimizer takes its step with the second gradient."""
    for p, step in zip(params, steps, strict=True):
        p.sub_(step)


class RecoveryAverage:
    """The moving average of the loss that triggers SAR's model recovery: ``ema <- decay ema + (1 - decay) loss``
    (the first loss as it is); :meth:`update` says when it fell below ``reset_below`` (and then forgets it, as the
    reference's ``reset()`` does). A non-finite loss (no reliable token) leaves it unchanged."""

    def __init__(self, decay: float = 0.9, reset_below: float = 0.2) -> None:
        self.decay, self.reset_below = decay, reset_below
        self.ema: float | None = None
        self.resets = 0

    def update(self, loss: float | None) -> bool:
        if loss is None or not math.isfinite(loss):
            return False
        self.ema = loss if self.ema is None else self.decay * self.ema + (1 - self.decay) * loss
        if self.reset_below > 0 and self.ema < self.reset_below:
            self.ema = None
            self.resets += 1
            return True
        return False

    def reset(self) -> None:
        self.ema, self.resets = None, 0

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema, "resets": self.resets}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema, self.resets = state.get("ema"), int(state.get("resets", 0))
