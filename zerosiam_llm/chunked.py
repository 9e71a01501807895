"""The fused chunked kernel behind every loss in ``objectives.py``: per token chunk, both branches are projected
over the whole vocabulary into two reused ``[chunk, vocab]`` tiles (one for Tent), the statistics are reduced and the
gradient ``dl/dz_o`` overwrites the online tile in place, then goes back through the head. The gradient is computed in
the forward pass, so nothing is recomputed: 3 GEMMs per chunk for ZeroSiam, 2 for Tent. Softmax math runs in fp32
(fp64 if the inputs are fp64) whatever the model dtype. ``objectives.zerosiam_loss_reference`` is what it computes,
on full logits; ``tests/test_objectives.py`` holds them equal, values and gradients.
"""

from __future__ import annotations

import contextlib
import enum
import math
from collections.abc import Callable, Iterator

import torch

from zerosiam_llm.errors import UserInputError

DEFAULT_VOCAB_CHUNK = 8192


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
        with gather(), full_fp32_matmuls():
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
def full_fp32_matmuls() -> Iterator[None]:
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
