"""One optimizer whose parameter groups each choose AdamW or SGD with momentum.

The paper's code trains the predictor with SGD-momentum while the LoRA backbone is usually trained with AdamW. HF
``Trainer`` (checkpoints, schedulers, accelerate's wrapper) expects one ``torch.optim.Optimizer``, so both live in
one: groups marked ``algorithm: sgd`` take the SGD-momentum step, every other group torch's own AdamW step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


class AdamWWithSGDGroups(torch.optim.AdamW):
    """``torch.optim.AdamW`` for every group, except groups with ``algorithm="sgd"``: ``buf = momentum * buf +
    (grad + weight_decay * p)``, ``p -= lr * buf`` (torch's SGD, no dampening, not Nesterov). Schedulers scale
    every group's ``lr`` as usual; the SGD groups keep ``momentum_buffer`` in ``state``, saved and restored with it.
    """

    def __init__(self, params: Iterable[dict[str, Any]], momentum: float = 0.9, **adamw_kwargs: Any) -> None:
        super().__init__(params, **adamw_kwargs)
        for group in self.param_groups:
            group.setdefault("algorithm", "adamw")
            group.setdefault("momentum", momentum)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.param_groups
        self.param_groups = [g for g in groups if g["algorithm"] != "sgd"]
        try:
            super().step()  # torch's AdamW over the AdamW groups only
        finally:
            self.param_groups = groups
        for group in groups:
            if group["algorithm"] != "sgd":
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = grad.clone()
                    state["step"] = torch.zeros((), dtype=torch.float32)  # AdamW's load_state_dict expects it
                else:
                    buf.mul_(group["momentum"]).add_(grad)
                state["step"] += 1
                p.add_(buf, alpha=-group["lr"])
        return loss
