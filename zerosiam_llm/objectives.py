"""The ZeroSiam and Tent objectives, computed from hidden states in chunks.

For every selected position t (by default: positions that predict a generated answer token), with ``W`` the frozen
LM-head weight, ``h`` the final hidden state (the LM head's input) and ``P`` the predictor::

    z_r = W sg(h) / T          target branch, no gradient; answers are generated from it
    z_o = W P(h)  / T          online branch
    l_t = H(p_o) + alpha * [KL(p_r || p_o) + KL(p_o || p_r)]

Tent (EM-FT) is the same loss with ``alpha = 0`` and no predictor (``z_o = z_r`` up to the stop-gradient). SAR's loss
is Tent over the reliable tokens only (``H(p) < E0``); COME replaces the softmax entropy by a Dirichlet opinion's.

:func:`zerosiam_loss_reference` below is the whole definition on full logits, one line per step with its shape. The
losses the trainers call compute the same values and gradients without ever building ``[tokens, vocab]`` logits for
more than one token chunk at a time: the fused chunked kernel in ``chunked.py`` (tested equal).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from zerosiam_llm.chunked import (
    DEFAULT_VOCAB_CHUNK,
    Stat,
    chunk_rows,
    come_entropy,
    full_fp32_matmuls,
    gather_noop,
    quantile_threshold,
    siamese_entropy,
)
from zerosiam_llm.errors import UserInputError

__all__ = [
    "DEFAULT_VOCAB_CHUNK", "ObjectiveOutput", "SequenceScores", "Stat", "chunk_rows", "come_loss",
    "quantile_threshold", "sar_loss", "sequence_scores", "siamese_entropy", "tent_loss", "zerosiam_loss",
    "zerosiam_loss_reference",
]  # fmt: skip


def zerosiam_loss_reference(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    lm_head_weight: torch.Tensor,
    predictor: Callable[[torch.Tensor], torch.Tensor] | None,
    alpha: float = 1.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The ZeroSiam loss as the paper defines it (Tent: ``predictor=None, alpha=0``). Materialises ``[N, V]``:
    tests and reading only; :func:`zerosiam_loss` computes the same in chunks."""
    h = hidden[mask.bool()]  # [N, d]  final hidden states of the N trained positions
    h_online = h if predictor is None else predictor(h)  # [N, d]  online branch: P(h)
    z_o = h_online @ lm_head_weight.T / temperature  # [N, V]  online logits
    z_r = h.detach() @ lm_head_weight.T / temperature  # [N, V]  target logits: stop-gradient
    log_p_o, log_p_r = z_o.log_softmax(-1), z_r.log_softmax(-1)  # [N, V]
    p_o, p_r = log_p_o.exp(), log_p_r.exp()  # [N, V]
    entropy = -(p_o * log_p_o).sum(-1)  # [N]  H(p_o)
    kl_target_online = (p_r * (log_p_r - log_p_o)).sum(-1)  # [N]  KL(p_r || p_o)
    kl_online_target = (p_o * (log_p_o - log_p_r)).sum(-1)  # [N]  KL(p_o || p_r)
    return (entropy + alpha * (kl_target_online + kl_online_target)).mean()  # []  mean over the N tokens


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
        with full_fp32_matmuls():  # D h is tiny next to h near P = I: bf16-internal / TF32 GEMMs would distort it
            h_online, h_target = predictor(h), h
    else:
        h_online, h_target = h, None
    total, stats = siamese_entropy(
        h_online, h_target, lm_head_weight, (1.0, alpha, alpha), temperature, token_chunk, vocab_chunk, gather
    )
    return _objective_output(total, stats, num_items)


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
