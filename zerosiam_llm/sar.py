"""SAR's two steps around its loss (Niu et al., ICLR 2023, "Towards Stable Test-Time Adaptation in Dynamic Wild
World"): sharpness-aware minimisation and model recovery. The loss itself, the mean entropy over the reliable tokens,
is ``objectives.sar_loss``.

As the reference code's ``SAM`` optimizer and ``forward_and_adapt_sar``::

    g1 = grad of the reliable entropy at w             (tokens with H < E0)
    e  = rho * g1 / (||g1|| + 1e-12);  w <- w + e      first_step
    g2 = grad at w + e, over the tokens reliable at w and at w + e
    w <- w - e;  optimizer step with g2                 second_step (the reference restores the saved w)
    ema <- 0.9 ema + 0.1 loss2   (the first value as it is)
    ema < 0.2: reset the model and optimizer to the start (ema kept)     model recovery

On LLM vocabularies the reference's thresholds are inert (docs/methods.md, "SAR on LLMs"): E0 = 0.4 ln V is the
entropy of a uniform over ~75 tokens, far above almost every token's, and a loss average of 0.2 nats is either never
reached or reached by a healthy low-entropy model. The trainer offers E0 in nats, as a fraction of ln V (the
reference's form) or as a per-batch quantile, and the reset threshold in nats (the reference's form) or as a fraction
of the stream's first loss.

``ZeroSiamTrainer`` runs the two passes in ``training_step``; the recovery is
``trainers.callbacks.ModelRecoveryCallback``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

MARGIN_UNITS = ("nats", "ln_v", "quantile")
RESET_UNITS = ("nats", "initial")


@torch.no_grad()
def sam_ascend(params: list[torch.nn.Parameter], rho: float) -> list[torch.Tensor] | None:
    """Move each parameter to ``w + rho g / ||g||`` (``g`` its ``.grad``, the norm over all of them) and return copies
    of the weights ``w`` it left, for :func:`sam_return`; ``None`` (nothing moved) when the gradient is zero or not
    finite."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    if not bool(torch.isfinite(norm)) or float(norm) == 0.0:
        return None
    scale = rho / (norm + 1e-12)
    saved = []
    for p in params:
        saved.append(p.detach().clone())
        if p.grad is not None:
            p.add_((p.grad.float() * scale).to(p.dtype))
    return saved


@torch.no_grad()
def sam_return(params: list[torch.nn.Parameter], saved: list[torch.Tensor]) -> None:
    """Undo :func:`sam_ascend`: back to exactly the saved ``w`` (as the reference's ``p.data = old_p``; subtracting
    the step instead drifts by rounding, 5e-3 in bf16), where the optimizer takes its step with the second gradient."""
    for p, w in zip(params, saved, strict=True):
        p.copy_(w)


class RecoveryAverage:
    """The moving average of the loss that triggers SAR's model recovery: ``ema <- decay ema + (1 - decay) loss``
    (the first loss as it is); :meth:`update` says when it fell below the threshold. A non-finite loss (no reliable
    token) leaves it unchanged. The average is kept through a reset, as the reference code does in effect: its
    ``reset()`` sets ``self.ema = None``, then ``forward()`` assigns the returned average back (mr-eggplant/SAR
    ``sar.py`` L49-52), so a reset is followed by more resets until the average climbs back over the threshold.

    ``unit="nats"``: the threshold is ``reset_below`` (the reference: 0.2). ``unit="initial"``: it is ``reset_below``
    times the first loss of the stream (kept across resets, which return to the stream's start weights)."""

    def __init__(self, decay: float = 0.9, reset_below: float = 0.2, unit: str = "nats") -> None:
        if unit not in RESET_UNITS:
            raise ValueError(f"reset unit must be one of {', '.join(RESET_UNITS)}, got {unit!r}")
        self.decay, self.reset_below, self.unit = decay, reset_below, unit
        self.ema: float | None = None
        self.initial: float | None = None
        self.resets = 0

    @property
    def threshold(self) -> float | None:
        """The loss average below which the model resets, in nats (``None`` until the first loss in ``initial``)."""
        if self.unit == "nats":
            return self.reset_below
        return None if self.initial is None else self.reset_below * self.initial

    def update(self, loss: float | None) -> bool:
        if loss is None or not math.isfinite(loss):
            return False
        if self.initial is None:
            self.initial = loss
        self.ema = loss if self.ema is None else self.decay * self.ema + (1 - self.decay) * loss
        if self.reset_below > 0 and self.ema < self.threshold:
            self.resets += 1
            return True
        return False

    def reset(self) -> None:
        self.ema, self.initial, self.resets = None, None, 0

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema, "initial": self.initial, "resets": self.resets}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema, self.initial, self.resets = state.get("ema"), state.get("initial"), int(state.get("resets", 0))


def replay_recovery(losses: list[float], decay: float, reset_below: float, unit: str) -> list[int]:
    """The updates (1-based) at which SAR's model recovery would fire on a logged series of step losses, as if
    training went on along that series (a replay of the rule, not of a SAR run: a real reset changes what follows)."""
    average = RecoveryAverage(decay, reset_below, unit)
    return [i for i, loss in enumerate(losses, 1) if average.update(loss)]
