"""Property test: on random shapes and options every backend agrees with the float64 reference."""

from __future__ import annotations

import torch
from conftest import BACKENDS, rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import haf_kernels as hk
from haf_kernels import objectives


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_pairs=st.integers(1, 3),
    t=st.integers(1, 6),
    d=st.integers(1, 12),
    v=st.integers(1, 80),
    policy=st.sampled_from(objectives.names()),
    use_ref=st.booleans(),
    eps=st.sampled_from([0.0, 0.25]),
    softcap=st.sampled_from([None, 2.0]),
    scale=st.sampled_from([1.0, 0.5]),
    ignore_frac=st.sampled_from([0.0, 0.5, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_backends_agree(n_pairs, t, d, v, policy, use_ref, eps, softcap, scale, ignore_frac, seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * n_pairs, t, d, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, d, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, v, (2 * n_pairs, t), generator=gen)
    labels[torch.rand(2 * n_pairs, t, generator=gen) < ignore_frac] = -100
    rewards = torch.randn(2 * n_pairs, generator=gen, dtype=torch.float64)
    ref = (
        None
        if (objectives.get(policy).reference_free or not use_ref)
        else torch.randn(2 * n_pairs, generator=gen, dtype=torch.float64)
    )
    if objectives.get(policy).needs_label_smoothing:
        eps = 0.25  # exo_pair: log ε
    kw = dict(policy_loss=policy, label_smoothing=eps, softcap=softcap, logit_scale=scale)

    def run(backend, dtype):
        h = hidden.to(dtype).requires_grad_()
        w = weight.to(dtype).requires_grad_()
        out = hk.fused_haf_loss(
            h, w, labels, rewards.to(dtype), None if ref is None else ref.to(dtype), backend=backend, **kw
        )
        gh, gw = torch.autograd.grad(out.loss, [h, w])
        return out.loss.detach(), gh, gw

    want = run("reference", torch.float64)
    for backend in BACKENDS:
        got = run(backend, torch.float32)
        for a, b in zip(got, want):
            assert torch.isfinite(a).all()
            assert rel_err(a, b) < 1e-4 or (a.double() - b).abs().max() < 1e-5, backend
