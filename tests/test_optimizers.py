"""AdamWWithSGDGroups: torch's AdamW and SGD-momentum steps in one optimizer, one algorithm per parameter group."""

import pytest
import torch

from zerosiam_llm.optimizers import AdamWWithSGDGroups


def _loss(a, b):
    return (a**2).sum() + (b**3).sum() + (a[:3] * b).sum()


def test_each_group_steps_exactly_like_its_torch_optimizer():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3))
    ra, rb = torch.nn.Parameter(a.detach().clone()), torch.nn.Parameter(b.detach().clone())
    mixed = AdamWWithSGDGroups(
        [{"params": [a], "weight_decay": 0.01}, {"params": [b], "lr": 0.1, "weight_decay": 0.05, "algorithm": "sgd"}],
        momentum=0.9, lr=1e-2,
    )  # fmt: skip
    adamw = torch.optim.AdamW([ra], lr=1e-2, weight_decay=0.01)
    sgd = torch.optim.SGD([rb], lr=0.1, momentum=0.9, weight_decay=0.05)
    for step in range(4):
        for opt in (mixed, adamw, sgd):
            opt.zero_grad()
        _loss(a, b).backward()
        _loss(ra, rb).backward()
        mixed.step()
        adamw.step()
        sgd.step()
        if step == 1:  # a checkpoint round trip in the middle (momentum buffers and Adam moments restored)
            mixed.load_state_dict(mixed.state_dict())
        torch.testing.assert_close(a, ra, rtol=0, atol=0)
        torch.testing.assert_close(b, rb, rtol=0, atol=0)
    assert [g["algorithm"] for g in mixed.param_groups] == ["adamw", "sgd"]


def test_schedulers_scale_both_kinds_of_group():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    groups = [{"params": [a]}, {"params": [b], "lr": 1.0, "weight_decay": 0.0, "algorithm": "sgd"}]
    opt = AdamWWithSGDGroups(groups, lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.05), pytest.approx(0.5)]
    b.grad = torch.ones(2)
    opt.step()
    scheduler.step()
    torch.testing.assert_close(b.detach(), torch.full((2,), 0.5))  # 1 - 0.5 * 1 (no momentum yet)
