"""The ZeroSiam and Tent objectives, computed from hidden states in chunks.

For every selected position t (by default: positions that predict a generated answer token), with ``W`` the frozen
LM-head weight, ``h`` the final hidden state (the LM head's input) and ``P`` the predictor::

    z_r = W sg(h) / T          target branch, no gradient; answers are generated from it
    z_o = W P(h)  / T          online branch
    l_t = H(p_o) + alpha * [KL(p_r || p_o) + KL(p_o || p_r)]

Tent (EM-FT) is the same loss with ``alpha = 0`` and no predictor (``z_o = z_r`` up to the stop-gradient). SAR's loss
is Tent over the reliable tokens only (``H(p) < E0``); COME replaces the softmax entropy by a Dirichlet opinion's.

``[tokens, vocab]`` logits are never built for more than one token chunk at a time: per chunk, both branches are
projected over the whole vocabulary into two reused tiles (one for Tent), the statistics are reduced and the gradient
``dl/dz_o`` overwrites the online tile in place, then goes back through the head. The gradient is computed in the
forward pass, so nothing is recomputed: 3 GEMMs per chunk for ZeroSiam, 2 for Tent. Softmax math runs in fp32 (fp64 if
the inputs are fp64) whatever the model dtype.
"""

from __future__ import annotations

import contextlib
import enum
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from zerosiam_llm.errors import UserInputError

DEFAULT_VOCAB_CHUNK = 8192


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
    kept_share: float = 1.0  # share of tokens in the loss (< 1 only under SAR's reliable-entropy filter)
    kept: torch.Tensor | None = None  # [N] bool, the tokens in the loss (SAR's second pass keeps only these)
    kept_loss: float = math.nan  # the summed loss / the kept tokens, before any num_items rescaling (SAR's recovery)
    kept_total: float = 0.0  # the summed loss over the kept tokens (SAR's recovery averages a whole step's)
    entropy_below: float | None = None  # SAR's E0 in nats, when a threshold was set
    opinion_entropy_exact: float | None = None  # COME: the exact mean opinion entropy (the loss carries the ref's eps)

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


class Stat(enum.IntEnum):
    """The rows of the ``[9, N]`` per-token statistics the fused pass returns (detached, one column per token)."""

    ENTROPY_ONLINE = 0  # H(p_o)
    KL_TARGET_ONLINE = 1  # KL(p_r || p_o)
    KL_ONLINE_TARGET = 2  # KL(p_o || p_r)
    ENTROPY_TARGET = 3  # H(p_r)
    LOGIT_SQUARED_NORM = 4  # ||W h||^2 of the raw (untempered) target logits
    TOP1_PROB = 5  # max p_r
    LOGSUMEXP_TARGET = 6  # logsumexp of the tempered target logits (NLL = lse - z_token)
    KEPT = 7  # 1 where the token is in the loss, 0 where a filter (SAR's reliable entropy) left it out
    LOGIT_MEAN = 8  # mean over the vocabulary of the tempered target logits (self-certainty = lse - mean - ln V)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    # fp32 at least (bf16/fp16 softmax statistics bias the entropy); keep fp64 when a reference test asks for it.
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


class _GradientInForward(torch.autograd.Function):
    """A chunked loss whose gradient w.r.t. ``h`` is computed in its forward pass, where the weights are known:
    ``run()`` returns ``(total, stats, grad)``; backward only scales ``grad`` (no logits are recomputed)."""

    @staticmethod
    def forward(ctx, h, run, gather):  # type: ignore[override]
        # `gather` (ZeRO-3) materialises a sharded head weight for the duration of the pass
        with gather(), _full_fp32_matmuls():
            total, stats, grad = run()
        ctx.save_for_backward(grad)
        ctx.input_dtype = h.dtype
        ctx.mark_non_differentiable(stats)
        return total, stats

    @staticmethod
    def backward(ctx, g_total, _g_stats):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return (grad * g_total).to(ctx.input_dtype), None, None


def _check_loss_args(weight: torch.Tensor, temperature: float, token_chunk: int | None, vocab_chunk: int) -> None:
    if temperature <= 0:
        raise UserInputError(f"loss_temperature must be > 0, got {temperature}")
    if weight.requires_grad:
        raise UserInputError("the LM head must be frozen: its weight requires grad")
    if (token_chunk is not None and token_chunk < 1) or vocab_chunk < 1:
        raise UserInputError(f"token_chunk and vocab_chunk must be >= 1, got {token_chunk} and {vocab_chunk}")


def _fused_pass(
    h_online, h_target, weight, weights, temperature, token_chunk, vocab_chunk, want_grad, entropy_below=None,
    keep=None, entropy_quantile=None,
):
    """``sum_t w_h H(p_o) + w_ro KL(p_r||p_o) + w_or KL(p_o||p_r)``, its statistics and gradient w.r.t. ``h_online``.

    With ``entropy_below`` (SAR), only tokens with ``H(p_o) < entropy_below`` (and ``keep``, when given) are summed and
    receive a gradient; the statistics still cover every token. With ``entropy_quantile`` q instead, the threshold is
    the q-quantile of this pass's ``H(p_o)`` (over the ``keep`` tokens), known only after the pass: the gradient rows
    of the tokens it leaves out are zeroed then (each row of ``dl/dh`` is one token's).

    One pass per token chunk: project both branches over the whole vocabulary into two reused ``[chunk, V]`` tiles
    (one for Tent), reduce the statistics and, when a gradient is wanted, overwrite the online tile with ``dl/dz_o``
    row block by row block and multiply it back through the head: three GEMMs per chunk for ZeroSiam, two for Tent.
    """
    dtype = _compute_dtype(h_online, weight)
    device = h_online.device
    n, vocab = h_online.shape[0], weight.shape[0]
    siamese = h_target is not None
    w_h, w_ro, w_or = weights
    if not siamese:
        w_ro = w_or = 0.0  # the divergences are identically 0 without a second branch
    inv_t = 1.0 / temperature
    rows = chunk_rows(n, vocab, dtype, token_chunk)
    # the only [tokens, vocab] memory: 2 tiles (1 for Tent) plus 2 small row-block scratch buffers
    tile_o = torch.empty(rows, vocab, dtype=dtype, device=device)
    tile_r = torch.empty(rows, vocab, dtype=dtype, device=device) if siamese else None
    block = max(1, min(rows, _block_bytes(device) // (vocab * dtype.itemsize)))
    scratch_o = torch.empty(block, vocab, dtype=dtype, device=device)
    scratch_r = torch.empty(block, vocab, dtype=dtype, device=device) if siamese else None
    stats = torch.empty(len(Stat), n, dtype=dtype, device=device)
    stats[Stat.KEPT] = 1.0 if keep is None else keep.to(dtype)
    filtered = entropy_below is not None or keep is not None
    grad = torch.empty(n, h_online.shape[1], dtype=dtype, device=device) if want_grad else None
    for start in range(0, n, rows):
        sl = slice(start, start + rows)
        # the temperature is folded into the [rows, d] inputs: z = (h / T) W^T, no tile-sized op
        z_o = _project(h_online[sl].to(dtype) * inv_t, weight, tile_o, vocab_chunk)
        z_r = _project(h_target[sl].to(dtype) * inv_t, weight, tile_r, vocab_chunk) if siamese else z_o
        for b0 in range(0, z_o.shape[0], block):
            bs = slice(b0, b0 + block)
            a, b = z_o[bs], z_r[bs]
            e_o = scratch_o[: a.shape[0]]
            # unnormalised softmax e = exp(z - max z), kept for the gradient below: one exp per branch and element
            m_o = a.amax(-1, keepdim=True)
            torch.sub(a, m_o, out=e_o).exp_()
            s_o = e_o.sum(-1)
            ez_oo = _rowdot(e_o, a)  # s_o E_o[z_o]
            lse_o = m_o.squeeze(-1) + s_o.log()
            h_o = lse_o - ez_oo / s_o
            if siamese:
                e_r = scratch_r[: a.shape[0]]
                m_r = b.amax(-1, keepdim=True)
                torch.sub(b, m_r, out=e_r).exp_()
                s_r = e_r.sum(-1)
                ez_rr, ez_or, ez_ro = _rowdot(e_r, b), _rowdot(e_o, b), _rowdot(e_r, a)
                lse_r = m_r.squeeze(-1) + s_r.log()
                h_r = lse_r - ez_rr / s_r
                kl_ro = (ez_rr - ez_ro) / s_r - lse_r + lse_o  # E_r[z_r - z_o] - lse_r + lse_o
                kl_or = (ez_oo - ez_or) / s_o - lse_o + lse_r  # E_o[z_o - z_r] - lse_o + lse_r
            else:
                s_r, lse_r, h_r = s_o, lse_o, h_o
                kl_ro = kl_or = torch.zeros_like(h_o)
            rs = slice(start + b0, start + b0 + a.shape[0])
            stats[Stat.ENTROPY_ONLINE, rs], stats[Stat.ENTROPY_TARGET, rs] = h_o, h_r
            stats[Stat.KL_TARGET_ONLINE, rs], stats[Stat.KL_ONLINE_TARGET, rs] = kl_ro, kl_or
            stats[Stat.LOGIT_SQUARED_NORM, rs] = _rowdot(b, b) * temperature**2  # raw logits W h = T z_r
            stats[Stat.TOP1_PROB, rs] = s_r.reciprocal()  # max p_r = exp(m_r - lse_r)
            stats[Stat.LOGSUMEXP_TARGET, rs] = lse_r
            stats[Stat.LOGIT_MEAN, rs] = b.mean(-1)
            if entropy_below is not None:
                stats[Stat.KEPT, rs] *= h_o < entropy_below
            if want_grad:
                # dl/dz_o = p_o [(w_or - w_h) log p_o - w_or log p_r + c] - w_ro p_r,
                # c = w_ro - w_h H_o - w_or KL(o||r)   (dH/dz = -p (log p + H);
                # dKL(o||r)/dz_o = p_o (log p_o - log p_r - KL(o||r)); dKL(r||o)/dz_o = p_o - p_r).
                # With log p = z - lse and p_o = e_o / s_o it is written in place over the z_o rows:
                #   dz = e_o / s_o * [(w_or - w_h) z_o - w_or z_r + k] - (w_ro / s_r) e_r
                coef = w_or - w_h
                k = w_ro - w_h * h_o - w_or * kl_or - coef * lse_o + w_or * lse_r
                if coef == 0 and w_or:  # alpha = 1: the log p_o terms cancel
                    torch.mul(b, -w_or, out=a)
                else:
                    a.mul_(coef)
                    if w_or:
                        a.add_(b, alpha=-w_or)
                a.add_(k[:, None]).mul_(e_o).mul_(s_o.reciprocal()[:, None])
                if w_ro:
                    a.addcmul_(e_r, (-w_ro / s_r)[:, None])
                if filtered:
                    a[stats[Stat.KEPT, rs] == 0] = 0.0  # a left-out token gives no gradient
        if want_grad:
            _back_project(z_o, weight, grad[sl], vocab_chunk)
    if want_grad:
        grad.mul_(inv_t)
    if entropy_quantile is not None:
        threshold = quantile_threshold(stats[Stat.ENTROPY_ONLINE], stats[Stat.KEPT] > 0, entropy_quantile)
        stats[Stat.KEPT] *= stats[Stat.ENTROPY_ONLINE] < threshold
        if want_grad:
            grad[stats[Stat.KEPT] == 0] = 0.0
        filtered = True
    kept = stats[Stat.KEPT] if filtered else 1.0
    total = (w_h * stats[Stat.ENTROPY_ONLINE] * kept).sum()
    if w_ro:
        total = total + w_ro * (stats[Stat.KL_TARGET_ONLINE] * kept).sum()
    if w_or:
        total = total + w_or * (stats[Stat.KL_ONLINE_TARGET] * kept).sum()
    return total, stats, grad


def quantile_threshold(entropy: torch.Tensor, keep: torch.Tensor, q: float) -> float:
    """SAR's per-batch E0 in quantile form: the q-quantile (linear interpolation) of the entropies of the ``keep``
    tokens; tokens strictly below it are reliable, as the reference's ``entropys < margin``. ``inf`` at q = 1 (every
    token kept), ``-inf`` when nothing is left to rank."""
    if q >= 1:
        return math.inf
    values = entropy[keep]
    return float(torch.quantile(values.double(), q)) if values.numel() else -math.inf


_TILE_BYTES = 128 * 2**20  # default logits tile when no token chunk is given
_CPU_BLOCK_BYTES = 2 * 2**20  # row blocks of the elementwise passes stay in cache on CPU
_GPU_BLOCK_BYTES = 32 * 2**20  # on GPU, fewer and larger kernels


@contextlib.contextmanager
def _full_fp32_matmuls() -> Iterator[None]:
    """Full-precision fp32 GEMMs inside the loss, whatever the process asked for elsewhere.

    TF32 (``tf32: true``, ``torch.set_float32_matmul_precision("high")``) or bf16-internal fp32 matmuls keep ~10
    mantissa bits: enough to erase the difference between ``P(h)`` and ``h`` while the predictor is near the identity.
    """
    previous = torch.get_float32_matmul_precision()
    if previous == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def chunk_rows(n: int, vocab: int, dtype: torch.dtype = torch.float32, token_chunk: int | None = None) -> int:
    """Tokens per chunk of the loss over ``n`` tokens: equal chunks (a thin last chunk makes a slow GEMM) of at most
    ``token_chunk`` tokens, or of as many as fit one ``[chunk, vocab]`` tile of ``dtype`` in 128 MiB."""
    most = token_chunk or max(1, _TILE_BYTES // (vocab * dtype.itemsize))
    return -(-n // -(-n // most))


def _block_bytes(device: torch.device) -> int:
    return _CPU_BLOCK_BYTES if device.type == "cpu" else _GPU_BLOCK_BYTES


def _project(h: torch.Tensor, weight: torch.Tensor, tile: torch.Tensor, vocab_chunk: int) -> torch.Tensor:
    """``h W^T`` into the first rows of ``tile``; a head in another dtype is cast one vocabulary slice at a time."""
    out = tile[: h.shape[0]]
    if weight.dtype == h.dtype:
        return torch.matmul(h, weight.T, out=out)
    for start in range(0, weight.shape[0], vocab_chunk):
        w = weight[start : start + vocab_chunk].to(h.dtype)
        out[:, start : start + w.shape[0]] = h @ w.T
    return out


def _back_project(dz: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, vocab_chunk: int) -> None:
    """``out = dz W`` (the gradient w.r.t. the projected hidden states), casting the head slice by slice if needed."""
    if weight.dtype == dz.dtype:
        torch.matmul(dz, weight, out=out)
        return
    out.zero_()
    for start in range(0, weight.shape[0], vocab_chunk):
        w = weight[start : start + vocab_chunk].to(dz.dtype)
        out.addmm_(dz[:, start : start + w.shape[0]], w)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of two row blocks (small: the temporary stays in cache)."""
    return torch.linalg.vecdot(a, b)


def gather_noop() -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def siamese_entropy(
    h_online: torch.Tensor,
    h_target: torch.Tensor | None,
    weight: torch.Tensor,
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
    temperature: float = 1.0,
    token_chunk: int | None = None,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    gather: Callable[[], contextlib.AbstractContextManager] = gather_noop,
    entropy_below: float | None = None,
    keep: torch.Tensor | None = None,
    entropy_quantile: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted sum over rows ``[N, d]`` of ``(H(p_o), KL(p_r||p_o), KL(p_o||p_r))``, and per-token statistics.

    Returns ``(total, stats)``: ``total`` is differentiable w.r.t. ``h_online``; ``stats`` is ``[8, N]`` and detached,
    its rows named by :class:`Stat`: H(p_o), KL(r||o), KL(o||r), H(p_r), squared L2 norm of the raw target logits
    ``W h``, the target branch's top-1 probability, the logsumexp and the mean of its (tempered) logits, and whether
    the token is in the sum. ``h_target`` is detached: the target branch never receives a gradient.
    ``h_target=None`` is Tent: one branch, both divergences 0, H(p_r) = H(p_o). ``entropy_below`` / ``keep`` ([N]
    bool) leave tokens out of the sum (SAR's filter): those with ``H(p_o) >= entropy_below`` or ``keep`` False;
    ``entropy_quantile`` q sets the threshold to the q-quantile of the batch's ``H(p_o)`` (:func:`quantile_threshold`).
    ``token_chunk`` is the most tokens per chunk (the chunks are made equal); ``None``: as many as fit one fp32
    ``[chunk, V]`` tile in 128 MiB.
    """
    _check_loss_args(weight, temperature, token_chunk, vocab_chunk)
    target = h_target.detach() if h_target is not None else None
    want_grad = torch.is_grad_enabled() and h_online.requires_grad
    weights = tuple(float(w) for w in weights)

    margin = None if entropy_below is None else float(entropy_below)
    keep = None if keep is None else keep.to(h_online.device).bool()

    def run():
        return _fused_pass(h_online, target, weight, weights, float(temperature), token_chunk, vocab_chunk, want_grad,
                           margin, keep, entropy_quantile)  # fmt: skip

    return _GradientInForward.apply(h_online, run, gather)


def zerosiam_loss(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    lm_head_weight: torch.Tensor,
    predictor: torch.nn.Module | None,
    alpha: float = 1.0,
    temperature: float = 1.0,
    num_items: float | torch.Tensor | None = None,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    token_chunk: int | None = None,
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
    h = _selected_rows(hidden, mask)
    if predictor is not None:
        with _full_fp32_matmuls():  # D h is tiny next to h near P = I: bf16-internal / TF32 GEMMs would distort it
            h_online, h_target = predictor(h), h
    else:
        h_online, h_target = h, None
    total, stats = siamese_entropy(
        h_online, h_target, lm_head_weight, (1.0, alpha, alpha), temperature, token_chunk, vocab_chunk, gather
    )
    return _objective_output(total, stats, num_items)


def _selected_rows(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.bool()
    if mask.shape != hidden.shape[:-1]:
        raise UserInputError(f"mask shape {tuple(mask.shape)} does not match hidden states {tuple(hidden.shape[:-1])}")
    if not bool(mask.any()):
        raise UserInputError("the loss mask selects no position: every completion is empty or masked out")
    return hidden[mask]  # compact first: prompt and padding rows never reach the head


def _objective_output(
    total: torch.Tensor, stats: torch.Tensor, num_items, mean_over_kept: bool = False
) -> ObjectiveOutput:
    """The mean loss over the selected tokens (or ``num_items``) and the monitors' statistics.

    ``mean_over_kept`` (SAR): the mean over the tokens in the loss, as the reference's ``entropys[filter].mean()``;
    with ``num_items`` (several micro-batches or processes) it is rescaled by this batch's share of the tokens.
    """
    n = stats.shape[1]
    kept = stats[Stat.KEPT] > 0
    n_kept = int(kept.sum())
    summed = total.item()
    if not mean_over_kept:
        loss = total / (n if num_items is None else num_items)
    elif n_kept == 0:
        loss = total * 0.0  # nothing reliable: no update, the graph is still touched (DDP)
    else:
        loss = total / n_kept * (1.0 if num_items is None else n / num_items)
    with torch.no_grad():
        means = stats.mean(-1).tolist()
        norms = stats[Stat.LOGIT_SQUARED_NORM].clamp_min(0).sqrt()
        top1 = stats[Stat.TOP1_PROB]
        return ObjectiveOutput(
            loss=loss,
            num_tokens=n,
            entropy_online=means[Stat.ENTROPY_ONLINE],
            entropy_target=means[Stat.ENTROPY_TARGET],
            kl_target_online=means[Stat.KL_TARGET_ONLINE],
            kl_online_target=means[Stat.KL_ONLINE_TARGET],
            logit_norm_mean=norms.mean().item(),
            logit_norm_max=norms.max().item(),
            top1_prob_mean=top1.mean().item(),
            top1_above_099=(top1 > 0.99).to(torch.float32).mean().item(),
            kept_share=n_kept / n,
            kept=kept,
            kept_loss=summed / n_kept if n_kept else math.nan,
            kept_total=summed,
        )


def tent_loss(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    lm_head_weight: torch.Tensor,
    temperature: float = 1.0,
    num_items: float | torch.Tensor | None = None,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    token_chunk: int | None = None,
) -> ObjectiveOutput:
    """Tent / EM-FT: mean token entropy of the model's own distribution (ZeroSiam with alpha=0, no predictor)."""
    return zerosiam_loss(hidden, mask, lm_head_weight, None, 0.0, temperature, num_items, vocab_chunk, token_chunk)


def sar_loss(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    lm_head_weight: torch.Tensor,
    margin: float = 0.4,
    keep: torch.Tensor | None = None,
    temperature: float = 1.0,
    num_items: float | torch.Tensor | None = None,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    token_chunk: int | None = None,
    gather: Callable[[], contextlib.AbstractContextManager] = gather_noop,
    margin_unit: str = "ln_v",
) -> ObjectiveOutput:
    """SAR's reliable entropy (Niu et al., ICLR 2023): the mean token entropy over the tokens with ``H(p) < E0``, and
    ``keep`` when given (the second, SAM pass keeps only the tokens reliable in the first). ``E0`` by ``margin_unit``:
    ``ln_v`` = ``margin * ln V`` (the reference's form, 0.4 ln 1000 with its 1000 classes), ``nats`` = ``margin``,
    ``quantile`` = the ``margin``-quantile of this batch's token entropies (over ``keep``). ``out.kept`` says which
    tokens were in the loss and ``out.entropy_below`` the E0 used, in nats. Sharpness-aware minimisation and model
    recovery are steps of the trainer (``sar.py``), not of the loss.
    """
    if not margin > 0 or (margin_unit == "quantile" and margin > 1):
        raise UserInputError(f"sar_margin must be > 0 (and <= 1 as a quantile), got {margin}")
    h = _selected_rows(hidden, mask)
    if keep is not None and keep.shape != (h.shape[0],):
        raise UserInputError(f"keep must have one entry per selected token ({h.shape[0]}), got {tuple(keep.shape)}")
    units = {"ln_v": margin * math.log(lm_head_weight.shape[0]), "nats": margin, "quantile": None}
    if margin_unit not in units:
        raise UserInputError(f"sar_margin_unit must be one of {', '.join(units)}, got {margin_unit!r}")
    entropy_below, quantile = units[margin_unit], margin if margin_unit == "quantile" else None
    total, stats = siamese_entropy(h, None, lm_head_weight, (1.0, 0.0, 0.0), temperature, token_chunk, vocab_chunk,
                                   gather, entropy_below, keep, quantile)  # fmt: skip
    out = _objective_output(total, stats, num_items, mean_over_kept=True)
    if quantile is not None:
        ranked = torch.ones_like(out.kept) if keep is None else keep.to(out.kept.device).bool()
        entropy_below = quantile_threshold(stats[Stat.ENTROPY_ONLINE], ranked, quantile)
    out.entropy_below = entropy_below
    return out


@dataclass
class SequenceScores:
    """The rollouts' scores under the policy: per sequence the mean token entropy and self-certainty (the RL
    methods' logit rewards), and the monitors' statistics over all their tokens."""

    entropy: torch.Tensor  # [B] float64, NaN for an empty completion
    self_certainty: torch.Tensor  # [B] float64, mean KL(U || p_t)
    monitors: ObjectiveOutput  # entropy_target, logit norms, top-1 probabilities, ... (loss = the mean entropy)


@torch.no_grad()
def sequence_scores(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    lm_head_weight: torch.Tensor,
    temperature: float = 1.0,
    token_chunk: int | None = None,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    gather: Callable[[], contextlib.AbstractContextManager] = gather_noop,
) -> SequenceScores:
    """Per sequence (row of ``hidden``), the mean over its ``mask`` tokens of the token entropy ``H(p_t)`` and of the
    self-certainty ``KL(U || p_t) = lse(z) - mean(z) - ln V`` (Intuitor), from the same chunked projection as the
    losses, without gradient (the label-free RL rewards), and the collapse monitors' statistics over the tokens."""
    h = _selected_rows(hidden, mask)
    mask = mask.bool()
    _, stats = siamese_entropy(h.detach(), None, lm_head_weight, (1.0, 0.0, 0.0), temperature, token_chunk,
                               vocab_chunk, gather)  # fmt: skip
    monitors = _objective_output(stats[Stat.ENTROPY_TARGET].sum(), stats, None)
    stats = stats.to(torch.float64)
    token_certainty = stats[Stat.LOGSUMEXP_TARGET] - stats[Stat.LOGIT_MEAN] - math.log(lm_head_weight.shape[0])
    counts = mask.sum(-1)
    rows = torch.arange(mask.shape[0], device=hidden.device)[:, None].expand_as(mask)[mask]
    per_sequence = []
    for values in (stats[Stat.ENTROPY_TARGET], token_certainty):
        sums = torch.zeros(mask.shape[0], dtype=torch.float64, device=hidden.device).index_add_(0, rows, values)
        per_sequence.append(torch.where(counts > 0, sums / counts.clamp_min(1), torch.nan))
    return SequenceScores(per_sequence[0], per_sequence[1], monitors)


# --------------------------------------------------------------------------------------------------------------------
# COME (Zhang et al., ICLR 2025): the entropy of a Dirichlet opinion instead of the softmax entropy
# --------------------------------------------------------------------------------------------------------------------


COME_EPSILON = 1e-7  # the reference's: -sum (q + 1e-7) log(q + 1e-7) over the K + 1 opinion masses


def _come_pass(h, weight, num_classes, temperature, token_chunk, vocab_chunk, want_grad):
    """Per token, with z the logits, S = sum exp(z), K = ``num_classes``: beliefs b = exp(z) / (S + K), uncertainty
    u = K / (S + K), and H = -sum b log b - u log u = M - w E_p[z] - u log K, where M = log(S + K), w = 1 - u and p the
    softmax. dH/dz = w p (w E_p[z] + u log K - z). As in the reference code, z enters as z / ||z|| * ||z||.detach():
    the value is unchanged and the gradient loses its component along z (the logit norm is held fixed).

    Returns ``(sum of H_eps, stats, grad, per-token H)``: the summed value is the reference's, with its epsilon
    (``-sum (q + eps) log(q + eps)`` over the K + 1 masses: +0.08 nats at K = 49k, +0.24 at 152k), so logged losses
    compare with published curves; the gradient is the exact form's (the epsilon's is O(eps K))."""
    dtype = _compute_dtype(h, weight)
    device = h.device
    n, vocab = h.shape[0], weight.shape[0]
    inv_t, log_k = 1.0 / temperature, math.log(num_classes)
    rows = chunk_rows(n, vocab, dtype, token_chunk)
    tile = torch.empty(rows, vocab, dtype=dtype, device=device)
    block = max(1, min(rows, _block_bytes(device) // (vocab * dtype.itemsize)))
    scratch = torch.empty(block, vocab, dtype=dtype, device=device)
    masses = torch.empty(block, vocab, dtype=dtype, device=device)  # q + eps, for the reference's value
    stats = torch.zeros(len(Stat), n, dtype=dtype, device=device)  # the softmax statistics, for the monitors
    stats[Stat.KEPT] = 1.0
    opinion = torch.empty(n, dtype=dtype, device=device)
    opinion_eps = torch.empty(n, dtype=dtype, device=device)
    grad = torch.empty(n, h.shape[1], dtype=dtype, device=device) if want_grad else None
    for start in range(0, n, rows):
        sl = slice(start, start + rows)
        z_all = _project(h[sl].to(dtype) * inv_t, weight, tile, vocab_chunk)
        for b0 in range(0, z_all.shape[0], block):
            z = z_all[b0 : b0 + block]
            e = scratch[: z.shape[0]]
            m = z.amax(-1, keepdim=True)
            torch.sub(z, m, out=e).exp_()
            s = e.sum(-1)
            lse = m.squeeze(-1) + s.log()
            ez = _rowdot(e, z) / s  # E_p[z]
            big_m = torch.logaddexp(lse, torch.full_like(lse, log_k))  # log(S + K)
            w, u = (lse - big_m).exp(), (log_k - big_m).exp()
            rs = slice(start + b0, start + b0 + z.shape[0])
            opinion[rs] = big_m - w * ez - u * log_k
            q = masses[: z.shape[0]]  # beliefs b = e exp(m - M), plus eps; then (b + eps) log(b + eps) in place
            torch.mul(e, (m.squeeze(-1) - big_m).exp()[:, None], out=q).add_(COME_EPSILON)
            torch.xlogy(q, q, out=q)
            u_eps = u + COME_EPSILON
            opinion_eps[rs] = -(q.sum(-1) + u_eps * u_eps.log())
            z_sq = _rowdot(z, z)
            stats[Stat.ENTROPY_ONLINE, rs] = stats[Stat.ENTROPY_TARGET, rs] = lse - ez
            stats[Stat.LOGIT_SQUARED_NORM, rs] = z_sq * temperature**2
            stats[Stat.TOP1_PROB, rs] = s.reciprocal()
            stats[Stat.LOGSUMEXP_TARGET, rs] = lse
            stats[Stat.LOGIT_MEAN, rs] = z.mean(-1)
            if want_grad:
                # g = p (a z + c), a = -w, c = w (w E_p[z] + u log K); the norm trick removes g's component along z:
                # dz = g - along z with along = (z . g) / ||z||^2 = (a E_p[z^2] + c E_p[z]) / ||z||^2. Written in
                # place over z with q = a p - along: dz = q (z + c/a) + along c/a, and c/a = -(w E_p[z] + u log K).
                a, c_over_a = -w, -(w * ez + u * log_k)
                ez2 = _rowdot(e, z * z) / s
                along = a * (ez2 + c_over_a * ez) / z_sq.clamp_min(torch.finfo(dtype).tiny)
                e.mul_((1.0 / s)[:, None]).mul_(a[:, None]).sub_(along[:, None])  # q
                z.add_(c_over_a[:, None]).mul_(e).add_((along * c_over_a)[:, None])
        if want_grad:
            _back_project(z_all, weight, grad[sl], vocab_chunk)
    if want_grad:
        grad.mul_(inv_t)
    return opinion_eps.sum(), stats, grad, opinion


def come_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    num_classes: int | None = None,
    temperature: float = 1.0,
    token_chunk: int | None = None,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    gather: Callable[[], contextlib.AbstractContextManager] = gather_noop,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of the per-token opinion entropies, stats, per-token exact entropies)``, one ``[chunk, V]`` tile and two
    GEMMs per chunk, the gradient computed in the forward pass like the siamese loss; ``num_classes`` K defaults to
    the vocabulary size. The sum carries the reference's epsilon (:func:`_come_pass`), its gradient is the exact
    form's; the third value is the exact entropy of each token (detached)."""
    _check_loss_args(weight, temperature, token_chunk, vocab_chunk)
    want_grad = torch.is_grad_enabled() and h.requires_grad
    k = int(num_classes or weight.shape[0])
    exact: list[torch.Tensor] = []

    def run():
        total, stats, grad, opinion = _come_pass(h, weight, k, float(temperature), token_chunk, vocab_chunk, want_grad)
        exact.append(opinion)
        return total, stats, grad

    total, stats = _GradientInForward.apply(h, run, gather)
    return total, stats, exact[0]


def come_loss(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    lm_head_weight: torch.Tensor,
    temperature: float = 1.0,
    num_items: float | torch.Tensor | None = None,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    token_chunk: int | None = None,
    gather: Callable[[], contextlib.AbstractContextManager] = gather_noop,
    num_classes: int | None = None,
) -> ObjectiveOutput:
    """COME: mean per-token entropy of the Dirichlet opinion (:func:`come_entropy`; the loss's value is the
    reference's, with its epsilon, ``out.opinion_entropy_exact`` the exact mean); the statistics are the softmax's,
    as for Tent (one branch: KLs 0, H(p_o) = H(p_r))."""
    h = _selected_rows(hidden, mask)
    total, stats, exact = come_entropy(h, lm_head_weight, num_classes, temperature, token_chunk, vocab_chunk, gather)
    out = _objective_output(total, stats, num_items)
    out.opinion_entropy_exact = exact.mean().item()
    return out


def come_reference(
    h: torch.Tensor, weight: torch.Tensor, num_classes: int | None = None, temperature: float = 1.0, eps: float = 0.0
):
    """The per-token opinion entropy as the COME reference code writes it (BlueWhaleLab/COME @ 409a19b7,
    ``tent_come.py`` L45-52: full logits, the norm held fixed in the backward pass through ``.detach()``, ``eps`` its
    ``+ 1e-7`` on every mass before the log, K = its 1000 classes, here ``num_classes``): tests only."""
    z = h @ weight.T / temperature
    norm = z.norm(p=2, dim=-1, keepdim=True)
    z = z / norm * norm.detach()
    k = num_classes or weight.shape[0]
    evidence = z.exp()
    total = evidence.sum(-1, keepdim=True) + k
    opinion = torch.cat([evidence / total, k / total], dim=-1) + eps
    return -(opinion * opinion.log()).sum(-1)


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
