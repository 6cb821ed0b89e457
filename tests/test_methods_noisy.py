"""Noisy-pair handling: flip flips exactly the selected pairs, drop zeroes their weight, soft = per-pair ε."""

from __future__ import annotations

import pytest
import torch

from haf_kernels import fused_haf_loss
from training.methods import noisy as N

STRENGTH = [0.5, -2.0, 1.0, -0.1, 3.0, 0.0, -5.0, 2.0, 0.2, 1.5]


def _rows():
    return [
        {
            "chosen": f"c{i}",
            "rejected": f"r{i}",
            "true_reward_chosen": float(i),
            "true_reward_rejected": -float(i),
            "strength_mean": s,
            "prompt": f"p{i}",
        }
        for i, s in enumerate(STRENGTH)
    ]


def test_select_by_fraction_and_threshold():
    assert N.select_noisy_pairs(STRENGTH, fraction=0.2).nonzero().flatten().tolist() == [1, 6]
    assert N.select_noisy_pairs(STRENGTH, fraction=0.3).nonzero().flatten().tolist() == [1, 3, 6]
    assert N.select_noisy_pairs(STRENGTH, threshold=0.0).nonzero().flatten().tolist() == [1, 3, 6]
    assert not N.select_noisy_pairs(STRENGTH, fraction=0.0).any()
    with pytest.raises(ValueError):
        N.select_noisy_pairs(STRENGTH)


def test_flip_flips_exactly_selected():
    rows = _rows()
    out = N.apply_noisy_mode(rows, "flip", fraction=0.2)
    assert len(out) == len(rows)
    for i, (a, b) in enumerate(zip(rows, out)):
        if i in (1, 6):
            assert (b["chosen"], b["rejected"]) == (a["rejected"], a["chosen"])
            assert (b["true_reward_chosen"], b["true_reward_rejected"]) == (
                a["true_reward_rejected"],
                a["true_reward_chosen"],
            )
            assert b["strength_mean"] == -a["strength_mean"] and b["noisy_flipped"] is True
            assert b["prompt"] == a["prompt"]
        else:
            assert {k: b[k] for k in a} == a and b.get("noisy_flipped", False) is False
        assert b["weight"] == 1.0


def test_drop_zeroes_weight_and_loss_ignores_pair():
    out = N.apply_noisy_mode(_rows(), "drop", threshold=0.0)
    assert [r["weight"] for r in out] == [0.0 if i in (1, 3, 6) else 1.0 for i in range(len(STRENGTH))]
    # through fused_haf_loss: the dropped pairs do not change the loss
    torch.manual_seed(0)
    b, t, d, v = len(STRENGTH), 4, 3, 7
    h, w = torch.randn(2 * b, t, d), torch.randn(v, d)
    lab, r = torch.randint(0, v, (2 * b, t)), torch.randn(2 * b)
    pw = torch.tensor([row["weight"] for row in out])
    base = fused_haf_loss(h, w, lab, r, pair_weights=pw, backend="torch").loss
    r2 = r.clone()
    r2[[1, 3, 6]] += 100.0
    assert fused_haf_loss(h, w, lab, r2, pair_weights=pw, backend="torch").loss == pytest.approx(base.item(), rel=1e-6)
    assert fused_haf_loss(h, w, lab, r2, backend="torch").loss.item() != pytest.approx(base.item(), rel=1e-3)


def test_soft_smooth_equals_per_pair_label_smoothing():
    eps = 0.3
    rows = [{"chosen": i, "rejected": 10 + i, "strength_mean": s} for i, s in enumerate([1.0, -1.0, 0.5, -3.0])]
    out = N.apply_noisy_mode(rows, "soft", threshold=0.0, soft_mode="smooth", soft_epsilon=eps)
    assert len(out) == 6 and [r["weight"] for r in out] == pytest.approx([1, 0.7, 1, 0.7, 0.3, 0.3])
    assert (out[4]["chosen"], out[5]["chosen"]) == (11, 13)
    # weighted BT over the expanded rows == per-pair smoothed BT over the original rows
    torch.manual_seed(0)
    rew = {i: torch.randn(()).item() for i in range(14)}
    m_exp = torch.tensor([rew[r["chosen"]] - rew[r["rejected"]] for r in out])
    w = torch.tensor([r["weight"] for r in out])
    got = (w * -torch.nn.functional.logsigmoid(m_exp)).sum() / w.sum()
    m = torch.tensor([rew[r["chosen"]] - rew[r["rejected"]] for r in rows])
    e = torch.tensor([0.0, eps, 0.0, eps])
    want = (-(1 - e) * torch.nn.functional.logsigmoid(m) - e * torch.nn.functional.logsigmoid(-m)).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    weighted = N.apply_noisy_mode(rows, "soft", threshold=0.0, soft_mode="weight", soft_weight=0.25)
    assert [r["weight"] for r in weighted] == [1.0, 0.25, 1.0, 0.25]


def test_tensor_helpers():
    x = torch.arange(8).view(8, 1)  # B = 4
    mask = torch.tensor([False, True, False, True])
    assert N.flip_concat(x, mask).flatten().tolist() == [0, 5, 2, 7, 4, 1, 6, 3]
    assert N.drop_weights(mask).tolist() == [1.0, 0.0, 1.0, 0.0]
    assert N.soft_weights(mask, 0.5).tolist() == [1.0, 0.5, 1.0, 0.5]
    # flipping the batch = negating the reward difference of exactly the selected pairs
    r = torch.randn(8)
    rf = N.flip_concat(r, mask)
    diff, difff = r[:4] - r[4:], rf[:4] - rf[4:]
    assert torch.equal(difff, torch.where(mask, -diff, diff))
