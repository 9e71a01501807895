"""The chunked ZeroSiam / Tent objectives against a plain float64 full-logits reference."""

import math

import pytest
import torch

from zerosiam_llm import chunked
from zerosiam_llm.errors import UserInputError
from zerosiam_llm.objectives import (
    Stat,
    come_entropy,
    come_loss,
    come_reference,
    reference_terms,
    sar_loss,
    siamese_entropy,
    tent_loss,
    zerosiam_loss,
)
from zerosiam_llm.predictor import Predictor

D, V = 24, 101  # V not a multiple of the chunk: the last vocab tile is ragged


def _inputs(seed=0, batch=3, length=7, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, D, generator=g, dtype=dtype) * 2
    weight = torch.randn(V, D, generator=g, dtype=dtype)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[0, 2:6] = True  # a padded row
    mask[1, :] = True
    mask[2, 4:5] = True
    return hidden, weight, mask


def _random_predictor(form, seed=1, dtype=torch.float32):
    p = Predictor(D, form, rank=5 if form == "lora" else None, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in p.parameters():
            param.copy_(torch.randn(param.shape, generator=g) * 0.2)
    return p.to(dtype)


def _reference_loss(hidden, mask, weight, predictor, alpha, temperature):
    h = hidden[mask]
    h_o = predictor(h) if predictor is not None else h
    H_o, kl_ro, kl_or, H_r = reference_terms(h_o, h, weight, temperature)
    return (H_o + alpha * (kl_ro + kl_or)).mean(), (H_o, kl_ro, kl_or, H_r)


@pytest.mark.parametrize("form", ["full", "lora"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("block_rows", [2, None])
def test_matches_float64_full_logits_reference(form, dtype, block_rows, monkeypatch):
    """Loss and gradients w.r.t. hidden states and predictor match full logits in float64 (rel 1e-5)."""
    if block_rows:  # several (ragged) row blocks per token chunk, as with a real vocabulary
        monkeypatch.setattr(chunked, "_CPU_BLOCK_BYTES", block_rows * V * dtype.itemsize)
    hidden, weight, mask = _inputs(dtype=dtype)
    temperature, alpha = 0.7, 1.0
    pred = _random_predictor(form, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    h = hidden.clone().requires_grad_(True)
    out = zerosiam_loss(h, mask, weight, pred, alpha, temperature, token_chunk=5)
    out.loss.backward()
    grads = [h.grad.clone()] + [p.grad.clone() for p in pred.parameters()]

    pred64 = _random_predictor(form).double()
    h64 = hidden.detach().double().requires_grad_(True)
    ref, (H_o, kl_ro, kl_or, H_r) = _reference_loss(h64, mask, weight.double(), pred64, alpha, temperature)
    ref.backward()
    ref_grads = [h64.grad] + [p.grad for p in pred64.parameters()]

    torch.testing.assert_close(out.loss.double(), ref.detach(), rtol=1e-5, atol=0)
    for got, want in zip(grads, ref_grads, strict=True):
        scale = want.abs().max()
        assert (got.double() - want).abs().max() <= 1e-5 * scale
    assert out.entropy_target == pytest.approx(H_r.mean().item(), rel=1e-5)
    assert out.kl_target_online == pytest.approx(kl_ro.mean().item(), rel=1e-5)
    assert out.kl_online_target == pytest.approx(kl_or.mean().item(), rel=1e-5)
    assert out.kl_target_online > 0 and out.num_tokens == int(mask.sum())


@pytest.mark.parametrize("token_chunk", [4, None])
def test_per_token_terms_and_each_term_gradient_match_reference(token_chunk):
    """Every statistic, and the gradient of any weighting of the three terms (each term alone included)."""
    hidden, weight, mask = _inputs(seed=3, dtype=torch.float64)
    h = hidden[mask][:11]  # with token_chunk 4: chunks of 4, 4, 3 (equal chunks, the last one ragged)
    h_o = (h + 0.3 * torch.randn_like(h)).requires_grad_(True)
    ref = reference_terms(h_o, h, weight, 1.3)
    for weights in [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.3, -1.1, 2.0), (1.0, 1.0, 1.0)]:
        h_o.grad = None
        total, stats = siamese_entropy(h_o, h, weight, weights, 1.3, token_chunk=token_chunk)
        rows = (Stat.ENTROPY_ONLINE, Stat.KL_TARGET_ONLINE, Stat.KL_ONLINE_TARGET, Stat.ENTROPY_TARGET)
        for got, want in zip((stats[row] for row in rows), ref, strict=True):
            torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-12)
        want_total = sum(w * term.sum() for w, term in zip(weights, ref[:3], strict=True))
        torch.testing.assert_close(total, want_total.detach(), rtol=1e-10, atol=1e-12)
        total.backward()
        g_fused = h_o.grad.clone()
        h_o.grad = None
        want_total.backward(retain_graph=True)
        torch.testing.assert_close(g_fused, h_o.grad, rtol=1e-9, atol=1e-12)
    z = h @ weight.T
    torch.testing.assert_close(stats[Stat.LOGIT_SQUARED_NORM], z.pow(2).sum(-1), rtol=1e-10, atol=0)
    torch.testing.assert_close(stats[Stat.TOP1_PROB], (z / 1.3).softmax(-1).amax(-1), rtol=1e-10, atol=0)


def test_gradcheck_fused_function():
    hidden, weight, mask = _inputs(seed=5, dtype=torch.float64)
    h = hidden[mask][:4]
    h_o = (h + 0.1).requires_grad_(True)

    def f(x):
        return siamese_entropy(x, h, weight, (1.0, 0.5, 2.0), 0.9, token_chunk=3)[0]

    assert torch.autograd.gradcheck(f, (h_o,), eps=1e-6, atol=1e-6)


def test_reduced_precision_fp32_matmuls_are_not_used_inside_the_loss():
    """A process that allows TF32 / bf16-internal fp32 GEMMs still gets full fp32 logits in the loss (a near-identity
    predictor's z_o - z_r would otherwise be rounded away), and its setting is restored afterwards."""
    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(2, 32, 256, generator=g)  # large enough for the CPU's bf16-internal GEMM path
    weight = torch.randn(4096, 256, generator=g) * 0.1
    mask = torch.ones(2, 32, dtype=torch.bool)
    pred = Predictor(256, "full")
    with torch.no_grad():
        pred.delta.normal_(0, 1e-4, generator=g)  # near the identity, as after a few steps
    exact = zerosiam_loss(hidden, mask, weight, pred)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        lowered = zerosiam_loss(hidden, mask, weight, pred)
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(previous)
    assert lowered.loss.item() == exact.loss.item()
    assert lowered.kl_target_online == exact.kl_target_online


def test_no_gradient_work_without_grad_and_upstream_scale_applies():
    hidden, weight, mask = _inputs(seed=6, dtype=torch.float64)
    h = hidden[mask]
    h_o = (h + 0.2).requires_grad_(True)
    with torch.no_grad():
        total, _ = siamese_entropy(h_o, h, weight)
    assert not total.requires_grad
    total, _ = siamese_entropy(h_o, h, weight)
    (3.5 * total).backward()
    g = h_o.grad.clone()
    h_o.grad = None
    siamese_entropy(h_o, h, weight)[0].backward()
    torch.testing.assert_close(g, 3.5 * h_o.grad)


@pytest.mark.parametrize("form", ["full", "lora"])
def test_identity_at_init_alignment_zero_and_gradient_equals_tent(form):
    hidden, weight, mask = _inputs(seed=7)
    pred = Predictor(D, form, rank=4, seed=0)
    h1 = hidden.clone().requires_grad_(True)
    zs = zerosiam_loss(h1, mask, weight, pred, alpha=1.0, token_chunk=4)
    zs.loss.backward()
    h2 = hidden.clone().requires_grad_(True)
    tent = tent_loss(h2, mask, weight, token_chunk=4)
    tent.loss.backward()
    assert torch.equal(pred(hidden[mask]), hidden[mask].float())  # z_o == z_r exactly
    assert zs.kl_target_online == 0.0 and zs.kl_online_target == 0.0
    assert zs.loss.item() == pytest.approx(tent.loss.item(), abs=1e-6)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-6, atol=1e-7)
    assert zs.entropy_online == pytest.approx(zs.entropy_target, abs=1e-6)


def test_stop_gradient_target_branch_gets_nothing():
    """The gradient through h equals the gradient of the online branch alone (target branch detached)."""
    hidden, weight, mask = _inputs(seed=11, dtype=torch.float64)
    pred = _random_predictor("full").double()
    h = hidden.clone().requires_grad_(True)
    zerosiam_loss(h, mask, weight, pred, 1.0, 0.8).loss.backward()
    # reference: the target branch built from a constant copy, so only the online path can carry gradient
    h_ref = hidden.clone().requires_grad_(True)
    const = hidden.detach()[mask]
    H_o, kl_ro, kl_or, _ = reference_terms(pred(h_ref[mask]), const, weight, 0.8)
    (H_o + kl_ro + kl_or).mean().backward()
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-9, atol=1e-12)
    # and it differs from a (wrong) version where the target branch also carries gradient
    h_bad = hidden.clone().requires_grad_(True)
    z_o = pred(h_bad[mask]) @ weight.T / 0.8
    z_r = h_bad[mask] @ weight.T / 0.8
    lo, lr = z_o.log_softmax(-1), z_r.log_softmax(-1)
    bad = (-(lo.exp() * lo).sum(-1) + (lr.exp() * (lr - lo)).sum(-1) + (lo.exp() * (lo - lr)).sum(-1)).mean()
    bad.backward()
    assert not torch.allclose(h.grad, h_bad.grad)


def test_head_must_be_frozen_and_positions_outside_mask_get_zero():
    hidden, weight, mask = _inputs(seed=2)
    with pytest.raises(UserInputError, match="LM head must be frozen"):
        zerosiam_loss(hidden, mask, weight.clone().requires_grad_(True), _random_predictor("lora"))
    h = hidden.clone().requires_grad_(True)
    zerosiam_loss(h, mask, weight, _random_predictor("lora")).loss.backward()
    assert torch.all(h.grad[~mask] == 0) and torch.any(h.grad[mask] != 0)


def test_statistics_match_reference():
    hidden, weight, mask = _inputs(seed=4, dtype=torch.float64)
    out = tent_loss(hidden, mask, weight, temperature=2.0, token_chunk=3)
    z = hidden[mask] @ weight.T
    assert out.logit_norm_mean == pytest.approx(z.norm(dim=-1).mean().item(), rel=1e-9)
    assert out.logit_norm_max == pytest.approx(z.norm(dim=-1).max().item(), rel=1e-9)
    p = (z / 2.0).softmax(-1)
    assert out.top1_prob_mean == pytest.approx(p.max(-1).values.mean().item(), rel=1e-9)
    assert out.top1_above_099 == pytest.approx((p.max(-1).values > 0.99).double().mean().item())
    assert out.entropy_target == out.entropy_online


def test_bf16_hidden_states_use_fp32_math():
    hidden, weight, mask = _inputs(seed=8)
    pred = _random_predictor("lora")
    h = hidden.bfloat16().requires_grad_(True)
    # a bf16 head is cast one (ragged) vocabulary slice at a time, in forward and in the gradient
    out = zerosiam_loss(h, mask, weight.bfloat16(), pred, vocab_chunk=32, token_chunk=5)
    out.loss.backward()
    h_ref = hidden.bfloat16().float().requires_grad_(True)
    ref = zerosiam_loss(h_ref, mask, weight.bfloat16().float(), pred)
    ref.loss.backward()
    assert out.loss.dtype == torch.float32 and h.grad.dtype == torch.bfloat16
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-6)
    torch.testing.assert_close(h.grad.float(), h_ref.grad.bfloat16().float())


def test_num_items_divisor():
    hidden, weight, mask = _inputs()
    a = tent_loss(hidden, mask, weight)
    b = tent_loss(hidden, mask, weight, num_items=100.0)
    assert b.loss.item() == pytest.approx(a.loss.item() * a.num_tokens / 100.0, rel=1e-6)


def test_bad_input():
    hidden, weight, mask = _inputs()
    with pytest.raises(UserInputError, match="selects no position"):
        tent_loss(hidden, torch.zeros_like(mask), weight)
    with pytest.raises(UserInputError, match="alpha must be >= 0"):
        zerosiam_loss(hidden, mask, weight, Predictor(D), alpha=-1)
    with pytest.raises(UserInputError, match="needs a predictor"):
        zerosiam_loss(hidden, mask, weight, None, alpha=1)
    with pytest.raises(UserInputError, match="loss_temperature"):
        tent_loss(hidden, mask, weight, temperature=0)
    with pytest.raises(UserInputError, match="mask shape"):
        tent_loss(hidden, mask[:, :3], weight)


# ------------------------------------------------------------------------------------------- COME


@pytest.mark.parametrize("num_classes", [None, 7, 1000])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
@pytest.mark.parametrize("token_chunk", [3, None])
def test_come_matches_the_reference_code(num_classes, temperature, token_chunk):
    """The fused chunked COME loss equals the reference code's value with its epsilon, its gradient the exact form's
    (full logits, norm held fixed through .detach(), autograd), in float64, for K = vocabulary size and other K.
    Reference: BlueWhaleLab/COME @ 409a19b71f62c765b1a5be62347a9455524ec176, ``tent_come.py`` L45-52
    (``dirichlet_entropy``) and L59-66 (``loss.mean(0)``)."""
    hidden, weight, mask = _inputs(seed=11)
    hidden = hidden.double().requires_grad_(True)
    weight = weight.double()
    out = come_loss(hidden, mask, weight, temperature, token_chunk=token_chunk, vocab_chunk=17,
                    num_classes=num_classes)  # fmt: skip
    out.loss.backward()
    got = hidden.grad.clone()
    hidden.grad = None
    ref = come_reference(hidden[mask], weight, num_classes, temperature).mean()
    ref.backward()
    with_eps = come_reference(hidden[mask].detach(), weight, num_classes, temperature, eps=1e-7).mean()
    assert out.loss.item() == pytest.approx(with_eps.item(), rel=1e-12)  # the logged value: the reference's
    assert out.opinion_entropy_exact == pytest.approx(ref.item(), rel=1e-12)
    assert abs(out.loss.item() - ref.item()) > 1e-5  # the exact form (the wrong variant for the value) differs
    torch.testing.assert_close(got, hidden.grad, rtol=1e-10, atol=1e-12)
    # the monitors see the softmax, as for Tent: H(p_o) = H(p_r), no divergence
    tent = tent_loss(hidden.detach(), mask, weight, temperature)
    assert out.entropy_target == pytest.approx(tent.entropy_target, rel=1e-12) and out.kl_target_online == 0.0


def test_come_holds_the_logit_norm_and_differs_from_tent():
    """The gradient w.r.t. the logits has no component along the logits (the reference's norm trick), and COME's
    loss and gradient are not Tent's."""
    hidden, weight, mask = _inputs(seed=12)
    h = hidden[mask].double().requires_grad_(True)
    z = (h @ weight.double().T).detach().requires_grad_(True)
    total, _, _ = come_entropy(z, torch.eye(z.shape[1], dtype=torch.float64))  # identity head: the gradient is dH/dz
    total.backward()
    assert (z.grad * z).sum(-1).abs().max() < 1e-10
    small = hidden.double() * 0.02  # logits of norm ~2: sum exp(z) is comparable to K, the uncertainty mass matters
    come, tent = come_loss(small, mask, weight.double()), tent_loss(small, mask, weight.double())
    assert abs(come.loss.item() - tent.loss.item()) > 1e-2


def _sar_reference(hidden, mask, weight, margin, temperature, keep=None):
    """The reference code's ``entropys[entropys < E0].mean()`` over full logits, E0 = margin ln V: mr-eggplant/SAR @
    20f6e24b17525f34503510afccedc0629b67b7c4, ``sar.py`` L64-67 (``softmax_entropy``), L80-83 (first pass:
    ``filter_ids_1 = torch.where(entropys < margin)``, ``loss = entropys.mean(0)``) and L87-91 (second pass: the
    first pass's survivors, filtered again with ``< margin``)."""
    z = hidden[mask] @ weight.T / temperature
    entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
    reliable = entropy < margin * torch.log(torch.tensor(float(weight.shape[0])))
    if keep is not None:
        reliable &= keep
    return entropy[reliable].mean(), reliable


@pytest.mark.parametrize("token_chunk", [3, None])
def test_sar_loss_matches_the_reference_filter_and_gradient(token_chunk, monkeypatch):
    """SAR: the mean entropy over the reliable tokens only (and over ``keep``), loss and gradient float64-exact;
    unreliable tokens get no gradient at all."""
    monkeypatch.setattr(chunked, "_CPU_BLOCK_BYTES", 2 * V * 8)  # several row blocks per chunk
    hidden, weight, mask = _inputs(seed=21, dtype=torch.float64)
    # rows of very different scale: confident tokens (low entropy) next to near-uniform ones (entropy ~ ln V)
    scale = torch.linspace(0.02, 1.5, hidden.shape[1], dtype=torch.float64)[None, :, None]
    hidden = (hidden * scale).requires_grad_(True)
    margin, temperature = 0.9, 0.8
    out = sar_loss(hidden, mask, weight, margin, temperature=temperature, token_chunk=token_chunk, vocab_chunk=17,
                   margin_unit="ln_v")  # fmt: skip
    out.loss.backward()
    got = hidden.grad.clone()
    hidden.grad = None
    ref, reliable = _sar_reference(hidden, mask, weight, margin, temperature)
    ref.backward()
    assert 0 < int(reliable.sum()) < int(mask.sum())  # the filter really leaves some tokens out
    assert torch.equal(out.kept, reliable) and out.kept_share == pytest.approx(reliable.double().mean().item())
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-12) and out.kept_loss == pytest.approx(ref.item())
    torch.testing.assert_close(got, hidden.grad, rtol=1e-10, atol=1e-12)
    assert got[mask][~reliable].abs().max() == 0
    # the monitors still see every token
    assert out.entropy_target == pytest.approx(tent_loss(hidden.detach(), mask, weight, temperature).entropy_target)
    # the second pass: only tokens reliable in both passes
    keep = reliable.clone()
    keep[torch.nonzero(keep)[0]] = False
    hidden.grad = None
    second = sar_loss(hidden, mask, weight, margin, keep=keep, temperature=temperature, margin_unit="ln_v")
    second.loss.backward()
    got = hidden.grad.clone()
    hidden.grad = None
    ref2, both = _sar_reference(hidden, mask, weight, margin, temperature, keep)
    ref2.backward()
    assert torch.equal(second.kept, both) and second.loss.item() == pytest.approx(ref2.item(), rel=1e-12)
    torch.testing.assert_close(got, hidden.grad, rtol=1e-10, atol=1e-12)


def test_sar_loss_without_a_reliable_token_is_zero_and_keep_is_checked():
    hidden, weight, mask = _inputs(seed=3)
    hidden = (hidden * 1e-4).requires_grad_(True)  # near-uniform: every entropy ~ ln V
    out = sar_loss(hidden, mask, weight, margin=0.5, margin_unit="ln_v")
    out.loss.backward()
    assert out.kept_share == 0 and out.loss.item() == 0 and hidden.grad.abs().max() == 0
    with pytest.raises(UserInputError, match="keep must have one entry per selected token"):
        sar_loss(hidden, mask, weight, keep=torch.ones(3, dtype=torch.bool))
    with pytest.raises(UserInputError, match="sar_margin must be > 0"):
        sar_loss(hidden, mask, weight, margin=0)
    # num_items (several micro-batches): the mean over kept tokens, scaled by this batch's share of the tokens
    h2 = hidden.detach() * 1e4
    full = sar_loss(h2, mask, weight, margin=0.9, margin_unit="ln_v")
    scaled = sar_loss(h2, mask, weight, margin=0.9, num_items=2 * int(mask.sum()), margin_unit="ln_v")
    assert scaled.loss.item() == pytest.approx(full.loss.item() / 2)


@pytest.mark.parametrize("token_chunk", [3, None])
def test_sar_margin_units_quantile_and_nats(token_chunk, monkeypatch):
    """E0 as a per-batch quantile of the token entropies (over ``keep``) or in nats: the same reference filter,
    loss and gradient float64-exact; the E0 used is reported in nats; the SAM pass reuses it in nats."""
    monkeypatch.setattr(chunked, "_CPU_BLOCK_BYTES", 2 * V * 8)
    hidden, weight, mask = _inputs(seed=22, dtype=torch.float64)
    scale = torch.linspace(0.02, 1.5, hidden.shape[1], dtype=torch.float64)[None, :, None]
    hidden = (hidden * scale).requires_grad_(True)
    z = hidden[mask].detach() @ weight.T
    entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
    e0 = torch.quantile(entropy, 0.6).item()
    out = sar_loss(hidden, mask, weight, 0.6, token_chunk=token_chunk, vocab_chunk=17, margin_unit="quantile")
    out.loss.backward()
    got = hidden.grad.clone()
    hidden.grad = None
    ref, reliable = _sar_reference(hidden, mask, weight, e0 / math.log(V), 1.0)  # the same E0, in ln V units
    ref.backward()
    assert out.entropy_below == pytest.approx(e0, rel=1e-12) and torch.equal(out.kept, reliable)
    assert out.kept_share == pytest.approx(int(reliable.sum()) / int(mask.sum()))
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(got, hidden.grad, rtol=1e-10, atol=1e-12)
    # nats: E0 given directly; the quantile's E0 in nats selects the same tokens
    nats = sar_loss(hidden.detach(), mask, weight, e0, margin_unit="nats")
    assert torch.equal(nats.kept, reliable) and nats.entropy_below == e0
    # with keep, the quantile ranks the kept tokens only (ranking every token is the wrong variant)
    keep = torch.zeros_like(reliable)
    keep[::2] = True
    within = sar_loss(hidden.detach(), mask, weight, 0.5, keep=keep, margin_unit="quantile")
    assert within.entropy_below == pytest.approx(torch.quantile(entropy[keep], 0.5).item(), rel=1e-12)
    assert within.entropy_below != pytest.approx(torch.quantile(entropy, 0.5).item(), rel=1e-6)
    assert torch.equal(within.kept, keep & (entropy < within.entropy_below))
    everything = sar_loss(hidden.detach(), mask, weight, 1.0, margin_unit="quantile")
    assert everything.kept_share == 1.0
    with pytest.raises(UserInputError, match="sar_margin must be > 0"):
        sar_loss(hidden, mask, weight, 1.5, margin_unit="quantile")
    with pytest.raises(UserInputError, match="sar_margin_unit"):
        sar_loss(hidden, mask, weight, 0.5, margin_unit="percent")


@pytest.mark.parametrize("method", ["zerosiam", "tent"])
def test_the_plain_definition_equals_the_fused_kernel(method):
    """objectives.zerosiam_loss_reference (the loss on one screen, full logits) and the chunked kernel the trainers
    call: the same value and the same gradients, in float64, with chunks smaller than the tokens and the vocabulary."""
    from zerosiam_llm.objectives import zerosiam_loss_reference

    torch.manual_seed(0)
    d, vocab = 16, 50
    hidden = torch.randn(2, 5, d, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 5) > 0.3
    weight = torch.randn(vocab, d, dtype=torch.float64)
    predictor, alpha = None, 0.0
    if method == "zerosiam":
        predictor, alpha = torch.nn.Linear(d, d, bias=False).double(), 1.0
        torch.nn.init.eye_(predictor.weight)
        predictor.weight.data += 0.05 * torch.randn(d, d, dtype=torch.float64)  # P != I: the KL terms are nonzero
    params = [hidden] + ([predictor.weight] if predictor else [])
    plain = zerosiam_loss_reference(hidden, mask, weight, predictor, alpha=alpha, temperature=0.7)
    fused = zerosiam_loss(hidden, mask, weight, predictor, alpha=alpha, temperature=0.7, vocab_chunk=16, token_chunk=3)
    torch.testing.assert_close(fused.loss, plain, rtol=1e-12, atol=1e-12)
    for got, want in zip(torch.autograd.grad(fused.loss, params), torch.autograd.grad(plain, params), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
