"""SAR's sharpness-aware step and model-recovery average (``sar.py``) against hand-computed values."""

import math

import pytest
import torch

from zerosiam_llm.sar import RecoveryAverage, replay_recovery, sam_ascend, sam_return


def test_sam_ascends_along_the_normalised_gradient_and_returns():
    a = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    b = torch.nn.Parameter(torch.tensor([[3.0]]))
    c = torch.nn.Parameter(torch.tensor([5.0]))  # no gradient: does not move
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])  # ||g|| = 5
    steps = sam_ascend([a, b, c], rho=0.5)
    torch.testing.assert_close(a.detach(), torch.tensor([1.3, 2.0]))
    torch.testing.assert_close(b.detach(), torch.tensor([[3.4]]))
    assert c.item() == 5.0
    sam_return([a, b, c], steps)
    torch.testing.assert_close(a.detach(), torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(b.detach(), torch.tensor([[3.0]]))


@pytest.mark.parametrize("grad", [torch.zeros(2), torch.tensor([float("nan"), 1.0])])
def test_sam_does_not_move_on_a_zero_or_non_finite_gradient(grad):
    a = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    a.grad = grad
    assert sam_ascend([a], rho=0.05) is None
    assert a.tolist() == [1.0, 2.0]


def test_sam_returns_to_exactly_the_saved_weights_in_bf16():
    """The reference's ``second_step`` restores the saved ``old_p`` (mr-eggplant/SAR @
    20f6e24b17525f34503510afccedc0629b67b7c4, ``sam.py`` L38: ``p.data = self.state[p]["old_p"]``); subtracting the
    step instead leaves a rounding drift."""
    g = torch.Generator().manual_seed(0)
    a = torch.nn.Parameter((1 + 0.01 * torch.randn(256, generator=g)).to(torch.bfloat16))  # steps < bf16 spacing
    a.grad = torch.randn(256, generator=g).to(torch.bfloat16)
    before = a.detach().clone()
    saved = sam_ascend([a], rho=0.05)
    assert not torch.equal(a.detach(), before)
    sam_return([a], saved)
    assert torch.equal(a.detach(), before)
    # the wrong variant (w + e - e in bf16) does not come back bit for bit
    b = before.clone()
    step = (a.grad.float() * 0.05 / a.grad.float().norm()).to(torch.bfloat16)
    assert not torch.equal(b.add(step).sub(step), before)


def _reference_recovery(losses, reset_below=0.2):
    """mr-eggplant/SAR @ 20f6e24b17525f34503510afccedc0629b67b7c4: ``update_ema`` (``sar.py`` L15-20) fed
    ``loss_second`` unless NaN (L92-93), ``reset_flag = ema < 0.2`` (L100-103), and ``forward`` (L47-52), whose
    ``self.reset()`` sets ``self.ema = None`` but is followed by ``self.ema = ema``: the average survives a reset."""
    ema, fired = None, []
    for step, loss in enumerate(losses, 1):
        if not math.isnan(loss):
            ema = loss if ema is None else 0.9 * ema + (1 - 0.9) * loss
        if ema is not None and ema < reset_below:
            fired.append(step)
    return fired


@pytest.mark.parametrize("seed", range(5))
def test_recovery_average_matches_the_reference_code(seed):
    g = torch.Generator().manual_seed(seed)
    # a collapse (losses near 0 from update 4), then losses just above 0.2
    low = 0.05 * torch.rand(20, generator=g, dtype=torch.float64)
    losses = [1.0] * 3 + low.tolist() + [0.21] * 25
    losses[3] = float("nan")  # no reliable token: the average is not updated
    avg = RecoveryAverage(decay=0.9, reset_below=0.2)
    fired = [step for step, loss in enumerate(losses, 1) if avg.update(loss)]
    assert fired == _reference_recovery(losses) and len(fired) > 1  # resets in a row until the average climbs back
    # the wrong variant, forgetting the average at each reset, fires on other steps
    forget, ema = [], None
    for step, loss in enumerate(losses, 1):
        if not math.isnan(loss):
            ema = loss if ema is None else 0.9 * ema + 0.1 * loss
        if ema is not None and ema < 0.2:
            forget.append(step)
            ema = None
    assert forget != fired


def test_recovery_average_by_hand_and_the_relative_unit():
    avg = RecoveryAverage(decay=0.9, reset_below=0.2)
    assert avg.update(1.0) is False and avg.ema == 1.0  # the first loss as it is
    assert avg.update(0.5) is False and avg.ema == pytest.approx(0.95)
    assert avg.update(float("nan")) is False and avg.ema == pytest.approx(0.95)  # no reliable token: unchanged
    assert avg.update(None) is False
    fired = [avg.update(0.0) for _ in range(15)]  # 0.95 * 0.9^n < 0.2 from n = 15
    assert fired == [False] * 14 + [True]
    assert avg.resets == 1 and avg.ema < 0.2  # kept through the reset
    assert avg.update(1.0) is False and avg.ema > 0.2  # climbs back over the threshold: no second reset
    state = avg.state_dict()
    other = RecoveryAverage()
    other.load_state_dict(state)
    assert other.state_dict() == state
    never = RecoveryAverage(reset_below=0)
    assert not any(never.update(0.0) for _ in range(5)) and math.isclose(never.ema, 0.0)
    # relative unit: the threshold is 0.2 x the stream's first loss (2.0 here), so 0.3 is already below it
    rel = RecoveryAverage(decay=0.0, reset_below=0.2, unit="initial")
    assert rel.threshold is None and rel.update(2.0) is False and rel.threshold == pytest.approx(0.4)
    assert rel.update(0.5) is False and rel.update(0.3) is True
    assert rel.state_dict()["initial"] == 2.0
    rel.reset()
    assert rel.state_dict() == {"ema": None, "initial": None, "resets": 0}
    with pytest.raises(ValueError, match="reset unit"):
        RecoveryAverage(unit="percent")


def test_replay_recovery_lists_the_updates_that_fire():
    collapse = [1.0, 0.8, 0.5, 0.2, 0.05, 0.02, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01]
    healthy = [1.0, 0.9, 0.8, 0.7, 0.6, 0.55, 0.5, 0.5, 0.45, 0.45, 0.45, 0.45, 0.42, 0.42, 0.42, 0.42]
    # the reference's decay 0.9 lags by ~15 updates: 0.9^15 = 0.21, so a 16-update stream never resets
    assert replay_recovery(collapse, 0.9, 0.2, "initial") == []
    assert replay_recovery(collapse, 0.5, 0.2, "initial")[0] == 6
    assert replay_recovery(healthy, 0.9, 0.2, "initial") == []
    assert replay_recovery(healthy, 0.9, 0.2, "nats") == []
