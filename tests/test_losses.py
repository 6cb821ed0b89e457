"""fused_haf_loss on every backend against an independent float64 implementation of the issue's formulas."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, DTYPES, rel_err, tol

import haf_kernels as hk

POLICIES = ["sigmoid", "hinge", "ipo", "simpo", "rdpo"]


def naive_haf(
    hidden,
    weight,
    labels,
    rewards,
    ref,
    *,
    beta,
    alpha,
    reward_weight,
    policy,
    gamma,
    avg,
    margin,
    eps,
    weights,
    bias,
    scale,
    softcap,
    center=0.0,
):
    """Materialised-logits float64 HaF loss written straight from the spec (no haf_kernels code)."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp = z.log_softmax(-1)
    valid = labels != -100
    tok = logp.gather(-1, labels.clamp_min(0)[..., None])[..., 0] * valid
    seq = tok.sum(-1)
    if avg or policy in ("simpo", "ipo"):  # ipo: per-token means of the log-ratios (TRL), ref_logps then means too
        seq = seq / valid.sum(-1).clamp_min(1)
    b = hidden.shape[0] // 2
    c, r = seq[:b], seq[b:]
    if ref is not None:
        c, r = c - ref[:b].double(), r - ref[b:].double()
    d = c - r
    w = torch.ones(b, dtype=torch.float64) if weights is None else weights.double()

    def bt(m):
        return -(1 - eps) * F.logsigmoid(m) - eps * F.logsigmoid(-m)

    if policy == "sigmoid":
        terms = bt(beta * d)
    elif policy == "hinge":
        terms = torch.relu(1 - beta * d)
    elif policy == "ipo":
        terms = (d - 1 / (2 * beta)) ** 2  # d of per-token means
    elif policy == "rdpo":
        terms = ((1 - eps) * -F.logsigmoid(beta * d) + eps * F.logsigmoid(-beta * d)) / (1 - 2 * eps)
    else:
        terms = bt(beta * d - gamma)
    wsum = w.sum()
    policy_loss = (w * terms).sum() / wsum if wsum > 0 else (w * terms).sum() * 0
    loss = alpha * policy_loss
    out = dict(
        policy_loss=policy_loss,
        chosen_logps=seq[:b],
        rejected_logps=seq[b:],
        implicit_margin=beta * d,
        implicit_accuracy=(d > 0).double().mean(),
    )
    if rewards is not None:
        rd = rewards[:b].double() - rewards[b:].double()
        m = rd - (0.0 if margin is None else (margin.double() if torch.is_tensor(margin) else margin))
        reward_loss = (w * bt(m)).sum() / wsum if wsum > 0 else (w * bt(m)).sum() * 0
        loss = loss + reward_weight * reward_loss
        out.update(reward_loss=reward_loss, reward_margin=rd, reward_accuracy=(rd > 0).double().mean())
        if center:  # reward centering: c · weighted mean of (r_c + r_r)²
            rs = rewards[:b].double() + rewards[b:].double()
            out["center_loss"] = (w * rs**2).sum() / wsum
            loss = loss + center * out["center_loss"]
    out["loss"] = loss
    return out


def make_batch(n_pairs, t, d, v, dtype, *, ignore_frac=0.3, all_ignored_row=False):
    hidden = torch.randn(2 * n_pairs, t, d, dtype=torch.float64).to(dtype)
    weight = (torch.randn(v, d, dtype=torch.float64) / d**0.5).to(dtype)
    labels = torch.randint(0, v, (2 * n_pairs, t))
    labels[torch.rand(2 * n_pairs, t) < ignore_frac] = -100
    if all_ignored_row:
        labels[-1] = -100
    rewards = torch.randn(2 * n_pairs, dtype=torch.float64)
    ref = torch.randn(2 * n_pairs, dtype=torch.float64) * 3
    return hidden, weight, labels, rewards, ref


def check_case(
    backend,
    dtype,
    *,
    policy="sigmoid",
    with_ref=True,
    eps=0.0,
    margin=None,
    weights=None,
    bias=False,
    scale=1.0,
    softcap=None,
    avg=False,
    gamma=0.0,
    n_pairs=3,
    t=5,
    d=12,
    v=37,
    grad_in_forward=None,
    with_rewards=True,
    all_ignored_row=True,
    alpha=0.2,
    reward_weight=1.0,
    beta=0.1,
    center=0.0,
):
    hidden, weight, labels, rewards, ref = make_batch(n_pairs, t, d, v, dtype, all_ignored_row=all_ignored_row)
    b = torch.randn(v, dtype=torch.float64).to(dtype) if bias else None
    ref = ref if with_ref else None
    rewards = rewards if with_rewards else None
    kw = dict(
        beta=beta,
        alpha=alpha,
        reward_weight=reward_weight,
        policy=policy,
        gamma=gamma,
        avg=avg,
        margin=margin,
        eps=eps,
        weights=weights,
        scale=scale,
        softcap=softcap,
        center=center,
    )

    leaves_ref = [hidden.double().requires_grad_(), weight.double().requires_grad_()]
    if b is not None:
        leaves_ref.append(b.double().requires_grad_())
    r_ref = None if rewards is None else rewards.clone().requires_grad_()
    want = naive_haf(
        leaves_ref[0], leaves_ref[1], labels, r_ref, ref, bias=leaves_ref[2] if b is not None else None, **kw
    )
    up = torch.randn(()).double()
    want_grads = torch.autograd.grad(want["loss"] * up, leaves_ref + ([r_ref] if r_ref is not None else []))

    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    if b is not None:
        leaves.append(b.clone().requires_grad_())
    r_in = None if rewards is None else rewards.to(torch.float32 if dtype != torch.float64 else dtype)
    r_in = None if r_in is None else r_in.requires_grad_()
    out = hk.fused_haf_loss(
        leaves[0],
        leaves[1],
        labels,
        r_in,
        None if ref is None else ref.float() if dtype != torch.float64 else ref,
        beta=beta,
        alpha=alpha,
        reward_weight=reward_weight,
        policy_loss=policy,
        simpo_gamma=gamma,
        average_log_prob=avg,
        reward_margin=margin,
        label_smoothing=eps,
        pair_weights=weights,
        lm_head_bias=leaves[2] if b is not None else None,
        logit_scale=scale,
        softcap=softcap,
        backend=backend,
        grad_in_forward=grad_in_forward,
        center_rewards_coefficient=center,
    )
    got_grads = torch.autograd.grad(out.loss * up.to(out.loss.dtype), leaves + ([r_in] if r_in is not None else []))
    err = tol(dtype) * (10 if dtype == torch.float16 else 1)
    for key, value in want.items():
        got = getattr(out, key)
        assert got is not None, key
        assert torch.isfinite(got).all(), key
        if "accuracy" in key:
            continue  # sign of a near-zero margin may differ in low precision
        assert rel_err(got, value) < err + 1e-6 * (dtype != torch.float64), (key, rel_err(got, value))
    if dtype == torch.float64:
        for key in ("implicit_accuracy", "reward_accuracy"):
            if key in want:
                assert float(getattr(out, key)) == pytest.approx(float(want[key]))
    for got, want_g in zip(got_grads, want_grads):
        assert torch.isfinite(got).all()
        assert rel_err(got, want_g) < err * 5 + 1e-6 * (dtype != torch.float64), rel_err(got, want_g)
    return out


CASES = [(b, dt) for b in BACKENDS for dt in DTYPES[b]]
GRID = [(p, r, e) for p, r, e in itertools.product(POLICIES, [True, False], [0.0, 0.1]) if not (p == "simpo" and r)]


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("policy,with_ref,eps", GRID)
@pytest.mark.parametrize("grad_in_forward", [True, False])
def test_policy_grid(backend, dtype, policy, with_ref, eps, grad_in_forward):
    check_case(
        backend,
        dtype,
        policy=policy,
        with_ref=with_ref,
        eps=eps,
        gamma=0.3 if policy == "simpo" else 0.0,
        grad_in_forward=grad_in_forward,
    )


OPTION_SETS = {
    "margin-scalar": dict(margin=0.5),
    "margin-tensor": dict(margin=torch.tensor([0.1, -0.2, 1.0], dtype=torch.float64)),
    "weights": dict(weights=torch.tensor([1.0, 0.0, 2.5], dtype=torch.float64)),
    "bias": dict(bias=True),
    "scale": dict(scale=0.6),
    "softcap": dict(softcap=2.0, scale=1.5),
    "avg": dict(avg=True),
    "everything": dict(
        margin=torch.tensor([0.3, 0.0, -0.5], dtype=torch.float64),
        eps=0.2,
        bias=True,
        scale=1.3,
        softcap=3.0,
        weights=torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64),
        avg=True,
    ),
    "no-rewards": dict(with_rewards=False),
    "dpo-as-rm": dict(reward_weight=0.0),
    "center-rewards": dict(center=0.05, weights=torch.tensor([1.0, 0.0, 2.5], dtype=torch.float64)),
}


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_options(backend, dtype, name):
    opts = dict(OPTION_SETS[name])
    for key in ("margin", "weights"):
        if torch.is_tensor(opts.get(key)) and dtype != torch.float64:
            opts[key] = opts[key].float()
    check_case(backend, dtype, **opts)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "shape", [(1, 1, 4, 5), (1, 6, 8, 1), (2, 1, 8, 257), (4, 7, 3, 1000)], ids=["one-pair-T1", "V1", "T1", "V1000"]
)
def test_odd_shapes(backend, shape):
    n_pairs, t, d, v = shape
    check_case(backend, torch.float32, n_pairs=n_pairs, t=t, d=d, v=v, all_ignored_row=n_pairs > 1 or t > 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_row_is_zero_not_nan(backend):
    out = check_case(backend, torch.float32, avg=True, all_ignored_row=True)
    assert out.rejected_logps[-1] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_pair_weights_zero_gives_zero_loss(backend):
    hidden, weight, labels, rewards, _ = make_batch(2, 4, 8, 11, torch.float32)
    hidden.requires_grad_()
    out = hk.fused_haf_loss(hidden, weight, labels, rewards.float(), pair_weights=torch.zeros(2), backend=backend)
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert (hidden.grad == 0).all()


def test_ref_logps_gradient_and_detached_outputs():
    hidden, weight, labels, rewards, ref = make_batch(3, 5, 8, 17, torch.float64)
    for gif in (True, False):
        ref_leaf = ref.clone().requires_grad_()
        h = hidden.clone().requires_grad_()
        out = hk.fused_haf_loss(h, weight, labels, rewards, ref_leaf, backend="torch", grad_in_forward=gif)
        (g_ref,) = torch.autograd.grad(out.loss, [ref_leaf])
        want = naive_haf(
            hidden,
            weight,
            labels,
            rewards,
            ref_leaf,
            beta=0.1,
            alpha=0.2,
            reward_weight=1.0,
            policy="sigmoid",
            gamma=0.0,
            avg=False,
            margin=None,
            eps=0.0,
            weights=None,
            bias=None,
            scale=1.0,
            softcap=None,
        )
        (want_g,) = torch.autograd.grad(want["loss"], [ref_leaf])
        assert rel_err(g_ref, want_g) < 1e-10
        assert out.chosen_logps.requires_grad is (not gif)


def test_no_grad_path_and_module():
    hidden, weight, labels, rewards, ref = make_batch(2, 4, 8, 11, torch.float32)
    module = hk.HafLoss(beta=0.2, alpha=0.5, policy_loss="ipo", backend="torch")
    with torch.no_grad():
        a = module(hidden, weight, labels, rewards.float(), ref.float())
    b = hk.fused_haf_loss(
        hidden, weight, labels, rewards.float(), ref.float(), beta=0.2, alpha=0.5, policy_loss="ipo", backend="torch"
    )
    assert torch.allclose(a.loss, b.loss) and "ipo" in repr(module)
    assert isinstance(a, hk.HafLossOutput)


def test_reward_only_accuracy_and_margin_semantics():
    """BT uses r_c − r_r − margin; the reported reward_margin is r_c − r_r."""
    hidden, weight, labels, _, _ = make_batch(2, 3, 4, 7, torch.float64)
    rewards = torch.tensor([2.0, -1.0, 1.0, 0.0], dtype=torch.float64)
    out = hk.fused_haf_loss(
        hidden,
        weight,
        labels,
        rewards,
        alpha=0.0,
        reward_margin=torch.tensor([0.5, 0.0], dtype=torch.float64),
        backend="torch",
    )
    m = torch.tensor([1.0 - 0.5, -1.0], dtype=torch.float64)
    assert out.loss.item() == pytest.approx((-F.logsigmoid(m)).mean().item())
    assert out.reward_margin.tolist() == [1.0, -1.0]
    assert out.reward_accuracy.item() == 0.5
    assert math.isfinite(out.policy_loss.item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("upstream", [1.0, 2.5, 0.0])
def test_fused_gradients_scale_with_the_upstream_gradient(backend, upstream):
    """grad_in_forward=True finishes the gradients in the forward; backward scales them by the upstream scalar
    (skipped when it is exactly 1): ``(c·loss).backward()`` gives c times the gradients of ``loss.backward()``."""
    hidden, weight, labels, rewards, ref = make_batch(2, 4, 8, 19, torch.float64)
    grads = []
    for c in (None, upstream):
        h, w, r, rf = (x.clone().requires_grad_() for x in (hidden, weight, rewards, ref))
        out = hk.fused_haf_loss(h, w, labels, r, ref_logps=rf, backend=backend, grad_in_forward=True)
        (out.loss if c is None else out.loss * c).backward()
        grads.append([x.grad for x in (h, w, r, rf)])
    for plain, scaled in zip(*grads, strict=True):
        torch.testing.assert_close(scaled, plain * upstream, rtol=1e-12, atol=0)
