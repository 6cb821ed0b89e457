"""Triton backend on a real GPU: accuracy in bf16/fp16/fp32/fp64, LLM-sized shapes, determinism, memory.

Marked ``gpu``; skipped without CUDA (run ``bash benchmarks/gpu_suite.sh OUT_DIR`` on a GPU machine). Small
cases compare with the float64 reference; the large case (N = 8192, D = 4096, V = 128256) with a float32
reference computed in token chunks (the full float64 logits would not fit). Gradients are checked both for
N(0, 1) upstream gradients and at the scale the HaF loss really sends back: g = α·β·σ(·)/B ≈ 6e-4 per token
(α = 0.2, β = 0.1, B = 16 pairs), where fp16 products g·p fall below fp16's smallest subnormal.
"""

from __future__ import annotations

import os

import pytest
import torch

import haf_kernels as hk
from haf_kernels import backends
from haf_kernels.backends import reference
from haf_kernels.options import LogprobOptions

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") == "1", reason="TRITON_INTERPRET=1: kernels would not compile"
    ),
]

CUDA = torch.device("cuda")
SMALL_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
LOSS_SCALE_G = 6e-4  # α·β·σ/B with α = 0.2, β = 0.1, σ ≈ 0.5, B = 16 pairs
LARGE_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def _kernels():
    if not backends.is_available("triton"):
        pytest.skip("triton backend unavailable: " + backends.unavailable_reasons().get("triton", ""))
    from haf_kernels.backends.triton import linear_logprobs_bwd, linear_logprobs_fwd

    return linear_logprobs_fwd, linear_logprobs_bwd


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    denom = b.norm().item()
    return (a - b).norm().item() / denom if denom > 0 else (a - b).norm().item()


def make_inputs(n, v, d, dtype, *, bias=False, ignore_frac=0.3, strided=False, scale=1.0):
    hidden = torch.randn(n, d, device=CUDA) * scale
    weight = torch.randn(v, d, device=CUDA) / d**0.5
    if strided:
        h2 = torch.empty(n, 2 * d, device=CUDA, dtype=dtype)[:, ::2]
        w2 = torch.empty(d, v, device=CUDA, dtype=dtype).T
        hidden, weight = h2.copy_(hidden), w2.copy_(weight)
    else:
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    labels = torch.randint(0, v, (n,), device=CUDA)
    labels[torch.rand(n, device=CUDA) < ignore_frac] = -100
    b = torch.randn(v, device=CUDA).to(dtype) if bias else None
    return hidden, weight, labels, b


def reference_fp64(hidden, weight, labels, bias, opts, grad):
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    b = None if bias is None else bias.detach().double().requires_grad_(True)
    logp = reference.linear_logprobs(h, w, labels, b, opts)
    logp.backward(grad.double())
    return logp.detach(), h.grad, w.grad, None if b is None else b.grad


@torch.no_grad()
def reference_fp32_chunked(hidden, weight, labels, opts, grad, chunk=512):
    """logp, dH, dW in fp32, one token chunk of full-vocab logits at a time (no bias)."""
    w = weight.float()
    logp = torch.zeros(hidden.shape[0], device=CUDA)
    dh = torch.zeros(hidden.shape, device=CUDA)
    dw = torch.zeros(weight.shape, device=CUDA)
    for t0 in range(0, hidden.shape[0], chunk):
        h = hidden[t0 : t0 + chunk].float()
        y = labels[t0 : t0 + chunk]
        g = grad[t0 : t0 + chunk].float()
        z = reference.logits(h, w, None, opts)
        live = y != opts.ignore_index
        safe = torch.where(live, y, torch.zeros_like(y))
        lsm = z.log_softmax(-1)
        logp[t0 : t0 + chunk] = torch.where(live, lsm.gather(1, safe[:, None])[:, 0], 0.0)
        g = torch.where(live, g, 0.0)
        dz = -lsm.exp_().mul_(g[:, None])
        dz[torch.arange(len(y), device=CUDA), safe] += g
        if opts.softcap is not None:
            dz *= 1 - (z / opts.softcap) ** 2
        dz *= opts.logit_scale
        dh[t0 : t0 + chunk] = dz @ w
        dw.addmm_(dz.T, h)
        del z, lsm, dz
    return logp, dh, dw


DTYPES = [torch.bfloat16, torch.float16, torch.float32]
ALL_DTYPES = DTYPES + [torch.float64]


def loss_scale_grad(n: int) -> torch.Tensor:
    """Upstream gradient of the token log-probs at the HaF loss's real scale: ≈ 6e-4, ±10 % per token."""
    return LOSS_SCALE_G * (1 + 0.1 * torch.randn(n, device=CUDA))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "n,v,d,kw",
    [
        (1, 1, 16, {}),
        (7, 5, 24, {}),
        (33, 37, 40, dict(bias=True)),
        (130, 257, 72, dict(bias=True, ignore_frac=0.0)),
        (300, 1000, 96, dict(strided=True)),
        (257, 3001, 200, dict(bias=True, strided=True)),
    ],
)
@pytest.mark.parametrize("scale,softcap", [(1.0, None), (0.6, 4.0)])
def test_small_vs_fp64(dtype, n, v, d, kw, scale, softcap):
    fwd, bwd = _kernels()
    opts = LogprobOptions(logit_scale=scale, softcap=softcap)
    hidden, weight, labels, b = make_inputs(n, v, d, dtype, scale=2.0, **kw)
    grad = torch.randn(n, device=CUDA)
    ref_logp, ref_dh, ref_dw, ref_db = reference_fp64(hidden, weight, labels, b, opts, grad)
    logp, lse = fwd(hidden, weight, labels, b, opts)
    assert torch.isfinite(logp).all() and torch.isfinite(lse).all()
    assert rel(logp, ref_logp) < SMALL_TOL[dtype]
    dh, dw, db = bwd(grad, hidden, weight, labels, b, lse, opts, (True, True, True))
    for got, want in ((dh, ref_dh), (dw, ref_dw), (db, ref_db)):
        if want is None:
            continue
        assert torch.isfinite(got).all()
        assert rel(got, want) < SMALL_TOL[dtype], rel(got, want)


@pytest.mark.parametrize(
    "n,v,d,kw,softcap",
    [(7, 5, 24, {}, None), (130, 257, 72, dict(bias=True), 4.0), (257, 3001, 200, dict(bias=True, strided=True), None)],
)
def test_fp64_vs_fp64(n, v, d, kw, softcap):
    """fp64 inputs (fp64 accumulators and tl.dot): logp and every gradient within 1e-10 of the reference."""
    fwd, bwd = _kernels()
    dtype = torch.float64
    opts = LogprobOptions(logit_scale=0.6 if softcap else 1.0, softcap=softcap)
    hidden, weight, labels, b = make_inputs(n, v, d, dtype, scale=2.0, **kw)
    grad = torch.randn(n, device=CUDA, dtype=dtype)
    ref_logp, ref_dh, ref_dw, ref_db = reference_fp64(hidden, weight, labels, b, opts, grad)
    logp, lse = fwd(hidden, weight, labels, b, opts)
    assert logp.dtype == torch.float64
    assert rel(logp, ref_logp) < SMALL_TOL[dtype]
    dh, dw, db = bwd(grad, hidden, weight, labels, b, lse, opts, (True, True, True))
    for got, want in ((dh, ref_dh), (dw, ref_dw), (db, ref_db)):
        if want is not None:
            assert got.dtype == torch.float64
            assert rel(got, want) < SMALL_TOL[dtype], rel(got, want)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_small_n_vocab_split(dtype):
    """Reference scoring: 4 tokens against a 128k vocabulary (auto split) and forced splits."""
    fwd, _ = _kernels()
    opts = LogprobOptions()
    hidden, weight, labels, _ = make_inputs(4, 128256, 256, dtype, ignore_frac=0.0)
    ref_logp, *_ = reference_fp64(hidden, weight, labels, None, opts, torch.zeros(4, device=CUDA))
    for splits in (None, 1, 7, 1000):
        logp, _ = fwd(hidden, weight, labels, None, opts, vocab_splits=splits)
        assert rel(logp, ref_logp) < SMALL_TOL[dtype], (splits, rel(logp, ref_logp))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_backward_multi_chunk_and_filter(dtype):
    fwd, bwd = _kernels()
    hidden, weight, labels, b = make_inputs(200, 5000, 128, dtype, bias=True)
    grad = torch.randn(200, device=CUDA)
    opts = LogprobOptions(chunk_vocab=512)
    ref_logp, ref_dh, ref_dw, ref_db = reference_fp64(hidden, weight, labels, b, opts, grad)
    _, lse = fwd(hidden, weight, labels, b, opts)
    for thr in (None, 1e-12):
        dh, dw, db = bwd(grad, hidden, weight, labels, b, lse, opts, (True, True, True), grad_filter=thr)
        for got, want in ((dh, ref_dh), (dw, ref_dw), (db, ref_db)):
            assert rel(got, want) < SMALL_TOL[dtype]


def test_gradient_filter_skips_tiles():
    fwd, bwd = _kernels()
    hidden, weight, labels, b = make_inputs(256, 4096, 128, torch.bfloat16, bias=True, ignore_frac=0.0)
    b[1024:] = -40.0  # 3/4 of the vocabulary with a negligible softmax
    labels %= 1024
    opts = LogprobOptions()
    grad = torch.randn(256, device=CUDA)
    _, lse = fwd(hidden, weight, labels, b, opts)
    off = bwd(grad, hidden, weight, labels, b, lse, opts, (True, True, True))
    on = bwd(grad, hidden, weight, labels, b, lse, opts, (True, True, True), grad_filter=1e-10)
    assert (on[1][1024:] == 0).all()
    for a, c in zip(on, off):
        assert rel(a, c) < 1e-2


@pytest.mark.parametrize(
    "dtype,n,g_kind",
    [(torch.bfloat16, 8192, "randn"), (torch.bfloat16, 8192, "loss-scale"), (torch.float32, 2048, "randn")],
    ids=["bf16-N8192", "bf16-N8192-loss-scale", "fp32-N2048"],
)
def test_large_llama3_shape(dtype, n, g_kind):
    """N tokens, D = 4096, V = 128256 (Llama-3 head) vs an fp32 chunked reference; logp, dH, dW (upstream
    gradient N(0, 1), or at the loss's real scale ≈ 6e-4)."""
    fwd, bwd = _kernels()
    v, d = 128256, 4096
    torch.manual_seed(0)
    hidden = torch.randn(n, d, device=CUDA, dtype=dtype)
    weight = (torch.randn(v, d, device=CUDA) / d**0.5).to(dtype)
    labels = torch.randint(0, v, (n,), device=CUDA)
    labels[torch.rand(n, device=CUDA) < 0.2] = -100
    grad = torch.randn(n, device=CUDA) if g_kind == "randn" else loss_scale_grad(n)
    opts = LogprobOptions()
    logp, lse = fwd(hidden, weight, labels, None, opts)
    dh, dw, _ = bwd(grad, hidden, weight, labels, None, lse, opts, (True, True, False))
    ref_logp, ref_dh, ref_dw = reference_fp32_chunked(hidden, weight, labels, opts, grad)
    tol = LARGE_TOL[dtype]
    assert rel(logp, ref_logp) < tol
    assert rel(dh, ref_dh) < tol
    assert rel(dw, ref_dw) < tol


def test_fp16_gradients_at_the_loss_scale_large_vocab():
    """fp16, V = 128256, upstream g ≈ 6e-4: every softmax entry p ≈ 1/V makes g·p ≈ 5e-9, below fp16's
    smallest subnormal (6e-8). dH and dW must still match the float64 reference, and non-target rows of dW
    must carry their (tiny but nonzero) gradient."""
    fwd, bwd = _kernels()
    n, v, d = 1024, 128256, 256
    opts = LogprobOptions()
    hidden, weight, labels, _ = make_inputs(n, v, d, torch.float16, ignore_frac=0.1)
    grad = loss_scale_grad(n)
    _, ref_dh, ref_dw, _ = reference_fp64(hidden, weight, labels, None, opts, grad)
    _, lse = fwd(hidden, weight, labels, None, opts)
    dh, dw, _ = bwd(grad, hidden, weight, labels, None, lse, opts, (True, True, False))
    assert torch.isfinite(dh).all() and torch.isfinite(dw).all()
    assert rel(dh, ref_dh) < SMALL_TOL[torch.float16], rel(dh, ref_dh)
    assert rel(dw, ref_dw) < SMALL_TOL[torch.float16], rel(dw, ref_dw)
    non_target = torch.ones(v, dtype=torch.bool, device=CUDA)
    non_target[labels[labels >= 0]] = False
    assert (dw[non_target] != 0).any(dim=1).float().mean() > 0.99


@pytest.mark.parametrize("grad_in_forward", [True, False], ids=["keep", "recompute"])
def test_fp16_haf_loss_at_real_scale(grad_in_forward):
    """The whole HaF loss in fp16 with B = 16 pairs (its own upstream gradient ≈ α·β·σ/B ≈ 6e-4 per token),
    V = 128256, both gradient paths, against the float64 reference loss on the same inputs."""
    _kernels()
    torch.manual_seed(3)
    pairs, t, d, v = 16, 64, 256, 128256
    hidden = torch.randn(2 * pairs, t, d, device=CUDA).half()
    weight = (torch.randn(v, d, device=CUDA) / d**0.5).half()
    labels = torch.randint(0, v, (2 * pairs, t), device=CUDA)
    labels[:, :16] = -100
    rewards = torch.randn(2 * pairs, device=CUDA)
    got, want = {}, {}
    for name, dt, be, gif in (("triton", None, "triton", grad_in_forward), ("ref", torch.float64, "reference", None)):
        h = (hidden if dt is None else hidden.to(dt)).detach().requires_grad_(True)
        w = (weight if dt is None else weight.to(dt)).detach().requires_grad_(True)
        out = hk.fused_haf_loss(h, w, labels, rewards, backend=be, grad_in_forward=gif)
        out.loss.backward()
        (got if name == "triton" else want).update(loss=out.loss.detach(), dh=h.grad, dw=w.grad)
    for key in ("loss", "dh", "dw"):
        assert torch.isfinite(got[key]).all(), key
        assert rel(got[key], want[key]) < SMALL_TOL[torch.float16], (key, rel(got[key], want[key]))


def test_deterministic_kernels():
    """The kernels twice on the same inputs: bitwise-equal logp, lse and gradients (no atomics anywhere)."""
    fwd, bwd = _kernels()
    hidden, weight, labels, b = make_inputs(1000, 50000, 512, torch.bfloat16, bias=True)
    grad = torch.randn(1000, device=CUDA)
    opts = LogprobOptions(chunk_vocab=8192)
    runs = []
    for _ in range(2):
        logp, lse = fwd(hidden, weight, labels, b, opts)
        runs.append((logp, lse, *bwd(grad, hidden, weight, labels, b, lse, opts, (True, True, True))))
    for a, c in zip(*runs):
        assert torch.equal(a, c)


@pytest.mark.parametrize(
    "grad_in_forward,grad_filter", [(None, None), (True, None), (False, None), (False, "1e-6")], ids=str
)
def test_deterministic_loss_and_grads(monkeypatch, grad_in_forward, grad_filter):
    """fused_haf_loss twice: bitwise-equal loss and gradients (default, keep, recompute, filtered recompute).

    The kernels are deterministic (test above); a failure here points at the O(B) composition (e.g. an
    atomic ``index_add_`` on CUDA when sequence sums are formed).
    """
    _kernels()
    if grad_filter is not None:
        monkeypatch.setenv("HAF_GRAD_FILTER", grad_filter)
    torch.manual_seed(1)
    b_pairs, t, d, v = 4, 256, 1024, 32000
    hidden = torch.randn(2 * b_pairs, t, d, device=CUDA, dtype=torch.bfloat16)
    weight = (torch.randn(v, d, device=CUDA) / d**0.5).to(torch.bfloat16)
    labels = torch.randint(0, v, (2 * b_pairs, t), device=CUDA)
    labels[:, :64] = -100
    rewards = torch.randn(2 * b_pairs, device=CUDA)
    runs = []
    for _ in range(2):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        out = hk.fused_haf_loss(h, w, labels, rewards, backend="triton", grad_in_forward=grad_in_forward)
        out.loss.backward()
        runs.append((out.loss.detach(), h.grad, w.grad))
    for name, a, c in zip(("loss", "dhidden", "dweight"), *runs):
        assert torch.equal(a, c), f"{name} differs between two identical runs"


def test_matches_torch_backend_through_loss():
    _kernels()
    torch.manual_seed(2)
    hidden = torch.randn(8, 128, 512, device=CUDA, dtype=torch.bfloat16)
    weight = (torch.randn(8000, 512, device=CUDA) / 512**0.5).to(torch.bfloat16)
    labels = torch.randint(0, 8000, (8, 128), device=CUDA)
    labels[:, :16] = -100
    rewards = torch.randn(8, device=CUDA)
    grads = {}
    for be in ("triton", "torch"):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        out = hk.fused_haf_loss(h, w, labels, rewards, backend=be, softcap=30.0)
        out.loss.backward()
        grads[be] = (out.loss.detach(), h.grad, w.grad)
    for a, c in zip(grads["triton"], grads["torch"]):
        assert rel(a, c) < 2e-2


def test_peak_memory_well_below_full_logits(monkeypatch):
    """Forward + backward at N=8192, D=4096, V=128256 (bf16): extra memory ≪ N·V·4 bytes of fp32 logits.

    With ``HAF_TRITON_DZ_MB=64`` (the dz chunk otherwise takes 1/8 of free memory, ≥ 512 MiB, by design)."""
    monkeypatch.setenv("HAF_TRITON_DZ_MB", "64")
    fwd, bwd = _kernels()
    n, v, d = 8192, 128256, 4096
    hidden = torch.randn(n, d, device=CUDA, dtype=torch.bfloat16)
    weight = (torch.randn(v, d, device=CUDA) / d**0.5).to(torch.bfloat16)
    labels = torch.randint(0, v, (n,), device=CUDA)
    grad = torch.randn(n, device=CUDA)
    opts = LogprobOptions()
    fwd(hidden, weight, labels, None, opts)  # warm-up / compile outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    logp, lse = fwd(hidden, weight, labels, None, opts)
    torch.cuda.synchronize()
    fwd_extra = torch.cuda.max_memory_allocated() - base
    dh, dw, _ = bwd(grad, hidden, weight, labels, None, lse, opts, (True, True, False))
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    full_logits = n * v * 4
    grads_out = dh.numel() * dh.element_size() + dw.numel() * dw.element_size()
    assert fwd_extra < full_logits / 100, (fwd_extra, full_logits)
    # beyond the gradients themselves: one vocab chunk of dz (HAF_TRITON_DZ_MB) + an fp32 [N, D] accumulator
    assert extra - grads_out < full_logits / 8, (extra, grads_out, full_logits)


def test_autotune_env(monkeypatch):
    fwd, _ = _kernels()
    monkeypatch.setenv("HAF_AUTOTUNE", "1")
    opts = LogprobOptions()
    hidden, weight, labels, _ = make_inputs(100, 3000, 128, torch.bfloat16)
    ref_logp, *_ = reference_fp64(hidden, weight, labels, None, opts, torch.zeros(100, device=CUDA))
    logp, _ = fwd(hidden, weight, labels, None, opts)
    assert rel(logp, ref_logp) < 2e-2
