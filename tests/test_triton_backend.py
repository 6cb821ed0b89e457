"""Triton backend vs the float64 reference, kernel by kernel (CPU interpreter; CUDA if present).

Run on CPU with ``TRITON_INTERPRET=1`` set before pytest starts (the kernels are decorated at import).
Shapes stay tiny: the interpreter executes every program in numpy. Each check reports
``‖out − ref‖/‖ref‖`` against ``backends/reference.py`` on float64 copies of the same inputs, with
random upstream gradients, fresh buffers pre-filled with NaN (so an unwritten element shows), odd shapes,
strided inputs, the small-N vocab-split path, multi-chunk backward and gradient filtering.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import TRITON_INTERPRET, needs_triton, peaked_inputs, torch_err_bound

from haf_kernels import backends, linear_logprobs
from haf_kernels.backends import reference
from haf_kernels.backends import triton as triton_backend
from haf_kernels.backends.triton import FP64_DOT_TRITON, parse_version
from haf_kernels.options import LogprobOptions

INTERPRET = TRITON_INTERPRET
pytestmark = needs_triton

if backends.is_available("triton"):
    from haf_kernels.backends.triton import linear_logprobs_bwd, linear_logprobs_fwd
    from haf_kernels.backends.triton._common import Tiles

DEVICE = torch.device("cuda" if torch.cuda.is_available() and not INTERPRET else "cpu")
TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2, torch.float64: 1e-10}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    denom = b.norm().item()
    return (a - b).norm().item() / denom if denom > 0 else (a - b).norm().item()


def skip_bf16_in_interpreter(dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16 and INTERPRET:
        pytest.skip("the Triton interpreter's tl.dot multiplies raw bf16 bits (wrong); bf16 is covered by test_gpu.py")


@pytest.fixture
def nan_empty(monkeypatch):
    """Make ``torch.empty``/``empty_like`` return NaN-filled floating tensors, so unwritten outputs show."""
    real_empty, real_like = torch.empty, torch.empty_like

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def empty_like(*args, **kwargs):
        t = real_like(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)


def make_inputs(n, v, d, dtype, *, bias=False, ignore_frac=0.0, strided=False, ignore_index=-100):
    """hidden [n, d], weight [v, d], labels [n], bias [v]; ``strided`` gives non-contiguous hidden/weight."""
    hidden = torch.randn(n, d, dtype=dtype, device=DEVICE) * 0.5  # logits of order 1-3: a non-trivial softmax
    weight = torch.randn(v, d, dtype=dtype, device=DEVICE) * 0.5
    if strided:
        hidden = torch.randn(n, 2 * d + 3, dtype=dtype, device=DEVICE)[:, 1 : 2 * d + 1 : 2].copy_(hidden)
        weight = torch.randn(d, v, dtype=dtype, device=DEVICE).T.copy_(weight)  # [v, d], strides (1, v)
        assert not hidden.is_contiguous() and not weight.is_contiguous()
    labels = torch.randint(0, v, (n,), device=DEVICE)
    if ignore_frac > 0:
        labels[torch.rand(n, device=DEVICE) < ignore_frac] = ignore_index
    b = torch.randn(v, dtype=dtype, device=DEVICE) if bias else None
    return hidden, weight, labels, b


def reference_grads(hidden, weight, labels, bias, opts, grad):
    """float64 reference: (logp, lse, dh, dw, db) for upstream ``grad``."""
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    b = None if bias is None else bias.detach().double().requires_grad_(True)
    logp = reference.linear_logprobs(h, w, labels, b, opts)
    lse = reference.logits(h, w, b, opts).logsumexp(-1)
    logp.backward(grad.double())
    return logp.detach(), lse.detach(), h.grad, w.grad, None if b is None else b.grad


def check_backend(
    n,
    v,
    d,
    dtype,
    *,
    bias=False,
    scale=1.0,
    softcap=None,
    ignore_frac=0.0,
    strided=False,
    splits=None,
    chunk_vocab=None,
    grad_filter=None,
    needs=(True, True, True),
):
    skip_bf16_in_interpreter(dtype)
    opts = LogprobOptions(logit_scale=scale, softcap=softcap, chunk_vocab=chunk_vocab)
    hidden, weight, labels, b = make_inputs(n, v, d, dtype, bias=bias, ignore_frac=ignore_frac, strided=strided)
    grad = torch.randn(n, device=DEVICE)
    ref_logp, ref_lse, ref_dh, ref_dw, ref_db = reference_grads(hidden, weight, labels, b, opts, grad)

    logp, lse = linear_logprobs_fwd(hidden, weight, labels, b, opts, vocab_splits=splits)
    assert logp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert lse.dtype == torch.float64  # combined in float64, read by the backward as hi + lo
    assert logp.shape == lse.shape == (n,)
    assert torch.isfinite(logp).all() and torch.isfinite(lse).all()
    tol = TOL[dtype]
    assert rel(logp, ref_logp) < tol, rel(logp, ref_logp)
    live = labels != opts.ignore_index
    assert (logp[~live] == 0).all()
    assert rel(lse[live], ref_lse[live]) < tol

    dh, dw, db = linear_logprobs_bwd(grad, hidden, weight, labels, b, lse, opts, needs, grad_filter=grad_filter)
    for got, want, need, like in (
        (dh, ref_dh, needs[0], hidden),
        (dw, ref_dw, needs[1], weight),
        (db, ref_db, needs[2] and b is not None, b),
    ):
        if not need:
            assert got is None
            continue
        assert got.dtype == like.dtype and got.shape == like.shape
        assert torch.isfinite(got).all(), "NaN/inf in a gradient (unwritten element?)"
        assert rel(got, want) < tol, (rel(got, want), tol)
    return dh, dw, db


ODD_SHAPES = [  # (N, V, D)
    (1, 1, 16),
    (1, 5, 7),
    (6, 37, 24),
    (17, 257, 19),
    (40, 64, 48),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_odd_shapes(nan_empty, shape, dtype):
    check_backend(*shape, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "bias,scale,softcap", [(True, 1.0, None), (False, 0.37, None), (False, 1.0, 2.5), (True, 1.7, 4.0)]
)
def test_bias_scale_softcap(nan_empty, dtype, bias, scale, softcap):
    check_backend(23, 45, 36, dtype, bias=bias, scale=scale, softcap=softcap, ignore_frac=0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ignored_tokens(nan_empty, dtype):
    check_backend(37, 29, 20, dtype, bias=True, ignore_frac=0.3)


def test_all_tokens_ignored(nan_empty):
    opts = LogprobOptions()
    hidden, weight, labels, b = make_inputs(9, 13, 16, torch.float32, bias=True)
    labels.fill_(-100)
    logp, lse = linear_logprobs_fwd(hidden, weight, labels, b, opts)
    assert (logp == 0).all() and torch.isfinite(lse).all()
    dh, dw, db = linear_logprobs_bwd(torch.randn(9, device=DEVICE), hidden, weight, labels, b, lse, opts)
    assert (dh == 0).all() and (dw == 0).all() and (db == 0).all()


def test_custom_ignore_index(nan_empty):
    """A non-negative ignore_index (a real token id) is still ignored, in the kernels as well."""
    opts = LogprobOptions(ignore_index=3)
    hidden, weight, labels, _ = make_inputs(16, 11, 16, torch.float32)
    labels[::2] = 3
    grad = torch.randn(16, device=DEVICE)
    ref_logp, _, ref_dh, ref_dw, _ = reference_grads(hidden, weight, labels, None, opts, grad)
    logp, lse = linear_logprobs_fwd(hidden, weight, labels, None, opts)
    dh, dw, _ = linear_logprobs_bwd(grad, hidden, weight, labels, None, lse, opts)
    assert rel(logp, ref_logp) < 1e-5 and rel(dh, ref_dh) < 1e-5 and rel(dw, ref_dw) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_strided_inputs(nan_empty, dtype):
    check_backend(19, 41, 24, dtype, bias=True, softcap=3.0, strided=True, ignore_frac=0.2)


@pytest.mark.parametrize("splits", [2, 3, 9])
def test_small_n_vocab_split(nan_empty, splits):
    """Reference scoring shape: few tokens, the vocabulary split across programs and combined."""
    check_backend(2, 257, 24, torch.float32, bias=True, scale=0.8, softcap=5.0, splits=splits)


def test_vocab_split_matches_single(nan_empty):
    opts = LogprobOptions()
    hidden, weight, labels, _ = make_inputs(3, 150, 16, torch.float32)
    one = linear_logprobs_fwd(hidden, weight, labels, None, opts, vocab_splits=1)
    many = linear_logprobs_fwd(hidden, weight, labels, None, opts, vocab_splits=5)
    assert rel(many[0], one[0]) < 1e-6 and rel(many[1], one[1]) < 1e-6


def test_vocab_split_not_on_tile_boundaries(nan_empty):
    """Splits that end inside a vocab tile (the autotuned launch's ``v_per_split``): the overhang columns belong
    to the next split, so a label there must not be picked (as -inf) by the split whose last tile reaches it."""
    from conftest import torch_err_bound

    from haf_kernels.backends.triton.forward import linear_logprobs_fwd_kernel

    n, v, d, block_v, v_per_split = 16, 70, 24, 32, 20  # tiles [0,32) [20,52) [40,72) [60,92): all overhang
    hidden, weight, _, _ = make_inputs(n, v, d, torch.float32)
    labels = (torch.arange(n, device=DEVICE) * 4) % v  # 20..28, 40..48, 60: in an earlier split's overhang
    labels[3] = -100
    splits = -(-v // v_per_split)
    part = torch.empty(3, splits, n, device=DEVICE)
    linear_logprobs_fwd_kernel[(splits,)](
        hidden, weight, hidden, labels, part[0], part[1], part[2], n, v, d, v_per_split, splits, 1,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), -100, 1.0, 1.0,
        HAS_BIAS=False, HAS_SCALE=False, HAS_SOFTCAP=False, IS_FP64=False, DOT_PRECISION="ieee",
        BLOCK_N=16, BLOCK_V=block_v, BLOCK_D=16,
    )  # fmt: skip
    top = part[0].max(dim=0).values
    lse = top + torch.log((part[1] * torch.exp(part[0] - top)).sum(dim=0))
    live = labels != -100
    logp = (part[2].sum(dim=0) - lse)[live]
    z64 = hidden.double() @ weight.double().T
    want = (z64.gather(1, labels.clamp_min(0)[:, None])[:, 0] - z64.logsumexp(-1))[live]
    z32 = hidden @ weight.T  # plain PyTorch at the same dtype sets the tolerance
    torch_logp = (z32.gather(1, labels.clamp_min(0)[:, None])[:, 0] - z32.logsumexp(-1))[live]
    bound = torch_err_bound(rel(torch_logp, want), torch.float32)
    assert torch.isfinite(logp).all(), logp
    assert rel(logp, want) <= bound, (rel(logp, want), bound)
    assert rel(lse, z64.logsumexp(-1)) <= torch_err_bound(rel(z32.logsumexp(-1), z64.logsumexp(-1)), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_multi_chunk(nan_empty, dtype):
    """dz held one vocab chunk at a time: dH accumulated across chunks in fp32, dW/db written per chunk."""
    check_backend(21, 150, 20, dtype, bias=True, softcap=4.0, chunk_vocab=32, ignore_frac=0.2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_tile_sizes(nan_empty, dtype):
    """The sm90 table's tiles (128×128 logits, 64-wide D steps, 128-wide dH/dW tiles) on a problem smaller
    than one tile in N and D, with a partial last vocab tile."""
    skip_bf16_in_interpreter(dtype)
    tiles = Tiles(128, 128, 64, 128, 8, 3)
    opts = LogprobOptions(logit_scale=0.9, softcap=6.0)
    hidden, weight, labels, b = make_inputs(40, 300, 72, dtype, bias=True, ignore_frac=0.3)
    grad = torch.randn(40, device=DEVICE)
    ref_logp, _, ref_dh, ref_dw, ref_db = reference_grads(hidden, weight, labels, b, opts, grad)
    logp, lse = linear_logprobs_fwd(hidden, weight, labels, b, opts, tiles=tiles)
    got = linear_logprobs_bwd(grad, hidden, weight, labels, b, lse, opts, tiles=tiles)
    assert rel(logp, ref_logp) < TOL[dtype]
    for g, want in zip(got, (ref_dh, ref_dw, ref_db)):
        assert torch.isfinite(g).all() and rel(g, want) < TOL[dtype]


@pytest.mark.parametrize("group", ["1", "2", "3"])
def test_grouped_program_order(nan_empty, monkeypatch, group):
    """Programs mapped to (token tile, vocab split / vocab tile / D tile) in groups of rows, as on a GPU."""
    monkeypatch.setenv("HAF_TRITON_GROUP", group)
    check_backend(50, 100, 24, torch.float32, bias=True, splits=3, chunk_vocab=64, ignore_frac=0.2)


def test_partial_needs(nan_empty):
    check_backend(12, 40, 16, torch.float32, bias=True, needs=(False, True, False))
    check_backend(12, 40, 16, torch.float32, bias=True, needs=(True, False, True))


def test_gradient_filtering(nan_empty):
    """Filtering off vs a tiny threshold vs a threshold that skips tiles; dbias is never filtered."""
    n, v, d = 32, 96, 16
    opts = LogprobOptions(chunk_vocab=64)
    hidden, weight, labels, b = make_inputs(n, v, d, torch.float32, bias=True)
    b[64:] -= 30.0  # the last vocab tiles get a negligible softmax: their |dz| < 1e-10
    grad = torch.randn(n, device=DEVICE)
    labels = labels % 64
    _, _, ref_dh, ref_dw, ref_db = reference_grads(hidden, weight, labels, b, opts, grad)
    _, lse = linear_logprobs_fwd(hidden, weight, labels, b, opts)
    off = linear_logprobs_bwd(grad, hidden, weight, labels, b, lse, opts)
    on = linear_logprobs_bwd(grad, hidden, weight, labels, b, lse, opts, grad_filter=1e-8)
    for got_off, got_on, want in zip(off, on, (ref_dh, ref_dw, ref_db)):
        assert torch.isfinite(got_on).all()
        assert rel(got_off, want) < 1e-5 and rel(got_on, want) < 1e-5
    # skipped tiles leave exact zeros in dW (unfiltered they are tiny but non-zero)
    assert (on[1][64:] == 0).all() and (off[1][64:] != 0).any()
    # a threshold above every |dz| skips every tile: dH and dW vanish, dbias (fp32 column sums) does not
    dh, dw, db = linear_logprobs_bwd(grad, hidden, weight, labels, b, lse, opts, grad_filter=1e9)
    assert (dh == 0).all() and (dw == 0).all() and rel(db, ref_db) < 1e-5


def test_grad_filter_env(monkeypatch):
    from haf_kernels.backends.triton import grad_filter_threshold

    monkeypatch.delenv("HAF_GRAD_FILTER", raising=False)
    assert grad_filter_threshold(LogprobOptions()) is None
    monkeypatch.setenv("HAF_GRAD_FILTER", "1e-6")
    assert grad_filter_threshold(LogprobOptions()) == 1e-6
    monkeypatch.setenv("HAF_GRAD_FILTER", "abc")
    with pytest.raises(ValueError, match="HAF_GRAD_FILTER"):
        grad_filter_threshold(LogprobOptions())


def test_deterministic(nan_empty):
    opts = LogprobOptions(chunk_vocab=32)
    hidden, weight, labels, b = make_inputs(24, 70, 20, torch.float32, bias=True)
    grad = torch.randn(24, device=DEVICE)
    runs = []
    for _ in range(2):
        logp, lse = linear_logprobs_fwd(hidden, weight, labels, b, opts)
        runs.append((logp, lse, *linear_logprobs_bwd(grad, hidden, weight, labels, b, lse, opts)))
    for a, c in zip(*runs):
        assert torch.equal(a, c)


@pytest.mark.parametrize("case", ["plain", "softcap"])
@pytest.mark.parametrize("path", ["recompute", "keep"])
def test_peaked_rows_as_accurate_as_torch(path, case):
    """On peaked rows (the target ~20 above the rest, lse ≈ 20) the Triton paths are as accurate as plain fp32
    PyTorch (conftest's one rule): lse is combined in float64 and read as hi + lo, so the target's ``1 − p`` is not
    lost to one fp32 rounding of lse (which alone is ~1e-6 absolute there, against ``1 − p`` of 1e-5)."""
    h, w, y = (t.to(DEVICE) for t in peaked_inputs(48, 600, 32, target_logit=20.0))
    scale, cap = (1.0, None) if case == "plain" else (0.9, 30.0)
    opts = LogprobOptions(logit_scale=scale, softcap=cap)
    g = torch.randn(48, dtype=torch.float64, device=DEVICE)
    rlogp, _, rdh, rdw, _ = reference_grads(h, w, y, None, opts, g)
    hf, wf = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    tlogp = reference.linear_logprobs(hf, wf, y, None, opts)  # plain fp32 PyTorch on the same inputs
    tlogp.backward(g.float())
    if path == "keep":
        logp, lse, kept = triton_backend.forward_keep(h, w, y, None, opts)
        dh, dw, _ = triton_backend.backward_saved(kept, g.float(), h, w, y, None, lse, opts, (True, True, False))
    else:
        logp, lse = triton_backend.forward(h, w, y, None, opts)
        dh, dw, _ = triton_backend.backward(g.float(), h, w, y, None, lse, opts, (True, True, False))
    for name, out, ref, base in (("logp", logp, rlogp, tlogp), ("dh", dh, rdh, hf.grad), ("dw", dw, rdw, wf.grad)):
        err, terr = rel(out, ref), rel(base, ref)
        bound = torch_err_bound(terr, torch.float32)
        assert err <= bound, f"{path} {case} {name}: rel err {err:.2e} > {bound:.2e} (torch fp32 {terr:.2e})"


FP64_OK = torch.float64 in triton_backend.CAPABILITIES.dtypes  # Triton >= 3.5 (declared_dtypes)


def test_float64(nan_empty):
    if not FP64_OK:  # Triton < 3.5 has no fp64 tl.dot: the launcher refuses, naming the version it needs
        with pytest.raises(TypeError, match=r"float64.*triton >= 3\.5"):
            check_backend(13, 37, 20, torch.float64, bias=True, ignore_frac=0.2)
        return
    check_backend(13, 37, 20, torch.float64, bias=True, ignore_frac=0.2)


def test_gradcheck_float64():
    hidden, weight, labels, b = make_inputs(5, 11, 6, torch.float64, bias=True, ignore_frac=0.2)
    hidden, weight, b = (t.detach().requires_grad_(True) for t in (hidden, weight, b))

    def f(h, w, bb):
        return linear_logprobs(h, w, labels, bias=bb, logit_scale=0.5, softcap=3.0, backend="triton")

    if not FP64_OK:  # the backend does not declare float64 there: refused before any kernel runs
        with pytest.raises(TypeError, match=r"does not compute float64.*triton >= 3\.5"):
            f(hidden, weight, b)
        return
    assert torch.autograd.gradcheck(f, (hidden, weight, b), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_through_autograd_function(dtype):
    """``linear_logprobs(backend="triton")`` (compacts ignored rows first) vs the reference, random grad."""
    hidden, weight, labels, b = make_inputs(18, 33, 24, dtype, bias=True, ignore_frac=0.3)
    grad = torch.randn(18, device=DEVICE)
    ref_logp, _, ref_dh, ref_dw, ref_db = reference_grads(hidden, weight, labels, b, LogprobOptions(), grad)
    h, w, bb = (t.detach().requires_grad_(True) for t in (hidden, weight, b))
    logp = linear_logprobs(h, w, labels, bias=bb, backend="triton")
    logp.backward(grad)
    tol = TOL[dtype]
    assert rel(logp, ref_logp) < tol
    assert rel(h.grad, ref_dh) < tol and rel(w.grad, ref_dw) < tol and rel(bb.grad, ref_db) < tol


def test_autotune_env_ignored_in_interpreter(monkeypatch, nan_empty):
    if not INTERPRET:
        pytest.skip("checks the interpreter path only")
    monkeypatch.setenv("HAF_AUTOTUNE", "1")
    check_backend(9, 20, 16, torch.float32)


def test_launcher_rejects_bad_shapes():
    opts = LogprobOptions()
    h = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        linear_logprobs_fwd(h, torch.randn(5, 7, device=DEVICE), torch.zeros(4, dtype=torch.long), None, opts)
    with pytest.raises(ValueError, match="labels"):
        linear_logprobs_fwd(h, torch.randn(5, 8, device=DEVICE), torch.zeros(3, dtype=torch.long), None, opts)
    with pytest.raises(TypeError, match="dtype"):
        linear_logprobs_fwd(h, torch.randn(5, 8, device=DEVICE).double(), torch.zeros(4, dtype=torch.long), None, opts)


def test_zero_tokens():
    opts = LogprobOptions()
    h, w = torch.randn(0, 8, device=DEVICE), torch.randn(5, 8, device=DEVICE)
    y = torch.zeros(0, dtype=torch.long, device=DEVICE)
    logp, lse = linear_logprobs_fwd(h, w, y, None, opts)
    assert logp.shape == lse.shape == (0,)
    dh, dw, db = linear_logprobs_bwd(logp, h, w, y, None, lse, opts, (True, True, True))
    assert dh.shape == (0, 8) and (dw == 0).all() and db is None


_AOT_SCRIPT = r"""
import importlib, inspect, json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
F = importlib.import_module("haf_kernels.backends.triton.forward")
B = importlib.import_module("haf_kernels.backends.triton.backward")
C = importlib.import_module("haf_kernels.backends.triton._common")
K = importlib.import_module("haf_kernels.backends.triton.keep")
T = importlib.import_module("haf_kernels.backends.triton")
DTYPES = ("bf16", "fp32") + (("fp64",) if torch.float64 in T.CAPABILITIES.dtypes else ())  # fp64 dot: Triton >= 3.5
ONE = {"stride_hd", "stride_wd"}  # what the JIT specialises for contiguous rows
DIV16 = {"D", "chunk", "stride_hn", "stride_wv", "v_per_split", "v_start", "N", "V", "n"}
FLOAT_ARGS = {"logit_scale", "softcap", "threshold"}

NEW_API = "constexprs" in inspect.signature(ASTSource.__init__).parameters  # Triton >= 3.3

def build(fn, consts, ptr_types, arch, tiles):
    def typ(n):
        return ptr_types.get(n, "fp32" if n in FLOAT_ARGS else "i32")

    div = [i for i, n in enumerate(fn.arg_names) if n not in consts and (n.endswith("_ptr") or n in DIV16)]
    if NEW_API:
        consts = dict(consts, **{n: 1 for n in fn.arg_names if n in ONE})
        sig = {n: "constexpr" if n in consts else typ(n) for n in fn.arg_names}
        src = ASTSource(fn, sig, constexprs=consts, attrs={(i,): [["tt.divisibility", 16]] for i in div})
    else:  # Triton 3.2: signature and constants by name, the hints (16-divisible, equal to 1) as a descriptor
        from triton.backends.compiler import AttrsDescriptor
        sig = {n: typ(n) for n in fn.arg_names if n not in consts}
        hints = {**{i: 16 for i in div}, **{i: 1 for i, n in enumerate(fn.arg_names) if n in ONE}}
        consts = dict(consts, **{n: 1 for n in fn.arg_names if n in ONE})
        src = ASTSource(fn, sig, constants=consts, attrs=AttrsDescriptor.from_hints(hints))
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": tiles.num_warps, "num_stages": getattr(tiles, "num_stages", 3)})
    ttgir = k.asm.get("ttgir", "")
    return {"kernel": fn.__name__, "arch": arch, "shared": k.metadata.shared,
            "tensor_cores": "warp_group_dot" in ttgir or "nvidia_mma" in ttgir,
            "filter": consts.get("FILTER", False), "pipelined": "async_copy_global_to_local" in ttgir}

out = []
for arch in (80, 90):
    for dname in DTYPES:  # fp64: the fp64 accumulators need tl.dot(..., out_dtype=acc.dtype)
        fp64 = dname == "fp64"
        kind = "half" if dname == "bf16" else "fp32"
        t = C._FP64 if fp64 else C._TABLE[("sm90" if arch == 90 else "sm80", kind)]
        acc = "*fp64" if fp64 else "*fp32"
        io = "*" + dname
        prec = "tf32" if dname == "bf16" else "ieee"
        flags = dict(HAS_BIAS=True, HAS_SCALE=True, HAS_SOFTCAP=True, IS_FP64=fp64, DOT_PRECISION=prec)
        filt = arch == 90
        ptrs = dict(h_ptr=io, w_ptr=io, b_ptr=io, y_ptr="*i64", max_ptr=acc, sum_ptr=acc, tgt_ptr=acc,
                    g_ptr=acc, lse_ptr=acc, dz_ptr=io, dbp_ptr=acc, flag_ptr="*i8", acc_ptr=acc, out_ptr=io,
                    gn_ptr=acc, gmax_ptr=acc, z_ptr=io, list_ptr="*i32", cnt_ptr="*i32")
        rt = K._GPU_ROW_TILES
        row = dict(HAS_SCALE=True, HAS_SOFTCAP=True, IS_FP64=fp64, BLOCK_R=rt.block_r, BLOCK_V=rt.block_v)
        res = [
            build(F.linear_logprobs_fwd_kernel, dict(flags, BLOCK_N=t.block_n, BLOCK_V=t.block_v,
                  BLOCK_D=t.block_d), ptrs, arch, t),
            build(B.linear_logprobs_bwd_dlogits_kernel, dict(flags, FILTER=filt, BLOCK_N=t.block_n,
                  BLOCK_V=t.block_v, BLOCK_D=t.block_d), ptrs, arch, t),
            build(B.linear_logprobs_bwd_dh_kernel, dict(ACCUMULATE=True, FINAL=True, FILTER=filt, IS_FP64=fp64,
                  DOT_PRECISION=prec, BLOCK_N=t.block_n, BLOCK_K=t.block_v, BLOCK_D=t.block_d_out), ptrs, arch, t),
            build(B.linear_logprobs_bwd_dw_kernel, dict(FILTER=filt, IS_FP64=fp64, DOT_PRECISION=prec,
                  BLOCK_V=t.block_v, BLOCK_K=t.block_n, BLOCK_D=t.block_d_out), ptrs, arch, t),
        ]
        if arch == 90:  # the keep row kernels: plain loads/stores and reductions, nothing arch-specific
            res += [build(K.keep_lse_kernel, row, ptrs, arch, rt),
                    build(K.keep_grad_kernel, dict(row, HAS_BIAS=True), ptrs, arch, rt)]
        for r in res:
            r["dtype"] = dname
        out += res
print("AOT-RESULT " + json.dumps({"triton": triton.__version__, "dtypes": DTYPES, "kernels": out}))
"""


def test_kernels_compile_for_sm80_sm90():
    """Compile every kernel to cubin for sm80 and sm90 with the local Triton (ptxas runs without a GPU).

    Catches code that only the GPU code path rejects (the interpreter runs anything numpy can), checks that
    the tile table fits shared memory, and that bf16 uses tensor cores. Skipped where the installed
    Triton lacks the AOT API used here or its bundled ptxas.
    """
    import json
    import subprocess
    import sys

    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"this Triton has no ASTSource/GPUTarget AOT API: {exc}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("AOT-RESULT ")]
    if proc.returncode != 0 or not line:
        err = proc.stderr[-3000:]
        if "ptxas" in err and ("not found" in err or "No such file" in err):
            pytest.skip("no ptxas bundled with this Triton")
        if "TypeError" in err and "ASTSource" in err:
            pytest.skip("this Triton's ASTSource signature differs")
        pytest.fail(f"AOT compile failed:\n{err}")
    got = json.loads(line[0][len("AOT-RESULT ") :])
    results = got["kernels"]
    if parse_version(got["triton"]) >= FP64_DOT_TRITON:
        assert "fp64" in got["dtypes"], got["dtypes"]  # fp64 compiled wherever this Triton has an fp64 tl.dot
    assert len(results) == 10 * len(got["dtypes"])  # (4 kernels × sm80/sm90 + 2 keep row kernels × sm90) × dtypes
    pipelines = parse_version(got["triton"]) >= (3, 3)  # Triton 3.2 leaves the filtered sm90 dW loop unpipelined
    for r in results:
        limit = 227 * 1024 if r["arch"] == 90 else 163 * 1024
        assert r["shared"] <= limit, r
        if r["dtype"] == "bf16" and not r["kernel"].startswith("keep_"):  # the keep row kernels have no dot
            assert r["tensor_cores"], r
        if r["dtype"] == "bf16" and r["kernel"].endswith(("_dh_kernel", "_dw_kernel")) and pipelines:
            # the K loops are software-pipelined (async copies), with gradient filtering too (sm90 builds use
            # FILTER=True): the filtered loops walk lists of kept tiles instead of branching inside the loop
            assert r["pipelined"], r


@pytest.mark.parametrize("g_scale", [1e-4, 6e-4])
def test_fp16_gradients_at_the_real_loss_scale(nan_empty, g_scale):
    """fp16 at the upstream gradient the HaF loss really sends (α·β·σ/B ≈ 1e-4) and a vocab where softmax
    entries are ~1/V: g·p is below fp16's smallest subnormal (6e-8), so a dz stored as g·(onehot − p) in fp16
    loses every non-target entry (dW rows of non-targets all 0). Stored unscaled, with g applied in fp32, dH and
    dW stay within the fp16 tolerance of the float64 reference."""
    n, v, d = 16, 4096, 16
    opts = LogprobOptions()
    hidden, weight, labels, _ = make_inputs(n, v, d, torch.float16)
    grad = torch.full((n,), g_scale, device=DEVICE) * (1 + 0.1 * torch.randn(n, device=DEVICE))
    _, _, ref_dh, ref_dw, _ = reference_grads(hidden, weight, labels, None, opts, grad)
    _, lse = linear_logprobs_fwd(hidden, weight, labels, None, opts)
    dh, dw, _ = linear_logprobs_bwd(grad, hidden, weight, labels, None, lse, opts, (True, True, False))
    assert rel(dh, ref_dh) < TOL[torch.float16], rel(dh, ref_dh)
    assert rel(dw, ref_dw) < TOL[torch.float16], rel(dw, ref_dw)
    non_target = torch.ones(v, dtype=torch.bool, device=DEVICE)
    non_target[labels] = False
    assert (dw[non_target] != 0).any(dim=1).float().mean() > 0.99  # non-target rows carry their gradient


@pytest.mark.parametrize(
    "smem, row",
    [(232448, "sm90"), (166912, "sm80"), (101376, "default"), (65536, "default")],  # H100, A100, sm_120, T4
)
def test_tiles_follow_shared_memory_not_major_version(monkeypatch, smem, row):
    """The tile table is indexed by the device's shared memory: an sm_120 card (major 12, 99 KB) gets the
    default tiles, not sm_90's (which need up to 192 KB)."""
    from haf_kernels.backends.triton import _common as C

    monkeypatch.setattr(C, "shared_memory_bytes", lambda device: smem)
    monkeypatch.setattr(C, "interpreting", lambda: False)
    cuda = torch.device("cuda", 0)
    assert C._arch(cuda) == row
    tiles = C.tiles_for(torch.bfloat16, cuda, LogprobOptions().tuning)
    assert tiles == C._TABLE[(row, "half")]


GiB, MiB = 1 << 30, 1 << 20


@pytest.mark.parametrize(
    "free, n, vocab, elem, want",
    [
        (80 * GiB, 16384, 128256, 2, 128256),  # 1/8 of 80 GiB → capped at 4 GiB: the whole vocabulary, one chunk
        (24 * GiB, 16384, 128256, 2, 98304),  # 3 GiB / (16384 · 2 B) = 98304 columns: 2 chunks
        (2 * GiB, 16384, 128256, 2, 16384),  # 1/8 = 256 MiB → the 512 MiB floor: 16384 columns, 8 chunks
        (600 * MiB, 16384, 128256, 2, 9600),  # never more than half of what is free: 300 MiB → 9600 columns
        (None, 16384, 128256, 2, 2048),  # off CUDA: 64 MiB → 2048 columns (the minimum)
        (None, 100, 50000, 4, 50048),  # off CUDA, small N: 64 MiB holds the whole (tile-rounded) vocabulary
        (80 * GiB, 8192, 256000, 2, 256000),  # Gemma-2 2B head at N = 8192: one chunk
    ],
)
def test_dz_chunk_from_free_memory(free, n, vocab, elem, want):
    """The backward's vocab chunk as a pure function of free device memory, N, V and the element size."""
    from haf_kernels.backends.triton.backward import dz_vocab_chunk

    assert dz_vocab_chunk(n, vocab, elem, 128, free_bytes=free) == want


def test_dz_chunk_knob_and_chunk_vocab_override(monkeypatch):
    """``HAF_TRITON_DZ_MB`` sets the budget whatever the free memory; ``chunk_vocab`` wins over both."""
    import importlib

    B = importlib.import_module("haf_kernels.backends.triton.backward")  # the module, not the backend's function
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(B.memory, "free_device_bytes", lambda device: 80 * GiB)
    monkeypatch.delenv("HAF_TRITON_DZ_MB", raising=False)
    assert B._vocab_chunk(16384, 128256, 2, 128, LogprobOptions(), cuda) == 128256
    monkeypatch.setenv("HAF_TRITON_DZ_MB", "256")
    assert B._vocab_chunk(16384, 128256, 2, 128, LogprobOptions(), cuda) == 8192  # 256 MiB / 32 KiB per column
    assert B._vocab_chunk(16384, 128256, 2, 128, LogprobOptions(chunk_vocab=1000), cuda) == 896  # whole tiles
    monkeypatch.setenv("HAF_TRITON_DZ_MB", "1")
    assert B._vocab_chunk(16384, 128256, 2, 128, LogprobOptions(), cuda) == 2048  # never below 2048 columns
    monkeypatch.undo()
    assert B.memory.free_device_bytes(torch.device("cpu")) is None  # off CUDA: the small default (2048 columns here)
    assert B._vocab_chunk(16384, 128256, 2, 128, LogprobOptions(), torch.device("cpu")) == 2048


@pytest.mark.parametrize(
    "n_regs, num_warps, shared, limits, want",
    [
        (255, 8, 0, {}, 1),  # 255 regs × 256 threads = the whole 64K-register file
        (232, 8, 0, {}, 1),  # 232 → 7424 regs per warp: 8 warps fit, one CTA of 8
        (232, 4, 0, {}, 2),
        (128, 4, 0, {}, 4),  # 4096 regs per warp → 16 warps → 4 CTAs of 4
        (32, 4, 0, {}, 16),  # thread limit: 2048 / 128
        (32, 1, 0, {}, 32),  # CTA limit
        (64, 4, 100 * 1024, {}, 2),  # shared memory: 228 KiB / (100 KiB + 1 KiB reserved)
        (64, 4, 96 * 1024, dict(smem_per_sm=167936), 1),  # A100: 164 KiB per SM
        (168, 8, 0, dict(regs_per_sm=32768), 1),  # never 0: a compiled kernel fits at least once
    ],
)
def test_ctas_per_sm(n_regs, num_warps, shared, limits, want):
    from haf_kernels.backends.triton._common import SmLimits, ctas_per_sm

    assert ctas_per_sm(n_regs, num_warps, shared, SmLimits(**limits)) == want


def test_forward_grid_from_occupancy(monkeypatch):
    """The forward's vocab splits fill ``resident CTAs × SMs``; off CUDA / in the interpreter the assumption (2)."""
    import importlib

    C = importlib.import_module("haf_kernels.backends.triton._common")
    F = importlib.import_module("haf_kernels.backends.triton.forward")
    assert C.resident_ctas(F.linear_logprobs_fwd_kernel, tuple, {}, torch.device("cpu"), ("k",)) == 2
    monkeypatch.setattr(F, "interpreting", lambda: False)
    monkeypatch.setattr(F, "num_sms", lambda device: 132)
    cuda = torch.device("cuda", 0)
    assert F._choose_splits(128, 1002, cuda, ctas_per_sm=1) == 2  # 132 programs over 128 token tiles
    assert F._choose_splits(128, 1002, cuda, ctas_per_sm=2) == 3
    assert F._choose_splits(1, 1002, cuda, ctas_per_sm=1) == 132  # reference scoring: one token tile
    assert F._choose_splits(1, 40, cuda, ctas_per_sm=4) == 40  # never more splits than vocab tiles


def test_kept_tile_lists():
    """Kept columns first, in increasing order, and their count, per row (what the filtered K loops walk)."""
    from haf_kernels.backends.triton.backward import kept_tile_lists

    flags = torch.tensor([[0, 1, 0, 1, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.int8)
    lists, counts = kept_tile_lists(flags)
    assert counts.tolist() == [3, 0, 5] and lists.dtype == counts.dtype == torch.int32
    assert lists[0, :3].tolist() == [1, 3, 4] and lists[2].tolist() == [0, 1, 2, 3, 4]
    lists_t, counts_t = kept_tile_lists(flags.T)
    assert counts_t.tolist() == [1, 2, 1, 2, 2] and lists_t[1, :2].tolist() == [0, 2]


@pytest.fixture
def tile_census(monkeypatch):
    """Record (kept, total) tiles of every ``kept_tile_lists`` call of the backward."""
    import importlib

    B = importlib.import_module("haf_kernels.backends.triton.backward")
    real, seen = B.kept_tile_lists, []

    def census(flags):
        lists, counts = real(flags)
        seen.append((int(counts.sum()), flags.numel()))
        return lists, counts

    monkeypatch.setattr(B, "kept_tile_lists", census)
    return seen


def test_filtered_gradients_within_the_threshold_bound(nan_empty, tile_census):
    """Filtering skips tiles (the census shows it) and moves dH / dW by no more than the threshold allows: a skipped
    tile has every |s| ≤ thr, so |ΔdH[t, :]| ≤ thr·|g_t|·Σ_v |W[v, :]| and |ΔdW[v, :]| ≤ thr·Σ_t |g_t|·|H[t, :]|.
    Three vocab chunks, the last one narrower than the others (its flag columns must not be read stale)."""
    n, v, d, thr = 40, 80, 16, 2e-3
    opts = LogprobOptions(chunk_vocab=64)  # chunks of 2 tiles (interpreter BLOCK_V = 32): [0, 64), [64, 80)
    hidden, weight, labels, b = make_inputs(n, v, d, torch.float32, bias=True)
    b[40:] -= 8.0  # small but not negligible probabilities from column 40 on: the last tile of each chunk ...
    labels = labels % 32  # ... holds no target, so those tiles fall under the threshold (tile [32, 64) does not)
    grad = torch.randn(n, device=DEVICE)
    _, lse = linear_logprobs_fwd(hidden, weight, labels, b, opts)
    off = linear_logprobs_bwd(grad, hidden, weight, labels, b, lse, opts)
    on = linear_logprobs_bwd(grad, hidden, weight, labels, b, lse, opts, grad_filter=thr)
    kept = sum(k for k, _ in tile_census[::2])  # the dH lists (the dW lists hold the same tiles, transposed)
    total = sum(t for _, t in tile_census[::2])
    assert 0 < kept < total, tile_census
    dh_bound = thr * grad.abs()[:, None] * weight.abs().sum(0)[None, :]
    dw_bound = thr * (grad.abs()[:, None] * hidden.abs()).sum(0)[None, :]
    slack = 1e-6
    assert ((on[0] - off[0]).abs() <= dh_bound + slack * off[0].abs().max()).all()
    assert ((on[1] - off[1]).abs() <= dw_bound + slack * off[1].abs().max()).all()
    assert torch.equal(on[2], off[2])  # dbias is never filtered
    assert not torch.equal(on[0], off[0])  # something was skipped


def test_filter_that_must_not_skip_is_exact(nan_empty, tile_census):
    """A threshold below every |onehot − p| keeps every tile: bitwise the unfiltered gradients."""
    n, v, d = 24, 80, 16
    opts = LogprobOptions(chunk_vocab=64)
    hidden, weight, labels, b = make_inputs(n, v, d, torch.float32, bias=True)
    grad = torch.randn(n, device=DEVICE)
    _, lse = linear_logprobs_fwd(hidden, weight, labels, b, opts)
    off = linear_logprobs_bwd(grad, hidden, weight, labels, b, lse, opts)
    on = linear_logprobs_bwd(grad, hidden, weight, labels, b, lse, opts, grad_filter=1e-30)
    assert tile_census and all(k == t for k, t in tile_census)
    for a, c in zip(on, off):
        assert torch.equal(a, c)
