"""SAR's sharpness-aware step and model-recovery average (``sar.py``) against hand-computed values."""

import math

import pytest
import torch

from zerosiam_llm.sar import RecoveryAverage, sam_ascend, sam_return


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


def test_recovery_average_follows_the_reference():
    avg = RecoveryAverage(decay=0.9, reset_below=0.2)
    assert avg.update(1.0) is False and avg.ema == 1.0  # the first loss as it is
    assert avg.update(0.5) is False and avg.ema == pytest.approx(0.95)
    assert avg.update(float("nan")) is False and avg.ema == pytest.approx(0.95)  # no reliable token: unchanged
    assert avg.update(None) is False
    fired = [avg.update(0.0) for _ in range(15)]  # 0.95 * 0.9^n < 0.2 from n = 15
    assert fired == [False] * 14 + [True]
    assert avg.ema is None and avg.resets == 1  # forgotten after the reset, as the reference's reset()
    assert avg.update(0.1) is True and avg.resets == 2  # a first value below the threshold resets at once
    state = avg.state_dict()
    other = RecoveryAverage()
    other.load_state_dict(state)
    assert other.state_dict() == state
    never = RecoveryAverage(reset_below=0)
    assert not any(never.update(0.0) for _ in range(5)) and math.isclose(never.ema, 0.0)
