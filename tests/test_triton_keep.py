"""Triton keep-logits path (3 GEMMs): ``forward_keep`` / ``backward_saved`` and ``fused_haf_loss`` on it.

Under ``TRITON_INTERPRET=1`` (set before pytest starts) in fp32 and fp16 (the interpreter's bf16 ``tl.dot`` is wrong;
the row kernels have no dot, but the GEMMs of bf16 on CPU are not what a GPU runs, so bf16 is left to GPU tests).
Every result is compared with the float64 reference on fresh random inputs with random upstream gradients, under
the repo's rule: error ≤ ``TORCH_ERR_FACTOR`` × the error of plain PyTorch at the same dtype + a floor
(``tests/conftest.py``). A dispatch-mode counter checks that the keep path does exactly 3 GEMM passes per chunk and
the recompute path 4.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import TRITON_INTERPRET, needs_triton, rel_err, torch_err_bound
from torch.utils._python_dispatch import TorchDispatchMode

import haf_kernels as hk
from haf_kernels import backends, losses
from haf_kernels.backends import reference
from haf_kernels.options import LogprobOptions

INTERPRET = TRITON_INTERPRET
pytestmark = needs_triton
if backends.is_available("triton"):
    from haf_kernels.backends import triton as tb
    from haf_kernels.backends.triton import keep as keep_mod

DEVICE = torch.device("cuda" if torch.cuda.is_available() and not INTERPRET else "cpu")
DTYPES = [torch.float32, torch.float16]


@pytest.fixture
def nan_empty(monkeypatch):
    """``torch.empty`` returns NaN-filled floating tensors, so an unwritten output element shows."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)


def plain_logprobs(hidden, weight, labels, bias, opts):
    """Plain PyTorch at the inputs' dtype: the eager ``lm_head`` GEMM in that dtype, then an fp32 log-softmax."""
    z = F.linear(hidden, weight, bias).float()
    z = z * opts.logit_scale
    if opts.softcap is not None:
        z = opts.softcap * torch.tanh(z / opts.softcap)
    valid = labels != opts.ignore_index
    logp = z.log_softmax(-1).gather(-1, labels.clamp_min(0)[:, None])[:, 0]
    return torch.where(valid, logp, torch.zeros_like(logp))


def grads_of(fn, hidden, weight, bias, grad, *extra):
    """``(out, dh, dw, db)`` of ``fn(h, w, *extra, b, ...)`` by autograd with upstream ``grad``."""
    h = hidden.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(True)
    b = None if bias is None else bias.detach().requires_grad_(True)
    out = fn(h, w, b)
    out.backward(grad.to(out.dtype))
    return out.detach(), h.grad, w.grad, None if b is None else b.grad


def make(n, v, d, dtype, *, bias=False, ignore_frac=0.0):
    hidden = (torch.randn(n, d, dtype=torch.float64) * 0.5).to(dtype).to(DEVICE)
    weight = (torch.randn(v, d, dtype=torch.float64) * 0.5).to(dtype).to(DEVICE)
    labels = torch.randint(0, v, (n,), device=DEVICE)
    labels[torch.rand(n, device=DEVICE) < ignore_frac] = -100
    b = torch.randn(v, dtype=torch.float64).to(dtype).to(DEVICE) if bias else None
    return hidden, weight, labels, b


def check_keep(n, v, d, dtype, *, bias=False, scale=1.0, softcap=None, ignore_frac=0.0, accumulate=False):
    """``keep_forward`` + ``keep_backward`` vs float64, bound by plain PyTorch's error at ``dtype``."""
    opts = LogprobOptions(logit_scale=scale, softcap=softcap)
    hidden, weight, labels, b = make(n, v, d, dtype, bias=bias, ignore_frac=ignore_frac)
    grad = torch.randn(n, device=DEVICE)

    def ref_fn(h, w, bb):
        return reference.linear_logprobs(h, w, labels, bb, opts)

    def plain_fn(h, w, bb):
        return plain_logprobs(h, w, labels, bb, opts)

    f64 = [x.double() if x is not None else None for x in (hidden, weight, b)]
    want = grads_of(ref_fn, *f64, grad)
    plain = grads_of(plain_fn, hidden, weight, b, grad)

    logp, lse, saved = tb.forward_keep(hidden, weight, labels, b, opts)
    assert logp.dtype == torch.float32 and lse.dtype == torch.float64 and logp.shape == lse.shape == (n,)
    assert saved.dtype == keep_mod.keep_dtype(dtype) and saved.shape == (n, v)
    live = labels != -100
    assert (logp[~live] == 0).all()
    needs = (True, True, b is not None)
    dw0 = torch.randn(v, d, device=DEVICE) if accumulate else None
    db0 = torch.randn(v, device=DEVICE) if accumulate and b is not None else None
    dh, dw, db = tb.backward_saved(
        saved, grad, hidden, weight, labels, b, lse, opts, needs,
        dw_acc=None if dw0 is None else dw0.clone(), db_acc=None if db0 is None else db0.clone(),
    )  # fmt: skip
    assert dh.dtype == dtype and dw.dtype == torch.float32
    if accumulate:
        dw = dw - dw0
        db = None if db is None else db - db0
    got = (logp, dh, dw, db)
    for name, g, w, p in zip(("logp", "dh", "dw", "db"), got, want, plain):
        if w is None:
            assert g is None
            continue
        assert torch.isfinite(g).all(), name
        err, bound = rel_err(g, w), torch_err_bound(rel_err(p, w), dtype)
        assert err <= bound, (name, err, bound)
    return got


ODD = [(1, 1, 8), (1, 5, 7), (6, 37, 24), (17, 257, 19), (9, 64, 16)]  # (N, V, D): V off the 32-wide tile


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ODD, ids=lambda s: "x".join(map(str, s)))
def test_keep_odd_shapes(nan_empty, shape, dtype):
    check_keep(*shape, dtype, ignore_frac=0.2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias, scale, softcap", [(True, 1.0, None), (False, 0.5, None), (True, 1.7, 2.5)])
def test_keep_bias_scale_softcap(nan_empty, dtype, bias, scale, softcap):
    check_keep(13, 70, 20, dtype, bias=bias, scale=scale, softcap=softcap, ignore_frac=0.2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_keep_accumulates_into_given_buffers(nan_empty, dtype):
    check_keep(11, 45, 12, dtype, bias=True, accumulate=True)


def test_keep_all_ignored_and_empty(nan_empty):
    hidden, weight, labels, b = make(5, 33, 8, torch.float32, bias=True)
    labels[:] = -100
    opts = LogprobOptions()
    logp, lse, saved = tb.forward_keep(hidden, weight, labels, b, opts)
    assert (logp == 0).all() and torch.isfinite(lse).all()
    dh, dw, db = tb.backward_saved(saved, torch.randn(5), hidden, weight, labels, b, lse, opts, (True, True, True))
    assert (dh == 0).all() and (dw == 0).all() and (db == 0).all()
    logp, lse, saved = tb.forward_keep(hidden[:0], weight, labels[:0], b, opts)
    assert logp.shape == (0,)


@pytest.mark.parametrize("g_scale", [1e-4, 1e-6])
def test_keep_fp16_at_the_real_loss_scale(nan_empty, g_scale):
    """fp16 with the upstream gradient the loss really sends (~1e-4, and smaller): ``g·p`` for p ~ 1/V is below
    fp16's subnormals, so s is kept unscaled and g applied in fp32 (dW through g/gmax-scaled H rows)."""
    n, v, d = 16, 4096, 16
    opts = LogprobOptions()
    hidden, weight, labels, _ = make(n, v, d, torch.float16)
    grad = torch.full((n,), g_scale, device=DEVICE) * (1 + 0.1 * torch.randn(n, device=DEVICE))
    _, ref_dh, ref_dw, _ = grads_of(
        lambda h, w, bb: reference.linear_logprobs(h, w, labels, bb, opts), hidden.double(), weight.double(), None, grad
    )
    big = keep_mod.RowTiles(16, 512, 1)  # fewer, larger interpreter programs: V = 4096 stays fast
    logp, lse, saved = keep_mod.keep_forward(hidden, weight, labels, None, opts, tiles=big)
    dh, dw, _ = keep_mod.keep_backward(
        saved, grad, hidden, weight, labels, None, lse, opts, (True, True, False), tiles=big
    )
    # dH comes back in fp16: at g = 1e-6 its entries are fp16 subnormals, so the bound is the float64 result's own
    # rounding to fp16 (under the same rule), not a fixed tolerance; dW is fp32.
    assert rel_err(dh, ref_dh) <= torch_err_bound(rel_err(ref_dh.half(), ref_dh), torch.float16) + 2e-2
    assert rel_err(dw, ref_dw) < 2e-2, rel_err(dw, ref_dw)
    non_target = torch.ones(v, dtype=torch.bool, device=DEVICE)
    non_target[labels] = False
    assert (dw[non_target] != 0).any(dim=1).float().mean() > 0.99


# --- the whole loss -------------------------------------------------------------------------------------------


def haf_inputs(n_pairs, t, d, v, dtype, *, bias=False, ignore_frac=0.3):
    hidden = (torch.randn(2 * n_pairs, t, d, dtype=torch.float64) * 0.7).to(dtype).to(DEVICE)
    weight = (torch.randn(v, d, dtype=torch.float64) * 0.7).to(dtype).to(DEVICE)
    labels = torch.randint(0, v, (2 * n_pairs, t), device=DEVICE)
    labels[torch.rand(2 * n_pairs, t, device=DEVICE) < ignore_frac] = -100
    b = torch.randn(v, dtype=torch.float64).to(dtype).to(DEVICE) if bias else None
    ref = torch.randn(2 * n_pairs, dtype=torch.float64, device=DEVICE)
    return hidden, weight, labels, b, ref


def haf_grads(hidden, weight, bias, labels, ref, upstream, **kw):
    """``(loss, dh, dw, db)`` of ``upstream · fused_haf_loss(...).loss``."""
    h = hidden.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(True)
    b = None if bias is None else bias.detach().requires_grad_(True)
    out = hk.fused_haf_loss(h, w, labels, None, ref.to(h.dtype), lm_head_bias=b, alpha=1.0, beta=0.5, **kw)
    (out.loss * upstream).backward()
    return out.loss.detach(), h.grad, w.grad, None if b is None else b.grad


def plain_haf_loss(h, w, b, labels, ref, opts, beta=0.5):
    """The same policy loss in plain PyTorch at the inputs' dtype (eager lm_head, fp32 log-softmax)."""
    two_b, t, d = h.shape
    logp = plain_logprobs(h.reshape(-1, d), w, labels.reshape(-1), b, opts).view(two_b, t).double().sum(-1)
    k = two_b // 2
    dlt = (logp[:k] - ref[:k]) - (logp[k:] - ref[k:])
    return -F.logsigmoid(beta * dlt).mean()


def check_haf(dtype, *, n_pairs=3, t=5, d=12, v=37, bias=False, scale=1.0, softcap=None, all_ignored_pair=False):
    hidden, weight, labels, b, ref = haf_inputs(n_pairs, t, d, v, dtype, bias=bias)
    if all_ignored_pair:
        labels[0] = -100
        labels[n_pairs] = -100
    upstream = float(torch.rand(()) + 0.5)
    kw = dict(logit_scale=scale, softcap=softcap)
    got = haf_grads(hidden, weight, b, labels, ref, upstream, backend="triton", grad_in_forward=True, **kw)
    f64 = [x.double() if x is not None else None for x in (hidden, weight, b)]
    want = haf_grads(*f64, labels, ref, upstream, backend="reference", **kw)
    opts = LogprobOptions(logit_scale=scale, softcap=softcap)
    h = hidden.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(True)
    bb = None if b is None else b.detach().requires_grad_(True)
    plain_loss = plain_haf_loss(h, w, bb, labels, ref, opts)
    (plain_loss * upstream).backward()
    plain = (plain_loss.detach(), h.grad, w.grad, None if bb is None else bb.grad)
    for name, g, wt, p in zip(("loss", "dh", "dw", "db"), got, want, plain):
        if wt is None:
            assert g is None
            continue
        assert torch.isfinite(g).all(), name
        err, bound = rel_err(g, wt), torch_err_bound(rel_err(p, wt), dtype)
        assert err <= bound, (name, err, bound)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "case",
    [
        dict(),
        dict(v=257, d=19),
        dict(bias=True, scale=1.3, softcap=4.0),
        dict(n_pairs=1, t=1),
        dict(all_ignored_pair=True, bias=True),
    ],
    ids=["plain", "odd-V", "bias-scale-softcap", "single-token", "ignored-pair"],
)
def test_fused_haf_loss_keep_vs_reference(nan_empty, dtype, case):
    check_haf(dtype, **case)


def test_fused_haf_loss_one_pair_per_chunk(nan_empty, monkeypatch):
    """Several chunks (one pair each, one of them with no valid token): dW/db accumulate across chunks."""
    monkeypatch.setattr(losses, "pair_chunks", lambda labels, v, ii, tuning, **kw: [(p, p + 1) for p in range(3)])
    check_haf(torch.float32, bias=True, all_ignored_pair=True)


# --- GEMM passes ----------------------------------------------------------------------------------------------

_MM = {"mm", "bmm"}
_ADDMM = {"addmm", "addmm_", "baddbmm", "baddbmm_"}  # (bias/accumulator, a, b)


class GemmCounter(TorchDispatchMode):
    """Counts aten matmuls that touch a ``vocab``-sized dimension, in units of ``2·n·V·D`` flops too."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.calls: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in _MM or name in _ADDMM:
            a, b = (args[1], args[2]) if name in _ADDMM else (args[0], args[1])
            if self.vocab in tuple(a.shape) + tuple(b.shape):
                self.calls.append((name, tuple(a.shape), tuple(b.shape)))
        return func(*args, **(kwargs or {}))

    def flops(self) -> int:
        return sum(2 * a[-2] * a[-1] * b[-1] for _, a, b in self.calls)


_GEMM_KERNELS = (
    ("forward", "linear_logprobs_fwd_kernel"),
    ("backward", "linear_logprobs_bwd_dlogits_kernel"),
    ("backward", "linear_logprobs_bwd_dh_kernel"),
    ("backward", "linear_logprobs_bwd_dw_kernel"),
)


def count_gemm_kernels(monkeypatch) -> list[LaunchCounter]:
    """Replace the Triton kernels that contain a GEMM (forward, recompute, dH, dW) by launch counters."""
    counters = []
    for mod_name, name in _GEMM_KERNELS:
        mod = importlib.import_module(f"haf_kernels.backends.triton.{mod_name}")
        counter = LaunchCounter(getattr(mod, name))
        monkeypatch.setattr(mod, name, counter)
        counters.append(counter)
    return counters


class LaunchCounter:
    """Wraps a ``@triton.jit`` kernel and counts its launches (``kernel[grid](...)``)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def test_keep_path_does_three_gemms_per_chunk(monkeypatch):
    """Keep path (``grad_in_forward=None`` picks it on Triton now): per chunk exactly 3 matmuls with a V-sized
    operand — logits [n, V], dH (s·W), dW (sᵀ·H) — i.e. 3 × 2·n·V·D flops in all; no Triton GEMM kernel runs."""
    n_pairs, t, d, v = 3, 4, 8, 41
    hidden, weight, labels, _, ref = haf_inputs(n_pairs, t, d, v, torch.float32, ignore_frac=0.2)
    monkeypatch.setattr(losses, "pair_chunks", lambda labels, vv, ii, tuning, **kw: [(0, 2), (2, 3)])
    counters = count_gemm_kernels(monkeypatch)
    h = hidden.requires_grad_(True)
    w = weight.requires_grad_(True)
    with GemmCounter(v) as count:
        out = hk.fused_haf_loss(h, w, labels, None, ref.float(), backend="triton")  # grad_in_forward=None
        out.loss.backward()
    valid = (labels != -100).sum().item()
    assert len(count.calls) == 3 * 2, count.calls  # 2 chunks
    assert count.flops() == 3 * 2 * valid * v * d
    assert [c.launches for c in counters] == [0, 0, 0, 0]


def test_recompute_path_does_four_gemm_passes(monkeypatch):
    """Recompute path (``grad_in_forward=False``): the Triton forward kernel, then per vocab chunk the dlogits
    (recompute), dH and dW kernels — 4 GEMM passes with one vocab chunk, and no aten matmul with a V-sized operand."""
    n_pairs, t, d, v = 2, 4, 8, 41
    hidden, weight, labels, _, ref = haf_inputs(n_pairs, t, d, v, torch.float32, ignore_frac=0.2)
    counters = count_gemm_kernels(monkeypatch)
    h = hidden.requires_grad_(True)
    w = weight.requires_grad_(True)
    with GemmCounter(v) as count:
        out = hk.fused_haf_loss(h, w, labels, None, ref.float(), backend="triton", grad_in_forward=False)
        out.loss.backward()
    assert [c.launches for c in counters] == [1, 1, 1, 1]
    assert count.calls == []


def test_triton_declares_keep_logits():
    caps = backends.capabilities("triton")
    assert caps.keeps_logits
    assert callable(tb.forward_keep) and callable(tb.backward_saved)


def test_out_dtype_gemm_falls_back(nan_empty, monkeypatch):
    """Where ``torch.mm(..., out_dtype=float32)`` is rejected (as this CPU build does; a GPU build may too), the
    half-input GEMMs fall back once, for good, to a product in the input dtype added in fp32 — same results."""
    monkeypatch.setattr(keep_mod, "_NO_OUT_DTYPE", [])
    monkeypatch.setattr(keep_mod, "_out_dtype_ok", lambda device, dtype: not keep_mod._NO_OUT_DTYPE)
    monkeypatch.setattr(keep_mod, "_SLICE_BYTES", 64 * 12 * 2)  # several row slices in the fallback dW
    check_keep(9, 200, 12, torch.float16, bias=True, accumulate=True)
    assert keep_mod._NO_OUT_DTYPE  # the out_dtype path was tried and given up
