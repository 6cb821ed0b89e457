"""Contrastive losses: SimCSE prefers aligned views, Sinkhorn balances prototypes, SwAV gradients point right."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training.methods import contrastive as C


def test_simcse_aligned_lower_than_shuffled():
    torch.manual_seed(0)
    z = torch.randn(16, 8)
    z1, z2 = C.dropout_views(z, 0.05)
    assert not torch.equal(z1, z2)
    aligned = C.simcse_loss(z1, z2, 0.05)
    shuffled = C.simcse_loss(z1, z2[torch.randperm(16)], 0.05)
    assert aligned < shuffled - 1.0
    assert aligned < 0.5  # near-identical positives, 15 negatives
    # equals the plain PyTorch form
    sim = F.normalize(z1, dim=-1) @ F.normalize(z2, dim=-1).T / 0.05
    assert aligned.item() == pytest.approx(F.cross_entropy(sim, torch.arange(16)).item(), rel=1e-6)


def test_contrast_items_diff():
    f = torch.arange(12.0).view(4, 3)  # B = 2
    d = C.contrast_items(f, "diff")
    assert torch.equal(d, torch.cat([f[:2] - f[2:], f[2:] - f[:2]]))
    assert torch.equal(C.contrast_items(f, "pair"), f)


def test_sinkhorn_balanced_marginals():
    torch.manual_seed(0)
    n, k = 64, 8
    scores = torch.randn(n, k) * 0.1
    scores[:, 0] += 0.5  # every item prefers prototype 0
    q = C.sinkhorn(scores, epsilon=0.05, n_iters=50)
    assert torch.allclose(q.sum(1), torch.ones(n), atol=1e-5)
    assert torch.allclose(q.sum(0), torch.full((k,), n / k), rtol=1e-3)
    greedy = F.softmax(scores / 0.05, dim=-1).sum(0)
    assert greedy[0] > 0.5 * n  # unbalanced without Sinkhorn
    q3 = C.sinkhorn(scores, epsilon=0.05, n_iters=3)
    assert (q3.sum(0) - n / k).abs().max() < (greedy - n / k).abs().max() / 5


def test_swav_gradient_sign():
    torch.manual_seed(0)
    n, k, tau = 10, 6, 0.1
    s1 = torch.randn(n, k, requires_grad=True)
    s2 = torch.randn(n, k)
    q1, q2 = C.sinkhorn(s1.detach()), C.sinkhorn(s2)
    loss = C.swav_swapped_loss(s1, s2, q1, q2, tau)
    (g,) = torch.autograd.grad(loss, s1)
    p1 = F.softmax(s1.detach() / tau, dim=-1)
    # d loss / d s1 = (p1 − q2) / (2 N τ): raising the score of the swapped target's prototype lowers the loss
    assert torch.allclose(g, (p1 - q2) / (2 * n * tau), atol=1e-6)
    # from uniform scores every item's swapped target prototype gets a negative gradient
    flat = torch.zeros(n, k, requires_grad=True)
    (g0,) = torch.autograd.grad(C.swav_swapped_loss(flat, s2, q1, q2, tau), flat)
    assert (g0[torch.arange(n), q2.argmax(-1)] < 0).all()
    # a small step against the gradient lowers the loss
    with torch.no_grad():
        lower = C.swav_swapped_loss(s1 - 0.1 * g, s2, q1, q2, tau)
    assert lower < loss


@pytest.mark.parametrize(
    "method,on,w,k", [("simcse", "pair", 1.0, None), ("swav", "pair", 0.1, 50), ("swav", "diff", 0.5, 20)]
)
def test_contrastive_module_defaults_and_grads(method, on, w, k):
    torch.manual_seed(0)
    mod = C.ContrastiveLoss(8, method, on)
    assert mod.weight == w
    if k is not None:
        assert mod.swav.prototypes.shape == (k, 8)
    f = torch.randn(12, 8, requires_grad=True)
    loss = mod(f)
    loss.backward()
    assert torch.isfinite(loss) and f.grad.abs().sum() > 0
    if method == "swav":
        assert mod.swav.prototypes.grad.abs().sum() > 0


def test_swav_training_lowers_loss():
    torch.manual_seed(0)
    mod = C.ContrastiveLoss(4, "swav", "pair", num_prototypes=5, weight=1.0)
    centers = torch.randn(5, 4) * 3
    feats = centers.repeat(8, 1) + 0.1 * torch.randn(40, 4)
    opt = torch.optim.SGD(mod.parameters(), lr=0.5)
    first = None
    for _ in range(60):
        opt.zero_grad()
        loss = mod(feats)
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
    assert loss.item() < first
