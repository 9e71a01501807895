"""The ZeroSiam predictor P: a near-identity map applied to final hidden states before the LM head, in the loss only.

Both forms are residual, ``P(h) = h + delta(h)`` with ``delta = 0`` at init, so ``P = I`` exactly at step 0, and are
kept and applied in fp32: ``bf16(1 + 1e-4) == 1``, so a bf16 predictor (or a bf16 output) would erase the small
updates the alignment term depends on.

- ``full`` (the paper): ``delta(h) = D h`` with a d x d matrix ``D`` (``P = I + D``), no bias.
- ``lora`` (low-rank head): ``delta(h) = up(down(h))``, ``down`` r x d (random), ``up`` d x r (zeros): B A h.

The predictor is saved next to (never inside) a peft adapter: ``zerosiam_predictor.safetensors`` +
``zerosiam_predictor.json``, so the published adapter stays a normal peft adapter.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from zerosiam_llm.errors import UserInputError
from zerosiam_llm.files import atomic_path, atomic_write_json

PREDICTOR_FORMS = ("full", "lora")
WEIGHTS_NAME = "zerosiam_predictor.safetensors"
CONFIG_NAME = "zerosiam_predictor.json"
FORMAT_VERSION = 1


class Predictor(nn.Module):
    """Residual fp32 predictor ``h -> h + delta(h)``; returns fp32 whatever the input dtype."""

    def __init__(self, dim: int, form: str = "full", rank: int | None = None, seed: int | None = None) -> None:
        super().__init__()
        if form not in PREDICTOR_FORMS:
            raise UserInputError(f"predictor form {form!r} is unknown; allowed: {', '.join(PREDICTOR_FORMS)}")
        if dim <= 0:
            raise UserInputError(f"predictor dim must be > 0, got {dim}")
        self.dim, self.form = int(dim), form
        if form == "full":
            self.rank = None
            self.delta = nn.Parameter(torch.zeros(dim, dim, dtype=torch.float32))
        else:
            if rank is None or not 0 < int(rank) <= dim:
                raise UserInputError(
                    f"predictor_rank must be in 1..{dim} (the hidden size) for form 'lora', got {rank}"
                )
            self.rank = int(rank)
            gen = torch.Generator().manual_seed(seed) if seed is not None else None
            # A like a LoRA A (kaiming-uniform scale), B = 0 so that P = I at init
            bound = 1.0 / math.sqrt(dim)
            a = torch.empty(self.rank, dim, dtype=torch.float32).uniform_(-bound, bound, generator=gen)
            self.down = nn.Parameter(a)
            self.up = nn.Parameter(torch.zeros(dim, self.rank, dtype=torch.float32))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h32 = h.float() if h.dtype != torch.float64 else h
        if self.form == "full":
            delta = h32 @ self.delta.to(h32.dtype).T
        else:
            delta = (h32 @ self.down.to(h32.dtype).T) @ self.up.to(h32.dtype).T
        return h32 + delta

    @torch.no_grad()
    def deviation(self) -> float:
        """``||P - I||_F``: how far the predictor has moved from the identity."""
        if self.form == "full":
            return self.delta.norm().item()
        return (self.up @ self.down).norm().item()

    @torch.no_grad()
    def reset_(self, seed: int | None = None) -> None:
        """Back to ``P = I`` (the online protocol's per-benchmark reset)."""
        if self.form == "full":
            self.delta.zero_()
        else:
            gen = torch.Generator().manual_seed(seed) if seed is not None else None
            bound = 1.0 / math.sqrt(self.dim)
            self.down.copy_(torch.empty_like(self.down, device="cpu").uniform_(-bound, bound, generator=gen))
            self.up.zero_()

    def config(self) -> dict:
        return {"format_version": FORMAT_VERSION, "form": self.form, "dim": self.dim, "rank": self.rank}

    def extra_repr(self) -> str:
        return f"form={self.form}, dim={self.dim}, rank={self.rank}"


def save_predictor(predictor: Predictor, directory: str | os.PathLike) -> Path:
    """Write ``zerosiam_predictor.safetensors`` + ``zerosiam_predictor.json`` into ``directory`` (atomically)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in predictor.state_dict().items()}
    weights = directory / WEIGHTS_NAME
    with atomic_path(weights) as tmp:
        save_file(tensors, str(tmp), metadata={"form": predictor.form})
    atomic_write_json(directory / CONFIG_NAME, predictor.config())
    return weights


def has_predictor(directory: str | os.PathLike) -> bool:
    return (Path(directory) / WEIGHTS_NAME).is_file() and (Path(directory) / CONFIG_NAME).is_file()


def load_predictor(directory: str | os.PathLike, device: torch.device | str = "cpu") -> Predictor:
    """Load a predictor saved by :func:`save_predictor` (safetensors only, never pickle)."""
    directory = Path(directory)
    weights, config_path = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    if not weights.is_file() or not config_path.is_file():
        raise UserInputError(f"{directory} holds no predictor: expected {WEIGHTS_NAME} and {CONFIG_NAME}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserInputError(f"{config_path} is not valid JSON: {err}") from None
    predictor = Predictor(int(config["dim"]), config["form"], config.get("rank"))
    state = load_file(str(weights))
    missing = set(predictor.state_dict()) - set(state)
    if missing:
        raise UserInputError(f"{weights} lacks tensors {sorted(missing)} for a {config['form']!r} predictor")
    predictor.load_state_dict(state)
    return predictor.to(device)


@torch.no_grad()
def load_predictor_state_(predictor: Predictor, directory: str | os.PathLike) -> None:
    """Load saved weights into an existing predictor in place (keeps its device and optimizer references)."""
    loaded = load_predictor(directory)
    if loaded.config() != predictor.config():
        raise UserInputError(
            f"the predictor in {directory} is {loaded.config()}, but this run uses {predictor.config()}"
        )
    saved = dict(loaded.named_parameters())
    for name, param in predictor.named_parameters():
        param.copy_(saved[name].to(param.device))
