import json

import pytest
import torch

from zerosiam_llm.errors import UserInputError
from zerosiam_llm.predictor import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    Predictor,
    load_predictor,
    load_predictor_state_,
    save_predictor,
)


@pytest.mark.parametrize("form", ["full", "lora"])
def test_identity_at_init_and_fp32(form):
    p = Predictor(16, form, rank=4, seed=0)
    h = torch.randn(5, 16).bfloat16()
    out = p(h)
    assert out.dtype == torch.float32
    assert torch.equal(out, h.float())
    assert p.deviation() == 0.0


def test_residual_form_keeps_small_updates_under_bf16_inputs():
    """A 1e-4 update survives: bf16(1 + 1e-4) == 1 would erase it in a bf16 predictor."""
    p = Predictor(8, "full")
    with torch.no_grad():
        p.delta.fill_diagonal_(1e-4)
    h = torch.ones(2, 8).bfloat16()
    assert torch.all(p(h) - h.float() > 0.9e-4)
    assert torch.bfloat16 != p.delta.dtype


@pytest.mark.parametrize("form", ["full", "lora"])
def test_save_load_round_trip_bit_exact(tmp_path, form):
    p = Predictor(12, form, rank=3, seed=1)
    with torch.no_grad():
        for param in p.parameters():
            param.add_(torch.randn_like(param))
    save_predictor(p, tmp_path)
    assert (tmp_path / WEIGHTS_NAME).is_file()
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["form"] == form
    q = load_predictor(tmp_path)
    for (n1, a), (n2, b) in zip(p.state_dict().items(), q.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(a, b)
    fresh = Predictor(12, form, rank=3, seed=5)
    load_predictor_state_(fresh, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(p.parameters(), fresh.parameters(), strict=True))
    assert not list(tmp_path.glob(".*tmp*"))


def test_reset_back_to_identity():
    p = Predictor(8, "lora", rank=2, seed=0)
    with torch.no_grad():
        p.up.add_(1.0)
    assert p.deviation() > 0
    p.reset_(seed=0)
    assert p.deviation() == 0.0


def test_bad_input(tmp_path):
    with pytest.raises(UserInputError, match="unknown; allowed: full, lora"):
        Predictor(8, "mlp")
    with pytest.raises(UserInputError, match=r"predictor_rank must be in 1\.\.8"):
        Predictor(8, "lora", rank=0)
    with pytest.raises(UserInputError, match=r"predictor_rank must be in 1\.\.8"):
        Predictor(8, "lora", rank=9)
    with pytest.raises(UserInputError, match="holds no predictor"):
        load_predictor(tmp_path)
    save_predictor(Predictor(8, "full"), tmp_path)
    with pytest.raises(UserInputError, match="but this run uses"):
        load_predictor_state_(Predictor(8, "lora", rank=2), tmp_path)
