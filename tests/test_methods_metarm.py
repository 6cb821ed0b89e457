"""MetaRM: J increases after the inner step; the meta-gradient matches finite differences; the step follows it."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from training.methods import metarm as MR


class TinyRM(nn.Module):
    """Embedding → mean pool → tanh MLP → reward [S] (non-linear so the Hessian term is non-zero)."""

    def __init__(self, vocab=11, dim=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mlp = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 1)

    def forward(self, ids, mask):
        h = self.emb(ids) * mask[..., None]
        pooled = h.sum(1) / mask.sum(1, keepdim=True)
        return self.head(torch.tanh(self.mlp(pooled))).squeeze(-1)


def _setup(seed=0, p=3, k=4, b=5, t=6):
    torch.manual_seed(seed)
    model = TinyRM().double()
    ids_s, mask_s = torch.randint(0, 11, (p * k, t)), torch.ones(p * k, t, dtype=torch.float64)
    ids_t, mask_t = torch.randint(0, 11, (2 * b, t)), torch.ones(2 * b, t, dtype=torch.float64)

    def outer(params):
        r = functional_call(model, params, (ids_t, mask_t))
        return -F.logsigmoid(r[:b] - r[b:]).mean()

    return model, ids_s, mask_s, outer, k


def test_meta_objective_formula():
    r = torch.tensor([[0.0, 1.0, 3.0], [2.0, 2.0, 2.0]])
    want0 = 2 / 9 * sum(torch.sigmoid(torch.tensor(abs(a - b))) for a, b in itertools.combinations([0.0, 1.0, 3.0], 2))
    want1 = 2 / 9 * 3 * 0.5
    assert MR.meta_objective(r).item() == pytest.approx(((want0 + want1) / 2).item(), rel=1e-6)


def test_inner_step_increases_objective():
    model, ids_s, mask_s, _, k = _setup()
    params = MR.trainable_params(model)
    fast, j0 = MR.inner_step(model, params, ids_s, mask_s, k=k, inner_lr=0.5)
    j1 = MR.shifted_objective(model, fast, ids_s, mask_s, k)
    assert j1 > j0
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())  # module untouched


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _lookahead_loss(model, ids_s, mask_s, outer, k, eta, flat):
    """L(θ + η∇J(θ)) at θ = flat, with the look-ahead recomputed from scratch (for finite differences)."""
    params, i = {}, 0
    for n, p in model.named_parameters():
        params[n] = flat[i : i + p.numel()].view_as(p).clone().requires_grad_(True)
        i += p.numel()
    fast, _ = MR.inner_step(model, params, ids_s, mask_s, k=k, inner_lr=eta, first_order=True)
    return outer({n: v.detach() for n, v in fast.items()}).item()


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_meta_gradient_matches_finite_differences(eta):
    model, ids_s, mask_s, outer, k = _setup(1)
    out = MR.metarm_loss(model, ids_s, mask_s, outer, k=k, inner_lr=eta)
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    g = torch.cat([x.reshape(-1) for x in grads])
    theta = _flat(model)
    torch.manual_seed(5)
    for _ in range(3):
        v = torch.randn_like(theta)
        h = 1e-5
        fd = (
            _lookahead_loss(model, ids_s, mask_s, outer, k, eta, theta + h * v)
            - _lookahead_loss(model, ids_s, mask_s, outer, k, eta, theta - h * v)
        ) / (2 * h)
        assert (g @ v).item() == pytest.approx(fd, rel=1e-5, abs=1e-8)
    # first order differs (no Hessian term) and equals ∇L at θ'
    fo = MR.metarm_loss(model, ids_s, mask_s, outer, k=k, inner_lr=eta, first_order=True)
    names = [n for n, _ in model.named_parameters()]
    fast = {n: fo.fast_params[n].detach().requires_grad_(True) for n in names}
    g_at_fast = torch.cat([x.reshape(-1) for x in torch.autograd.grad(outer(fast), [fast[n] for n in names])])
    g_fo = torch.cat([x.reshape(-1) for x in torch.autograd.grad(fo.loss, list(model.parameters()))])
    assert torch.allclose(g_fo, g_at_fast, atol=1e-12)
    assert not torch.allclose(g_fo, g, atol=1e-6)


def test_metarm_step_moves_params_along_meta_gradient():
    model, ids_s, mask_s, outer, k = _setup(2)
    out = MR.metarm_loss(model, ids_s, mask_s, outer, k=k, inner_lr=0.5)
    g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(out.loss, list(model.parameters()))])
    before = _flat(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    MR.metarm_step(model, opt, ids_s, mask_s, outer, k=k, inner_lr=0.5)
    assert torch.allclose(_flat(model) - before, -0.01 * g, atol=1e-12)
    # plain BT gradient is a different direction: the step is not ordinary training
    plain = torch.cat(
        [x.reshape(-1) for x in torch.autograd.grad(outer(dict(model.named_parameters())), list(model.parameters()))]
    )
    assert torch.nn.functional.cosine_similarity(plain, g, dim=0) < 0.9999
