"""The ZeroSiam and Tent objectives, computed from hidden states in chunks.

For every selected position t (by default: positions that predict a generated answer token), with ``W`` the frozen
LM-head weight, ``h`` the final hidden state (the LM head's input) and ``P`` the predictor::

    z_r = W sg(h) / T          target branch, no gradient; answers are generated from it
    z_o = W P(h)  / T          online branch
    l_t = H(p_o) + alpha * [KL(p_r || p_o) + KL(p_o || p_r)]

Tent (EM-FT) is the same loss with ``alpha = 0`` and no predictor (``z_o = z_r`` up to the stop-gradient).

``[tokens, vocab]`` logits are never built for more than one (token chunk x vocab chunk) tile: the forward pass keeps
online-logsumexp statistics per token for both branches, and the backward pass recomputes each tile. Softmax math runs
in fp32 (fp64 if the inputs are fp64) whatever the model dtype.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from zerosiam_llm.errors import UserInputError

DEFAULT_VOCAB_CHUNK = 8192
DEFAULT_TOKEN_CHUNK = 2048


@dataclass
class ObjectiveOutput:
    """The loss and the per-batch statistics the monitors need (all means are over selected tokens)."""

    loss: torch.Tensor  # scalar, differentiable
    num_tokens: int
    entropy_online: float  # mean H(p_o)
    entropy_target: float  # mean H(p_r): the distribution answers are generated from
    kl_target_online: float  # mean KL(p_r || p_o)
    kl_online_target: float  # mean KL(p_o || p_r)
    logit_norm_mean: float  # mean L2 norm of the raw target logits W h (no temperature)
    logit_norm_max: float
    top1_prob_mean: float  # mean max_c p_r(c)
    top1_above_099: float  # share of tokens whose top-1 target probability exceeds 0.99

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """The statistics as a flat dict, e.g. for ``Trainer.log``."""
        names = (
            "entropy_online",
            "entropy_target",
            "kl_target_online",
            "kl_online_target",
            "logit_norm_mean",
            "logit_norm_max",
            "top1_prob_mean",
            "top1_above_099",
        )
        return {f"{prefix}{name}": float(getattr(self, name)) for name in names}


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    # fp32 at least (bf16/fp16 softmax statistics bias the entropy); keep fp64 when a reference test asks for it.
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


class _ChunkedSiameseEntropy(torch.autograd.Function):
    """Per-token H(p_o), KL(p_r||p_o), KL(p_o||p_r) with gradients to ``h_online`` only, plus detached statistics.

    With ``h_target=None`` (Tent) only the online branch is projected: the target distribution is the online one,
    both KL terms are 0 and H(p_r) = H(p_o).
    """

    @staticmethod
    def forward(ctx, h_online, h_target, weight, temperature, vocab_chunk, token_chunk, gather):  # type: ignore[override]
        # `gather` (ZeRO-3) materialises a sharded head weight for the duration of each pass
        ctx.gather = gather
        with gather():
            return _ChunkedSiameseEntropy._forward(
                ctx, h_online, h_target, weight, temperature, vocab_chunk, token_chunk
            )

    @staticmethod
    def _forward(ctx, h_online, h_target, weight, temperature, vocab_chunk, token_chunk):
        dtype = _compute_dtype(h_online, weight)
        n = h_online.shape[0]
        siamese = h_target is not None
        out = torch.zeros(7, n, dtype=dtype, device=h_online.device)
        # rows: 0 H_o, 1 KL(r||o), 2 KL(o||r), 3 H_r, 4 lse_o, 5 lse_r, 6 ||z_r||^2 (raw logits)
        top1 = torch.zeros(n, dtype=dtype, device=h_online.device)
        inv_t = 1.0 / temperature
        # the only [tokens, vocab]-shaped memory: 3 reused tiles (2 for Tent), whatever N is
        rows, cols = min(token_chunk, n), min(vocab_chunk, weight.shape[0])
        tiles = _tiles(3 if siamese else 2, rows, cols, dtype, h_online.device)
        for start in range(0, n, token_chunk):
            sl = slice(start, start + token_chunk)
            ho = h_online[sl].to(dtype)
            ht = h_target[sl].to(dtype) if siamese else ho
            rows = ho.shape[0]
            m_o = torch.full((rows,), -math.inf, dtype=dtype, device=ho.device)
            m_r = m_o.clone()
            zeros = torch.zeros(rows, dtype=dtype, device=ho.device)
            s_o, s_r, ez_o, ez_r, gap_o, gap_r, sq = (zeros.clone() for _ in range(7))
            for w in weight.split(vocab_chunk):
                w = w.to(dtype)
                zo = torch.matmul(ho, w.T, out=tiles[0][:rows, : w.shape[0]]).mul_(inv_t)
                zr = torch.matmul(ht, w.T, out=tiles[1][:rows, : w.shape[0]]).mul_(inv_t) if siamese else zo
                e = tiles[-1][:rows, : w.shape[0]]
                sq += _rowdot(zr, zr)
                # online logsumexp: rescale the running sums whenever the running max grows
                new_m = torch.maximum(m_o, zo.amax(-1))
                scale = torch.exp(m_o - new_m)
                torch.sub(zo, new_m[:, None], out=e).exp_()  # e = exp(z_o - m_o)
                ez_zo = _rowdot(e, zo)
                s_o = s_o * scale + e.sum(-1)
                ez_o = ez_o * scale + ez_zo
                m_o = new_m
                if siamese:
                    gap_o = gap_o * scale + ez_zo - _rowdot(e, zr)  # sum e_o (z_o - z_r)
                    new_m = torch.maximum(m_r, zr.amax(-1))
                    scale = torch.exp(m_r - new_m)
                    torch.sub(zr, new_m[:, None], out=e).exp_()  # e = exp(z_r - m_r)
                    er_zr = _rowdot(e, zr)
                    s_r = s_r * scale + e.sum(-1)
                    ez_r = ez_r * scale + er_zr
                    gap_r = gap_r * scale + er_zr - _rowdot(e, zo)  # sum e_r (z_r - z_o)
                    m_r = new_m
            lse_o = m_o + s_o.log()
            h_o = lse_o - ez_o / s_o
            if siamese:
                lse_r = m_r + s_r.log()
                h_r = lse_r - ez_r / s_r
                kl_ro = gap_r / s_r - lse_r + lse_o  # E_r[z_r - z_o] - lse_r + lse_o
                kl_or = gap_o / s_o - lse_o + lse_r  # E_o[z_o - z_r] - lse_o + lse_r
                m_top = m_r
            else:
                lse_r, h_r, m_top = lse_o, h_o, m_o
                kl_ro = kl_or = torch.zeros_like(h_o)
            out[0, sl], out[1, sl], out[2, sl], out[3, sl] = h_o, kl_ro, kl_or, h_r
            out[4, sl], out[5, sl], out[6, sl] = lse_o, lse_r, sq * temperature**2
            top1[sl] = torch.exp(m_top - lse_r)
        ctx.save_for_backward(h_online, h_target if siamese else None, out[:6].clone())
        ctx.weight = weight  # the (frozen) parameter itself, re-read under `gather` in backward
        ctx.siamese = siamese
        ctx.temperature, ctx.vocab_chunk, ctx.token_chunk = temperature, vocab_chunk, token_chunk
        stats = out[3:].clone()
        ctx.mark_non_differentiable(stats, top1)
        return out[0].clone(), out[1].clone(), out[2].clone(), stats, top1

    @staticmethod
    def backward(ctx, g_h, g_kl_ro, g_kl_or, _g_stats, _g_top1):  # type: ignore[override]
        with ctx.gather():
            return _ChunkedSiameseEntropy._backward(ctx, g_h, g_kl_ro, g_kl_or)

    @staticmethod
    def _backward(ctx, g_h, g_kl_ro, g_kl_or):
        h_online, h_target, saved = ctx.saved_tensors
        weight = ctx.weight
        dtype = _compute_dtype(h_online, weight)
        inv_t = 1.0 / ctx.temperature
        grad = torch.zeros(h_online.shape, dtype=dtype, device=h_online.device)
        zeros = torch.zeros(h_online.shape[0], dtype=dtype, device=h_online.device)
        g_h = zeros if g_h is None else g_h.to(dtype)
        g_kl_ro = zeros if g_kl_ro is None else g_kl_ro.to(dtype)
        g_kl_or = zeros if g_kl_or is None else g_kl_or.to(dtype)
        # with alpha = 0 the KL outputs are unused: skip the target projection entirely
        need_kl = ctx.siamese and bool(g_kl_ro.any() or g_kl_or.any())
        n = h_online.shape[0]
        tiles = _tiles(3 if need_kl else 2, min(ctx.token_chunk, n), min(ctx.vocab_chunk, weight.shape[0]), dtype,
                       h_online.device)  # fmt: skip
        for start in range(0, h_online.shape[0], ctx.token_chunk):
            sl = slice(start, start + ctx.token_chunk)
            ho = h_online[sl].to(dtype)
            ht = h_target[sl].to(dtype) if need_kl else None
            h_o, kl_or, lse_o, lse_r = saved[0, sl, None], saved[2, sl, None], saved[4, sl, None], saved[5, sl, None]
            gh, gro, gor = g_h[sl, None], g_kl_ro[sl, None], g_kl_or[sl, None]
            acc = grad[sl]
            rows = ho.shape[0]
            # per-token coefficients: dL/dz_o = p_o * [(g_or - g_h) log p_o - g_or log p_r + c] - g_ro p_r, with
            # c = g_ro - g_h H_o - g_or KL(o||r)   (dH/dz = -p(log p + H); dKL(o||r)/dz = p_o(log p_o - log p_r
            # - KL); dKL(r||o)/dz = p_o - p_r)
            coef_lpo = gor - gh if need_kl else -gh
            const = gro - gh * h_o - gor * kl_or if need_kl else -gh * h_o
            for w in weight.split(ctx.vocab_chunk):
                w = w.to(dtype)
                cols = w.shape[0]
                lpo = torch.matmul(ho, w.T, out=tiles[0][:rows, :cols]).mul_(inv_t).sub_(lse_o)
                p_o = torch.exp(lpo, out=tiles[-1][:rows, :cols])
                dz = lpo.mul_(coef_lpo).add_(const)
                if need_kl:
                    lpr = torch.matmul(ht, w.T, out=tiles[1][:rows, :cols]).mul_(inv_t).sub_(lse_r)
                    dz.addcmul_(lpr, gor, value=-1.0)
                    dz.mul_(p_o)
                    dz.sub_(lpr.exp_().mul_(gro))  # - g_ro p_r
                else:
                    dz.mul_(p_o)
                acc.addmm_(dz, w)
            grad[sl] = acc * inv_t
        return grad.to(h_online.dtype), None, None, None, None, None, None


def _tiles(count: int, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    return [torch.empty(rows, cols, dtype=dtype, device=device) for _ in range(count)]


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of two [rows, cols] tiles without a third tile-sized temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def gather_noop() -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def siamese_entropy_terms(
    h_online: torch.Tensor,
    h_target: torch.Tensor | None,
    weight: torch.Tensor,
    temperature: float = 1.0,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    token_chunk: int = DEFAULT_TOKEN_CHUNK,
    gather: Callable[[], contextlib.AbstractContextManager] = gather_noop,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token terms over compacted rows ``[N, d]``.

    Returns ``(H_o, KL(r||o), KL(o||r), stats, top1)``: the first three are differentiable w.r.t. ``h_online``;
    ``stats`` is ``[4, N]`` and detached, rows H(p_r), logsumexp of z_o, logsumexp of z_r, squared L2 norm of the raw
    target logits ``W h``; ``top1`` is the target branch's top-1 probability.
    ``h_target`` is detached here: the target branch never receives a gradient.
    """
    if temperature <= 0:
        raise UserInputError(f"loss_temperature must be > 0, got {temperature}")
    if weight.requires_grad:
        raise UserInputError("the LM head must be frozen: its weight requires grad")
    target = h_target.detach() if h_target is not None else None
    return _ChunkedSiameseEntropy.apply(h_online, target, weight, float(temperature), vocab_chunk, token_chunk, gather)


def zerosiam_loss(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    lm_head_weight: torch.Tensor,
    predictor: torch.nn.Module | None,
    alpha: float = 1.0,
    temperature: float = 1.0,
    num_items: float | torch.Tensor | None = None,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    token_chunk: int = DEFAULT_TOKEN_CHUNK,
    gather: Callable[[], contextlib.AbstractContextManager] = gather_noop,
) -> ObjectiveOutput:
    """ZeroSiam (``predictor`` given) or Tent (``predictor=None``, ``alpha`` must then be 0) over ``hidden[mask]``.

    Args:
        hidden: ``[B, L, d]`` final hidden states (the LM head's input); row ``t`` predicts token ``t + 1``.
        mask: ``[B, L]`` bool/int, the positions whose next-token distribution is trained.
        lm_head_weight: ``[V, d]`` frozen LM-head weight.
        predictor: maps ``[N, d]`` hidden states to fp32 ``[N, d]``; ``None`` for Tent.
        alpha: weight of the symmetric-KL alignment term (1 in the paper; 0 = Tent).
        temperature: loss temperature T applied to both branches' logits.
        num_items: the divisor of the summed per-token loss (e.g. the token count of the whole global batch under
            gradient accumulation / DDP); defaults to the number of selected tokens here.
        gather: a context-manager factory that materialises a sharded head weight (DeepSpeed ZeRO-3).
    """
    if alpha < 0:
        raise UserInputError(f"alpha must be >= 0, got {alpha}")
    if predictor is None and alpha != 0:
        raise UserInputError(f"alpha={alpha} needs a predictor; Tent is alpha=0 with predictor=None")
    mask = mask.bool()
    if mask.shape != hidden.shape[:-1]:
        raise UserInputError(f"mask shape {tuple(mask.shape)} does not match hidden states {tuple(hidden.shape[:-1])}")
    if not bool(mask.any()):
        raise UserInputError("the loss mask selects no position: every completion is empty or masked out")
    h = hidden[mask]  # compact first: prompt and padding rows never reach the head
    if predictor is not None:
        h_online = predictor(h)
        h_target = h
    else:
        h_online, h_target = h, None
    h_o, kl_ro, kl_or, stats, top1 = siamese_entropy_terms(
        h_online, h_target, lm_head_weight, temperature, vocab_chunk, token_chunk, gather
    )
    per_token = h_o + alpha * (kl_ro + kl_or) if alpha != 0 else h_o
    n = h.shape[0]
    divisor = n if num_items is None else num_items
    loss = per_token.sum() / divisor
    with torch.no_grad():
        norms = stats[3].clamp_min(0).sqrt()
        return ObjectiveOutput(
            loss=loss,
            num_tokens=n,
            entropy_online=h_o.detach().mean().item(),
            entropy_target=stats[0].mean().item(),
            kl_target_online=kl_ro.detach().mean().item(),
            kl_online_target=kl_or.detach().mean().item(),
            logit_norm_mean=norms.mean().item(),
            logit_norm_max=norms.max().item(),
            top1_prob_mean=top1.mean().item(),
            top1_above_099=(top1 > 0.99).to(torch.float32).mean().item(),
        )


def tent_loss(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    lm_head_weight: torch.Tensor,
    temperature: float = 1.0,
    num_items: float | torch.Tensor | None = None,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    token_chunk: int = DEFAULT_TOKEN_CHUNK,
) -> ObjectiveOutput:
    """Tent / EM-FT: mean token entropy of the model's own distribution (ZeroSiam with alpha=0, no predictor)."""
    return zerosiam_loss(hidden, mask, lm_head_weight, None, 0.0, temperature, num_items, vocab_chunk, token_chunk)


def reference_terms(
    h_online: torch.Tensor, h_target: torch.Tensor, weight: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain full-logits per-token ``(H_o, KL(r||o), KL(o||r), H_r)``: the readable definition (tests, benchmarks).

    Materialises ``[N, V]`` logits; never use it in training.
    """
    z_o = h_online @ weight.T / temperature
    z_r = h_target.detach() @ weight.T / temperature
    log_p_o, log_p_r = z_o.log_softmax(-1), z_r.log_softmax(-1)
    p_o, p_r = log_p_o.exp(), log_p_r.exp()
    h_o = -(p_o * log_p_o).sum(-1)
    h_r = -(p_r * log_p_r).sum(-1)
    kl_ro = (p_r * (log_p_r - log_p_o)).sum(-1)
    kl_or = (p_o * (log_p_o - log_p_r)).sum(-1)
    return h_o, kl_ro, kl_or, h_r
