"""Kernel inputs that would give a silent wrong answer: NaN/Inf (``check_finite``), double backward through the
fused ops, and bf16 under the Triton CPU interpreter."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import BACKENDS

from haf_kernels import HafLoss, fused_haf_loss, linear_logprobs
from haf_kernels.validate import NonFiniteInputError


def logprob_inputs(n=6, d=8, v=37, dtype=torch.float32):
    h = torch.randn(n, d, dtype=dtype, requires_grad=True)
    w = torch.randn(v, d, dtype=dtype, requires_grad=True)
    y = torch.randint(0, v, (n,))
    return h, w, y


def haf_inputs(b=2, t=5, d=8, v=37, dtype=torch.float32):
    h = torch.randn(2 * b, t, d, dtype=dtype, requires_grad=True)
    w = torch.randn(v, d, dtype=dtype, requires_grad=True)
    y = torch.randint(0, v, (2 * b, t))
    y[:, :2] = -100
    r = torch.randn(2 * b, requires_grad=True)
    ref = torch.randn(2 * b)
    return h, w, y, r, ref


def poison(t: torch.Tensor, index: tuple, value: float) -> torch.Tensor:
    t = t.detach().clone()
    t[index] = value
    return t.requires_grad_(True)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_check_finite_names_the_argument_linear_logprobs(backend):
    h, w, y = logprob_inputs()
    assert torch.isfinite(linear_logprobs(h, w, y, backend=backend, check_finite=True)).all()
    bad_w = poison(w, (3, 1), float("nan"))
    assert torch.isnan(linear_logprobs(h, bad_w, y, backend=backend)).any()  # default: no check, NaN out
    with pytest.raises(
        NonFiniteInputError, match=r"weight \[37, 8\] has 1 NaN and 0 Inf values \(first at index \(3, 1\)\)"
    ):
        linear_logprobs(h, bad_w, y, backend=backend, check_finite=True)
    bad_h = poison(h, (0, 0), float("inf"))
    bias = torch.zeros(37)
    bias[5] = float("-inf")
    with pytest.raises(
        NonFiniteInputError, match=r"hidden \[6, 8\] has 0 NaN and 1 Inf.*; bias \[37\] has 0 NaN and 1 Inf"
    ):
        linear_logprobs(bad_h, w, y, bias=bias, backend=backend, check_finite=True)


@pytest.mark.parametrize("name", ["hidden", "lm_head_weight", "rewards", "ref_logps", "reward_margin"])
def test_check_finite_names_the_argument_fused_haf_loss(name):
    h, w, y, r, ref = haf_inputs()
    margin = torch.zeros(2)
    args = dict(hidden=h, lm_head_weight=w, labels=y, rewards=r, ref_logps=ref, reward_margin=margin)
    target = args[name]
    bad = target.detach().clone()
    if name == "hidden":
        bad[1, 3, 2] = float("nan")  # a scored token (labels[:, :2] are ignored)
    else:
        bad.view(-1)[1] = float("nan")
    args[name] = bad
    assert not torch.isfinite(fused_haf_loss(**args).loss)  # silent NaN without the check
    with pytest.raises(NonFiniteInputError, match=rf"^{name} \[[0-9, ]+\] has 1 NaN"):
        fused_haf_loss(**args, check_finite=True)
    with pytest.raises(NonFiniteInputError, match=rf"^{name} "):
        HafLoss(check_finite=True)(**args)


def test_check_finite_ignores_rows_that_do_not_reach_the_loss():
    """NaN hidden states of ignored tokens (padding: some attention kernels give NaN there) are not an error."""
    h, w, y, r, ref = haf_inputs()
    h = poison(h, (0, 1), float("nan"))  # token 1 of row 0 is ignored
    out = fused_haf_loss(h, w, y, r, ref, check_finite=True)
    assert torch.isfinite(out.loss)
    flat_y = y.reshape(-1)
    logp = linear_logprobs(h.reshape(-1, 8), w, flat_y, check_finite=True)
    assert torch.isfinite(logp).all()
    with pytest.raises(
        NonFiniteInputError, match=r"hidden \[4, 5, 8\] has 8 NaN .*rows that reach the loss.*\(2, 4, 0\)"
    ):
        fused_haf_loss(poison(h, (2, 4), float("nan")), w, y, r, ref, check_finite=True)


def test_check_finite_scalar_margin_and_clean_inputs():
    h, w, y, r, ref = haf_inputs()
    out = fused_haf_loss(h, w, y, r, ref, reward_margin=0.5, check_finite=True)
    assert torch.isfinite(out.loss)
    with pytest.raises(NonFiniteInputError, match=r"reward_margin is inf"):
        fused_haf_loss(h, w, y, r, ref, reward_margin=float("inf"), check_finite=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_in_forward", [False, True])
def test_double_backward_is_a_clear_error(backend, grad_in_forward):
    h, w, y, r, ref = haf_inputs()
    out = fused_haf_loss(h, w, y, r, backend=backend, grad_in_forward=grad_in_forward)
    (gh,) = torch.autograd.grad(out.loss, h, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through (fused_haf_loss|linear_logprobs) is not supported"):
        gh.pow(2).sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_linear_logprobs(backend):
    h, w, y = logprob_inputs()
    logp = linear_logprobs(h, w, y, backend=backend)
    gw = torch.autograd.grad(logp.sum(), w, create_graph=True)[0]
    with pytest.raises(RuntimeError, match="double backward through linear_logprobs is not supported"):
        torch.autograd.grad(gw.sum(), h)


@pytest.mark.parametrize("backend", BACKENDS)
def test_create_graph_first_order_unchanged(backend):
    """create_graph=True without a second differentiation still gives the right first-order gradient."""
    h, w, y = logprob_inputs()
    (g1,) = torch.autograd.grad(linear_logprobs(h, w, y, backend=backend).sum(), h)
    (g2,) = torch.autograd.grad(linear_logprobs(h, w, y, backend=backend).sum(), h, create_graph=True)
    torch.testing.assert_close(g2.detach(), g1)


def test_reference_supports_double_backward():
    h, w, y = logprob_inputs(dtype=torch.float64)
    (gh,) = torch.autograd.grad(linear_logprobs(h, w, y, backend="reference").sum(), h, create_graph=True)
    gh.pow(2).sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or "triton" not in BACKENDS, reason="interpreter only")
def test_bf16_refused_under_the_triton_interpreter():
    h, w, y = logprob_inputs(dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16.*TRITON_INTERPRET=1"):
        linear_logprobs(h, w, y, backend="triton")
    hh, ww, yy, r, _ = haf_inputs(dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16.*TRITON_INTERPRET=1"):
        fused_haf_loss(hh, ww, yy, r, backend="triton")
