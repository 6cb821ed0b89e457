"""Adaptive margin: BT loss through fused_haf_loss changes exactly as −logσ(r_c − r_r − λ·strength_mean)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from haf_kernels import fused_haf_loss
from training.methods import margin as M


@pytest.mark.parametrize("lam", [0.0, 1.0, 2.5])
def test_adaptive_margin_bt_formula(lam):
    torch.manual_seed(0)
    b, t, d, v = 6, 4, 3, 9
    h, w = torch.randn(2 * b, t, d, dtype=torch.float64), torch.randn(v, d, dtype=torch.float64)
    lab = torch.randint(0, v, (2 * b, t))
    r = torch.randn(2 * b, dtype=torch.float64)
    strength = torch.tensor([2.0, -1.0, 0.5, 0.0, -3.0, 1.5], dtype=torch.float64)
    m = M.adaptive_margin(strength, lam).double()
    assert torch.allclose(m, lam * strength)
    out = fused_haf_loss(h, w, lab, r, alpha=0.0, reward_margin=m, backend="reference")
    want = -F.logsigmoid(r[:b] - r[b:] - lam * strength).mean()
    assert out.reward_loss.item() == pytest.approx(want.item(), rel=1e-10)
    assert M.bt_loss_with_margin(r[:b], r[b:], m).item() == pytest.approx(want.item(), rel=1e-10)
    base = fused_haf_loss(h, w, lab, r, alpha=0.0, backend="reference").reward_loss
    if lam:
        assert out.reward_loss.item() != pytest.approx(base.item(), rel=1e-6)
        # per pair: positive strength raises the loss, negative strength lowers it
        per = -F.logsigmoid(r[:b] - r[b:] - m) + F.logsigmoid(r[:b] - r[b:])
        assert ((per > 0) == (strength > 0)).all() and ((per < 0) == (strength < 0)).all()


def test_margin_options_and_rows():
    s = torch.tensor([1.0, 3.0, -2.0])
    assert M.adaptive_margin(s, 2.0, clip_min=-1.0, clip_max=4.0).tolist() == [2.0, 4.0, -1.0]
    z = M.adaptive_margin(s, 1.0, normalize="standardize")
    assert z.mean().abs() < 1e-6 and (z.std(correction=0) - 1).abs() < 1e-5
    assert M.margin_from_rows([{"strength_mean": 0.5}, {}], 2.0).tolist() == [1.0, 0.0]
