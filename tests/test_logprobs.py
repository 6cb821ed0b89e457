"""linear_logprobs / sequence_logprobs on every backend against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from conftest import BACKENDS, DTYPES, rel_err, tol

import haf_kernels as hk
from haf_kernels import backends
from haf_kernels.backends import reference
from haf_kernels.options import LogprobOptions

CASES = [(b, dt) for b in BACKENDS for dt in DTYPES[b]]


def make_inputs(n, d, v, dtype, *, ignore_frac=0.3, bias=False, scale=1.0):
    hidden = (torch.randn(n, d, dtype=torch.float64) * scale).to(dtype)
    weight = (torch.randn(v, d, dtype=torch.float64) / d**0.5).to(dtype)
    labels = torch.randint(0, v, (n,))
    labels[torch.rand(n) < ignore_frac] = -100
    b = torch.randn(v, dtype=torch.float64).to(dtype) if bias else None
    return hidden, weight, labels, b


def reference_grads(hidden, weight, labels, bias, g, **kw):
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    b = None if bias is None else bias.detach().double().requires_grad_()
    out = hk.linear_logprobs(h, w, labels, bias=b, backend="reference", **kw)
    grads = torch.autograd.grad(out, [h, w] + ([b] if b is not None else []), g.double())
    return out.detach(), grads


def run_backend(backend, hidden, weight, labels, bias, g, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    b = None if bias is None else bias.detach().clone().requires_grad_()
    out = hk.linear_logprobs(h, w, labels, bias=b, backend=backend, **kw)
    grads = torch.autograd.grad(out, [h, w] + ([b] if b is not None else []), g.to(out.dtype))
    return out.detach(), grads


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("vocab", [1, 5, 37, 257, 1000])
def test_values_and_grads_odd_vocab(backend, dtype, vocab):
    n, d = 19, 24
    hidden, weight, labels, _ = make_inputs(n, d, vocab, dtype)
    g = torch.randn(n)
    out, grads = run_backend(backend, hidden, weight, labels, None, g)
    ref, ref_grads = reference_grads(hidden, weight, labels, None, g)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isfinite(out).all()
    assert (out[labels == -100] == 0).all()
    assert rel_err(out, ref) < tol(dtype)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == dtype and got.shape == want.shape
        assert torch.isfinite(got).all()
        assert rel_err(got, want) < tol(dtype) * (5 if dtype == torch.float16 else 1)


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize(
    "bias,logit_scale,softcap",
    [(True, 1.0, None), (False, 0.37, None), (False, 1.0, 2.5), (True, 1.7, 4.0)],
    ids=["bias", "scale", "softcap", "all"],
)
def test_bias_scale_softcap(backend, dtype, bias, logit_scale, softcap):
    n, d, v = 23, 16, 61
    hidden, weight, labels, b = make_inputs(n, d, v, dtype, bias=bias, scale=2.0)
    g = torch.randn(n)
    kw = dict(logit_scale=logit_scale, softcap=softcap)
    out, grads = run_backend(backend, hidden, weight, labels, b, g, **kw)
    ref, ref_grads = reference_grads(hidden, weight, labels, b, g, **kw)
    assert rel_err(out, ref) < tol(dtype)
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) < tol(dtype) * (5 if dtype == torch.float16 else 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_token_and_all_ignored(backend):
    hidden, weight, labels, _ = make_inputs(1, 8, 13, torch.float32, ignore_frac=0.0)
    g = torch.randn(1)
    out, grads = run_backend(backend, hidden, weight, labels, None, g)
    ref, ref_grads = reference_grads(hidden, weight, labels, None, g)
    assert rel_err(out, ref) < 1e-5 and all(rel_err(a, b) < 1e-5 for a, b in zip(grads, ref_grads))

    hidden, weight, labels, _ = make_inputs(7, 8, 13, torch.float32)
    labels[:] = -100
    out, grads = run_backend(backend, hidden, weight, labels, None, torch.randn(7))
    assert (out == 0).all()
    assert all((gr == 0).all() for gr in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_equals_contiguous(backend):
    n, d, v = 12, 20, 33
    big_h = torch.randn(n, 2 * d)
    hidden = big_h[:, ::2]  # strided view
    weight = torch.randn(d, v).T  # transposed view
    labels = torch.randint(0, v, (2 * n,))[::2]
    assert not hidden.is_contiguous() and not weight.is_contiguous() and not labels.is_contiguous()
    g = torch.randn(n)
    out, grads = run_backend(backend, hidden, weight, labels, None, g)
    out_c, grads_c = run_backend(backend, hidden.contiguous(), weight.contiguous(), labels.contiguous(), None, g)
    assert rel_err(out, out_c) < 1e-6
    assert all(rel_err(a, b) < 1e-6 for a, b in zip(grads, grads_c))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if torch.float64 in DTYPES[b]])
def test_gradcheck_float64(backend):
    n, d, v = 6, 5, 11
    hidden, weight, labels, b = make_inputs(n, d, v, torch.float64, bias=True)
    labels[0] = -100
    h = hidden.requires_grad_()
    w = weight.requires_grad_()
    bb = b.requires_grad_()

    def fn(h, w, bb):
        return hk.linear_logprobs(h, w, labels, bias=bb, backend=backend, softcap=3.0, logit_scale=0.8)

    assert torch.autograd.gradcheck(fn, (h, w, bb), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_torch_backend_chunking_matches_single_tile():
    """Tiny tiles (several token and vocab chunks, ragged last ones) give the single-tile result."""
    n, d, v = 37, 12, 101
    hidden, weight, labels, b = make_inputs(n, d, v, torch.float64, bias=True)
    mod = backends.get("torch")
    whole = mod.forward(hidden, weight, labels, b, LogprobOptions(chunk_tokens=n, chunk_vocab=v))
    tiled = mod.forward(hidden, weight, labels, b, LogprobOptions(chunk_tokens=5, chunk_vocab=17))
    assert rel_err(tiled[0], whole[0]) < 1e-12 and rel_err(tiled[1], whole[1]) < 1e-12
    g = torch.randn(n, dtype=torch.float64)
    full = mod.backward(g, hidden, weight, labels, b, whole[1], LogprobOptions(), (True, True, True))
    small = mod.backward(
        g, hidden, weight, labels, b, whole[1], LogprobOptions(chunk_tokens=4, chunk_vocab=9), (True, True, True)
    )
    assert all(rel_err(a, c) < 1e-12 for a, c in zip(small, full))


def test_chunk_env_override(monkeypatch):
    monkeypatch.setenv("HAF_CHUNK_TOKENS", "3")
    monkeypatch.setenv("HAF_CHUNK_VOCAB", "7")
    assert LogprobOptions().tile(100, 50) == (3, 7)
    monkeypatch.setenv("HAF_CHUNK_TOKENS", "zero")
    with pytest.raises(ValueError, match="HAF_CHUNK_TOKENS"):
        LogprobOptions().tile(100, 50)


def test_default_tile_bounds_memory():
    t, v = LogprobOptions().tile(1 << 20, 32000)
    assert t * v * 4 <= 64 * (1 << 20) and t >= 16 and v == 32000


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_logprobs(backend):
    s, t, d, v = 4, 9, 8, 29
    hidden = torch.randn(s, t, d)
    weight = torch.randn(v, d)
    labels = torch.randint(0, v, (s, t))
    labels[:, :3] = -100
    labels[2] = -100
    sums, counts = hk.sequence_logprobs(hidden, weight, labels, backend=backend)
    tok = reference.linear_logprobs(
        hidden.double().view(-1, d), weight.double(), labels.view(-1), None, LogprobOptions()
    )
    assert rel_err(sums, tok.view(s, t).sum(1)) < 1e-5
    assert counts.tolist() == (labels != -100).sum(1).tolist()
    assert sums[2] == 0 and not sums.requires_grad


def test_auto_backend_and_env_override(monkeypatch):
    cpu = torch.device("cpu")
    expected = "cpp" if backends.is_available("cpp") else "torch"
    monkeypatch.delenv("HAF_KERNELS_BACKEND", raising=False)
    assert backends.resolve("auto", cpu) == expected
    monkeypatch.setenv("HAF_KERNELS_BACKEND", "reference")
    assert backends.resolve("auto", cpu) == "reference"
    monkeypatch.setenv("HAF_KERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match="backend"):
        backends.resolve("auto", cpu)


def test_available_reports_every_backend():
    avail = backends.available()
    assert set(avail) == {"triton", "cpp", "torch", "reference"}
    assert avail["torch"] and avail["reference"]
    for name, why in backends.unavailable_reasons().items():
        assert not avail[name] and why


@pytest.mark.parametrize("backend", [b for b in BACKENDS if hasattr(backends.get(b), "forward_keep")])
def test_backward_saved_accumulates_into_buffers(backend):
    """backward_saved(..., dw_acc, db_acc) adds into the given buffers: acc + fresh == accumulated, same object."""
    mod = backends.get(backend)
    n, d, v = 41, 12, 77
    hidden, weight, labels, b = make_inputs(n, d, v, torch.float32, bias=True)
    g, opts, needs = torch.randn(n), LogprobOptions(), (True, True, True)
    _, lse, saved = mod.forward_keep(hidden, weight, labels, b, opts)
    dh, dw, db = mod.backward_saved(saved, g, hidden, weight, labels, b, lse, opts, needs)
    start_w, start_b = torch.randn(v, d), torch.randn(v)
    acc_w, acc_b = start_w.clone(), start_b.clone()
    _, lse, saved = mod.forward_keep(hidden, weight, labels, b, opts)
    dh2, dw2, db2 = mod.backward_saved(
        saved, g, hidden, weight, labels, b, lse, opts, needs, dw_acc=acc_w, db_acc=acc_b
    )
    assert dw2 is acc_w and db2 is acc_b
    assert rel_err(dw2 - start_w, dw) < 1e-5 and rel_err(db2 - start_b, db) < 1e-5 and rel_err(dh2, dh) < 1e-6


def test_pair_chunks_budget(monkeypatch):
    from haf_kernels.logprobs import pair_chunks

    labels = torch.zeros(6, 10, dtype=torch.long)  # 3 pairs of 20 kept tokens each
    labels[2, 5:] = -100  # pair 2 keeps 15
    monkeypatch.setenv("HAF_KEEP_CHUNK_MB", "1")
    vocab = (1 << 20) // (4 * 40)  # 40 tokens fill the budget
    assert pair_chunks(labels, vocab, -100) == [(0, 2), (2, 3)]
    vocab = (1 << 20) // (4 * 10)  # one pair (20 tokens) exceeds the budget but not the cap: one pair a chunk
    assert pair_chunks(labels, vocab, -100) == [(0, 1), (1, 2), (2, 3)]
    monkeypatch.setenv("HAF_KEEP_MAX_MB", "1")
    assert pair_chunks(labels, vocab, -100) is None  # over the cap: recompute instead


def test_pair_chunks_budget_from_free_memory_and_kept_dtype(monkeypatch):
    """Unset ``HAF_KEEP_CHUNK_MB``: 64 MiB off CUDA, else 1/8 of the free memory in [512 MiB, 4 GiB] (at most half of
    it); a backend keeping 2-byte logits fits twice the tokens; the one-pair cap grows with the budget."""
    from haf_kernels import memory
    from haf_kernels.backends import cpp, torch_chunked
    from haf_kernels.backends import triton as triton_backend
    from haf_kernels.logprobs import pair_chunks

    monkeypatch.delenv("HAF_KEEP_CHUNK_MB", raising=False)
    monkeypatch.delenv("HAF_KEEP_MAX_MB", raising=False)
    gib, mib = 1 << 30, 1 << 20
    assert memory.budget_bytes(None) == 64 * mib
    assert memory.budget_bytes(80 * gib) == 4 * gib  # 10 GiB capped
    assert memory.budget_bytes(16 * gib) == 2 * gib
    assert memory.budget_bytes(2 * gib) == 512 * mib  # the floor
    assert memory.budget_bytes(600 * mib) == 300 * mib  # never more than half of what is free
    assert memory.budget_bytes(80 * gib, 7) == 7 * mib  # an explicit setting wins
    assert memory.free_device_bytes(torch.device("cpu")) is None

    vocab = 128256
    labels = torch.zeros(2 * 8, 1024, dtype=torch.long)  # 8 pairs of 2048 kept tokens
    # off CUDA, fp32 kept: one pair (2048 tokens × V × 4 B = 1 GiB) is over the 512 MiB one-pair cap: recompute
    assert pair_chunks(labels, vocab, -100) is None
    # an H100 with 60 GiB free keeps 4 GiB of bf16 logits per chunk: 16744 tokens = 8 pairs of 2048
    assert pair_chunks(labels, vocab, -100, logit_bytes=2, free_bytes=60 * gib) == [(0, 8)]
    # the same in fp32: half as many tokens per chunk
    assert pair_chunks(labels, vocab, -100, logit_bytes=4, free_bytes=60 * gib) == [(0, 4), (4, 8)]
    # the backends' declared kept dtypes (declarations hold whether or not the backend can run here)
    assert torch_chunked.CAPABILITIES.kept_logit_bytes(torch.bfloat16) == 4
    assert cpp.CAPABILITIES.kept_logit_bytes(torch.float64) == 8
    assert triton_backend.CAPABILITIES.kept_logit_bytes(torch.bfloat16) == 2
    assert triton_backend.CAPABILITIES.kept_logit_bytes(torch.float32) == 4
