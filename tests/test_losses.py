"""The shared InfoNCE against both reference conventions (losses.pt)."""

import math

import torch

from tests.conftest import load_parity
from tvr_bench.functional.losses import MAX_LOGIT_SCALE, clamp_logit_scale_, symmetric_infonce


def test_infonce_matches_both_reference_losses():
    data = load_parity("losses.pt")
    assert data, "no cases in losses.pt"
    for name, case in data.items():
        ours = symmetric_infonce(case["cos_sims"], case["logit_scale_param"])
        torch.testing.assert_close(ours, case["xpool_clip_loss"], atol=1e-5, rtol=0, msg=name)
        torch.testing.assert_close(ours, case["crossen_sym_loss"], atol=1e-5, rtol=0, msg=name)
        at_cap = symmetric_infonce(case["cos_sims"], case["logit_scale_param_clamped_max"])
        torch.testing.assert_close(at_cap, case["xpool_clip_loss_at_scale100"], atol=1e-5, rtol=0, msg=name)


def test_clamp_keeps_scale_at_most_ln100():
    p = torch.nn.Parameter(torch.tensor(7.0))
    clamp_logit_scale_(p)
    assert math.isclose(p.item(), MAX_LOGIT_SCALE, rel_tol=1e-6)
    q = torch.nn.Parameter(torch.tensor(2.0))
    clamp_logit_scale_(q)
    assert q.item() == 2.0


def test_infonce_prefers_the_diagonal_and_has_gradients():
    good = torch.eye(4) * 0.9
    bad = torch.ones(4, 4) * 0.1
    assert symmetric_infonce(good, 3.0) < symmetric_infonce(bad, 3.0)
    sims = torch.randn(5, 5, requires_grad=True)
    symmetric_infonce(sims, torch.tensor(2.0)).backward()
    assert sims.grad is not None and torch.isfinite(sims.grad).all()
