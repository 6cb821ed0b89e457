"""The C++ CPU backend (``haf_kernels._C`` through ``backends/cpp.py``) against ``backends/reference.py`` in fp64.

Calls the backend module directly (both strategies: recompute ``forward``/``backward`` and keep-logits
``forward_keep``/``backward_saved``), on odd shapes, with bias / logit_scale / softcap, ignored tokens, bf16 and
non-contiguous inputs, several tilings and thread counts; plus gradcheck through the public API, determinism,
error messages, and a check that CI really built and uses the extension.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from conftest import peaked_inputs, rel_err, tol, torch_err_bound

import haf_kernels
from haf_kernels import backends
from haf_kernels.backends import reference
from haf_kernels.options import LogprobOptions

CPU = torch.device("cpu")
REQUIRE_CPP = os.environ.get("CI") == "true" or os.environ.get("HAF_REQUIRE_CPP") == "1"


def test_extension_built_and_used_in_ci():
    """In CI (or with HAF_REQUIRE_CPP=1) the extension must have been built, and ``auto`` must pick it on CPU."""
    if not REQUIRE_CPP:
        pytest.skip("only enforced when CI=true or HAF_REQUIRE_CPP=1")
    assert backends.available()["cpp"], backends.unavailable_reasons().get("cpp")
    if not os.environ.get("HAF_KERNELS_BACKEND"):
        assert backends.resolve("auto", CPU) == "cpp"


def test_fallback_when_extension_missing():
    """With ``_C`` unimportable the package still imports, warns once, and ``auto`` uses ``torch`` on CPU."""
    code = (
        "import sys, warnings\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'haf_kernels._C': raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    import torch, haf_kernels\n"
        "    from haf_kernels import backends\n"
        "    assert not backends.available()['cpp']\n"
        "    assert backends.available()['cpp'] is False\n"
        "    assert backends.resolve('auto', torch.device('cpu')) == 'torch'\n"
        "    assert 'blocked for the test' in backends.unavailable_reasons()['cpp']\n"
        "n = sum('haf_kernels._C' in str(w.message) for w in caught)\n"
        "assert n == 1, n\n"
        "print('ok')\n"
    )
    env = {k: val for k, val in os.environ.items() if k != "HAF_KERNELS_BACKEND"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


if not backends.is_available("cpp"):
    pytest.skip(f"cpp backend not built: {backends.unavailable_reasons().get('cpp')}", allow_module_level=True)

cpp = backends.get("cpp")


@pytest.fixture
def threads():
    """Restore the thread count after a test changes it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def make_inputs(n, v, d, dtype=torch.float32, bias=False, ignore_frac=0.0, scale=0.5):
    h = torch.randn(n, d, dtype=torch.float64).to(dtype)
    w = (torch.randn(v, d, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, v, (n,))
    if ignore_frac > 0:
        y[torch.rand(n) < ignore_frac] = -100
    b = torch.randn(v, dtype=torch.float64).to(dtype) if bias else None
    return h, w, y, b


def reference_grads(h, w, y, b, opts, g):
    """fp64 logp and (dh, dw, db) of ``sum(g * logp)`` from the materialising reference."""
    hr = h.detach().double().requires_grad_(True)
    wr = w.detach().double().requires_grad_(True)
    br = None if b is None else b.detach().double().requires_grad_(True)
    logp = reference.linear_logprobs(hr, wr, y, br, opts)
    logp.backward(g.double())
    return logp.detach(), hr.grad, wr.grad, None if br is None else br.grad


def run_backend(strategy, h, w, y, b, opts, g, needs=(True, True, True)):
    """(logp, lse, dh, dw, db) from the cpp backend with ``strategy`` in {"recompute", "keep"}."""
    needs = (needs[0], needs[1], needs[2] and b is not None)
    if strategy == "recompute":
        logp, lse = cpp.forward(h, w, y, b, opts)
        dh, dw, db = cpp.backward(g, h, w, y, b, lse, opts, needs)
    else:
        logp, lse, saved = cpp.forward_keep(h, w, y, b, opts)
        dh, dw, db = cpp.backward_saved(saved, g, h, w, y, b, lse, opts, needs)
    return logp, lse, dh, dw, db


def assert_close(out, ref, dtype, what):
    assert out is not None, what
    assert not torch.isnan(out).any(), f"{what}: NaN in output"
    err = rel_err(out, ref)
    assert err < tol(dtype), f"{what}: rel err {err:.3e} >= {tol(dtype):.0e}"


STRATEGIES = ("recompute", "keep")
SHAPES = [  # (N, V, D)
    (1, 1, 4),
    (1, 5, 3),
    (7, 37, 16),
    (33, 257, 24),
    (64, 1000, 32),
]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("n,v,d", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference_odd_shapes(strategy, n, v, d, dtype):
    h, w, y, b = make_inputs(n, v, d, dtype, bias=True, ignore_frac=0.3)
    opts = LogprobOptions(chunk_tokens=5, chunk_vocab=17)  # many partial tiles
    g = torch.randn(n, dtype=torch.float64)
    logp, lse, dh, dw, db = run_backend(strategy, h, w, y, b, opts, g)
    rlogp, rdh, rdw, rdb = reference_grads(h, w, y, b, opts, g)
    assert logp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert lse.shape == (n,) and not torch.isnan(lse).any()
    assert_close(logp, rlogp, dtype, "logp")
    assert_close(dh, rdh, dtype, "dh")
    assert_close(dw, rdw, dtype, "dw")
    assert_close(db, rdb, dtype, "db")
    assert (logp[y == -100] == 0).all()


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(
    "scale,softcap,bias",
    [(1.0, None, False), (0.37, None, True), (1.0, 2.5, False), (1.7, 4.0, True), (0.25, 30.0, True)],
)
def test_scale_softcap_bias(strategy, scale, softcap, bias):
    h, w, y, b = make_inputs(48, 300, 20, torch.float32, bias=bias, ignore_frac=0.2, scale=1.0)
    opts = LogprobOptions(logit_scale=scale, softcap=softcap)
    g = torch.randn(48, dtype=torch.float64)
    logp, _, dh, dw, db = run_backend(strategy, h, w, y, b, opts, g)
    rlogp, rdh, rdw, rdb = reference_grads(h, w, y, b, opts, g)
    assert_close(logp, rlogp, torch.float32, "logp")
    assert_close(dh, rdh, torch.float32, "dh")
    assert_close(dw, rdw, torch.float32, "dw")
    if bias:
        assert_close(db, rdb, torch.float32, "db")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_half_inputs(strategy, dtype):
    """bf16 / fp16 inputs accumulate in fp32; compared with fp64 on the same rounded values."""
    h, w, y, b = make_inputs(40, 500, 32, dtype, bias=True, ignore_frac=0.3)
    opts = LogprobOptions(softcap=20.0)
    g = torch.randn(40, dtype=torch.float64)
    logp, lse, dh, dw, db = run_backend(strategy, h, w, y, b, opts, g)
    assert logp.dtype == torch.float32 and lse.dtype == torch.float64  # lse is kept in float64 (hi + lo)
    assert dh.dtype == dtype
    # recompute returns dW / db in the input dtype; keep returns them in the fp32 accumulation dtype
    assert dw.dtype == (dtype if strategy == "recompute" else torch.float32)
    rlogp, rdh, rdw, rdb = reference_grads(h, w, y, b, opts, g)
    assert_close(logp, rlogp, dtype, "logp")
    assert_close(dh, rdh, dtype, "dh")
    assert_close(dw, rdw, dtype, "dw")
    assert_close(db, rdb, dtype, "db")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_all_ignored_and_n1(strategy):
    h, w, y, b = make_inputs(9, 37, 8, torch.float32, bias=True)
    y[:] = -100
    g = torch.randn(9, dtype=torch.float64)
    logp, lse, dh, dw, db = run_backend(strategy, h, w, y, b, LogprobOptions(), g)
    assert (logp == 0).all() and not torch.isnan(lse).any()
    assert (dh == 0).all() and (dw == 0).all() and (db == 0).all()
    # N = 1 with a custom ignore_index
    h, w, y, _ = make_inputs(1, 5, 4, torch.float32)
    opts = LogprobOptions(ignore_index=3)
    y[:] = 3
    logp, _, dh, dw, _ = run_backend(strategy, h, w, y, None, opts, torch.ones(1))
    assert logp.item() == 0 and (dh == 0).all() and (dw == 0).all()
    y[:] = 4
    logp, _, dh, dw, _ = run_backend(strategy, h, w, y, None, opts, torch.ones(1))
    rlogp, rdh, rdw, _ = reference_grads(h, w, y, None, opts, torch.ones(1, dtype=torch.float64))
    assert_close(logp, rlogp, torch.float32, "logp")
    assert_close(dw, rdw, torch.float32, "dw")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_needs_subsets(strategy):
    h, w, y, b = make_inputs(20, 100, 8, torch.float64, bias=True, ignore_frac=0.3)
    g = torch.randn(20, dtype=torch.float64)
    _, rdh, rdw, rdb = reference_grads(h, w, y, b, LogprobOptions(), g)
    for needs in [(True, False, False), (False, True, False), (False, False, True), (False, True, True)]:
        _, _, dh, dw, db = run_backend(strategy, h, w, y, b, LogprobOptions(), g, needs)
        for want, got, ref, name in zip(needs, (dh, dw, db), (rdh, rdw, rdb), ("dh", "dw", "db"), strict=True):
            if want:
                assert_close(got, ref, torch.float64, name)
            else:
                assert got is None, name


def test_non_contiguous_and_int32_labels():
    h_big = torch.randn(30, 2 * 24, dtype=torch.float64)
    w_big = torch.randn(2 * 80, 24, dtype=torch.float64)
    h, w = h_big[:, ::2], w_big[::2]  # strided views
    y = torch.randint(0, 80, (60,)).to(torch.int32)[::2]
    assert not h.is_contiguous() and not w.is_contiguous() and not y.is_contiguous()
    g = torch.randn(60, dtype=torch.float64)[::2]
    opts = LogprobOptions(chunk_tokens=8, chunk_vocab=32)
    rlogp, rdh, rdw, _ = reference_grads(h, w, y.long(), None, opts, g)
    for strategy in STRATEGIES:
        logp, _, dh, dw, _ = run_backend(strategy, h, w, y, None, opts, g)
        assert_close(logp, rlogp, torch.float64, "logp")
        assert_close(dh, rdh, torch.float64, "dh")
        assert_close(dw, rdw, torch.float64, "dw")


@pytest.mark.parametrize("nthreads", [1, 2, 3])
def test_threads_tilings_and_determinism(threads, nthreads, monkeypatch):
    """Any thread count and tiling agrees with the reference; a repeated run is bitwise identical."""
    torch.set_num_threads(nthreads)
    monkeypatch.setenv("HAF_CPP_PARTIAL_KB", "4")  # forces several token blocks in the recompute backward
    h, w, y, b = make_inputs(100, 700, 16, torch.float32, bias=True, ignore_frac=0.3)
    g = torch.randn(100, dtype=torch.float64)
    for opts in (LogprobOptions(), LogprobOptions(chunk_tokens=16, chunk_vocab=64), LogprobOptions(chunk_tokens=3)):
        rlogp, rdh, rdw, rdb = reference_grads(h, w, y, b, opts, g)
        for strategy in STRATEGIES:
            first = run_backend(strategy, h, w, y, b, opts, g)
            second = run_backend(strategy, h, w, y, b, opts, g)
            for a, c, name in zip(first, second, ("logp", "lse", "dh", "dw", "db"), strict=True):
                assert torch.equal(a, c), f"{strategy} {name} differs between two runs with {nthreads} threads"
            assert_close(first[0], rlogp, torch.float32, "logp")
            assert_close(first[2], rdh, torch.float32, "dh")
            assert_close(first[3], rdw, torch.float32, "dw")
            assert_close(first[4], rdb, torch.float32, "db")


def test_large_vocab_multithreaded_dw(threads):
    """Many vocab tiles over 2 threads (the OpenMP split that owns dW rows); dW is race-free and repeatable."""
    torch.set_num_threads(2)
    h, w, y, _ = make_inputs(256, 8000, 64, torch.float32, ignore_frac=0.1, scale=0.1)
    g = torch.randn(256, dtype=torch.float64)
    rlogp, rdh, rdw, _ = reference_grads(h, w, y, None, LogprobOptions(), g)
    for strategy in STRATEGIES:
        a = run_backend(strategy, h, w, y, None, LogprobOptions(), g)
        c = run_backend(strategy, h, w, y, None, LogprobOptions(), g)
        assert torch.equal(a[3], c[3]) and torch.equal(a[2], c[2])
        assert_close(a[0], rlogp, torch.float32, "logp")
        assert_close(a[2], rdh, torch.float32, "dh")
        assert_close(a[3], rdw, torch.float32, "dw")


def test_nan_propagates():
    h, w, y, _ = make_inputs(6, 50, 8, torch.float32)
    h[2, 0] = float("nan")
    for strategy in STRATEGIES:
        logp, lse, *_ = run_backend(strategy, h, w, y, None, LogprobOptions(), torch.ones(6))
        assert torch.isnan(logp[2]) and torch.isnan(lse[2])
        assert not torch.isnan(logp[[0, 1, 3, 4, 5]]).any()


def test_saved_is_consumed_layout_checked():
    h, w, y, _ = make_inputs(5, 40, 8, torch.float32)
    _, lse, saved = cpp.forward_keep(h, w, y, None, LogprobOptions())
    with pytest.raises((RuntimeError, ValueError), match="saved"):
        cpp.backward_saved(saved[:-1], torch.ones(5), h, w, y, None, lse, LogprobOptions(), (True, True, False))


def test_gradcheck_public_api():
    torch.manual_seed(1)
    h = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 11, (6,))
    y[1] = -100

    def fn(h, w, b):
        return haf_kernels.linear_logprobs(
            h, w, y, bias=b, logit_scale=0.8, softcap=3.0, backend="cpp", chunk_tokens=4, chunk_vocab=5
        )

    assert torch.autograd.gradcheck(fn, (h, w, b), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_whole_loss_matches_reference():
    """fused_haf_loss with backend='cpp' (keep-logits path per pair chunk) vs the reference backend."""
    torch.manual_seed(2)
    b, t, d, v = 3, 9, 16, 101
    h0 = torch.randn(2 * b, t, d, dtype=torch.float64)
    w0 = torch.randn(v, d, dtype=torch.float64) * 0.3
    y = torch.randint(0, v, (2 * b, t))
    y[:, :3] = -100
    rewards = torch.randn(2 * b, dtype=torch.float64)
    ref_logps = -torch.rand(2 * b, dtype=torch.float64) * 50
    grads = {}
    for backend in ("cpp", "reference"):
        h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        out = haf_kernels.fused_haf_loss(h, w, y, rewards, ref_logps, softcap=5.0, backend=backend)
        out.loss.backward()
        grads[backend] = (out.loss.detach(), h.grad, w.grad)
    for a, c in zip(grads["cpp"], grads["reference"], strict=True):
        assert rel_err(a, c) < tol(torch.float64)


def test_bad_input_errors():
    h, w, y, b = make_inputs(4, 10, 3, torch.float32, bias=True)
    opts = LogprobOptions()
    with pytest.raises((RuntimeError, ValueError), match="labels"):
        cpp.forward(h, w, torch.tensor([0, 1, 10, 2]), None, opts)  # label out of range
    with pytest.raises((RuntimeError, ValueError), match="disagree on D"):
        cpp.forward(h, torch.randn(10, 4), y, None, opts)
    with pytest.raises((RuntimeError, TypeError), match="dtype"):
        cpp.forward(h, w.double(), y, None, opts)
    with pytest.raises((RuntimeError, ValueError), match="bias"):
        cpp.forward(h, w, y, torch.randn(9), opts)
    with pytest.raises((RuntimeError, ValueError), match=r"hidden must be \[N, D\]"):
        cpp.forward(h[None], w, y, None, opts)
    with pytest.raises((RuntimeError, ValueError), match="lse"):
        cpp.backward(torch.ones(4), h, w, y, None, torch.zeros(3), opts, (True, True, False))
    with pytest.raises((RuntimeError, ValueError), match="softcap"):
        cpp.forward(h, w, y, None, LogprobOptions(softcap=-1.0))
    # the public API validates first, naming the argument
    with pytest.raises(ValueError, match="labels"):
        haf_kernels.linear_logprobs(h, w, torch.tensor([0, 1, 99, 2]), backend="cpp")


def test_registry_metadata():
    assert cpp.NAME == "cpp" and cpp.is_available() and cpp.why_unavailable() == ""
    assert backends.supports_device("cpp", CPU)
    tc, tv = cpp.tiles(32000, LogprobOptions())
    assert tv % 16 == 0 and tv <= 1024 and tc >= 1
    assert cpp.tiles(5, LogprobOptions(chunk_tokens=3, chunk_vocab=100)) == (3, 5)


# ---------------------------------------------------------------- accuracy on peaked rows, on every SIMD path

ISAS = cpp.isa_supported()


@pytest.fixture
def restore_isa():
    yield
    cpp.set_isa("auto")


def test_isa_choice_reported_and_checked(restore_isa):
    assert ISAS[-1] == "default" and cpp.isa() == ISAS[0]
    for name in ISAS:
        cpp.set_isa(name)
        assert cpp.isa() == name
    with pytest.raises(ValueError, match="instruction set 'avx9000' is not available.*choose one of: auto"):
        cpp.set_isa("avx9000")
    cpp.set_isa("auto")
    assert cpp.isa() == ISAS[0]


def test_isa_from_environment():
    """``HAF_CPP_ISA`` picks the path for a whole process (applied at first use); a bad name is a clear error."""
    code = (
        "import torch\n"
        "from haf_kernels import backends\n"
        "from haf_kernels.options import LogprobOptions\n"
        "cpp = backends.get('cpp')\n"
        "print(cpp.isa())\n"
        "cpp.forward(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]), None, LogprobOptions())\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, HAF_CPP_ISA="default")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "default", res.stderr[-2000:]
    env["HAF_CPP_ISA"] = "avx9000"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=120)
    assert res.returncode != 0 and "HAF_CPP_ISA" in res.stderr and "avx9000" in res.stderr


@pytest.mark.parametrize("case", ["plain", "softcap"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("isa_name", ISAS)
def test_peaked_rows_as_accurate_as_torch_on_every_isa(restore_isa, isa_name, strategy, case):
    """On peaked rows every SIMD path is at least as accurate as plain fp32 PyTorch (conftest's one rule).

    Peaked rows are where fp32 shortcuts show: the target's gradient is ``g·(1 − p)`` with ``p`` close to 1, so
    one fp32 rounding of a large ``lse`` or a sum of small terms rounded against the max's 1 costs most of it.
    """
    cpp.set_isa(isa_name)
    h, w, y = peaked_inputs(96, 1500, 48)
    scale, cap = (1.0, None) if case == "plain" else (0.9, 30.0)
    opts = LogprobOptions(logit_scale=scale, softcap=cap, chunk_tokens=32, chunk_vocab=256)  # 6 vocab tiles
    g = torch.randn(96, dtype=torch.float64)
    rlogp, rdh, rdw, _ = reference_grads(h, w, y, None, opts, g)
    hf, wf = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    tlogp = reference.linear_logprobs(hf, wf, y, None, opts)  # plain fp32 PyTorch on the same inputs
    tlogp.backward(g.float())
    logp, _, dh, dw, _ = run_backend(strategy, h, w, y, None, opts, g.float())
    for name, out, ref, base in (("logp", logp, rlogp, tlogp), ("dh", dh, rdh, hf.grad), ("dw", dw, rdw, wf.grad)):
        err, terr = rel_err(out, ref), rel_err(base, ref)
        bound = torch_err_bound(terr, torch.float32)
        assert err <= bound, f"{isa_name} {strategy} {name}: rel err {err:.2e} > {bound:.2e} (torch fp32 {terr:.2e})"


def test_isas_agree(restore_isa):
    """Every SIMD path computes the same function: results agree to fp32 rounding, not to a looser bound."""
    h, w, y = peaked_inputs(64, 3000, 32, seed=1)
    g = torch.randn(64)
    outs = {}
    for name in ISAS:
        cpp.set_isa(name)
        outs[name] = run_backend("recompute", h, w, y, None, LogprobOptions(), g)
    base = outs[ISAS[-1]]
    for name, out in outs.items():
        for what, a, b in zip(("logp", "lse", "dh", "dw"), out[:4], base[:4]):
            assert rel_err(a, b) < 1e-6, (name, what, rel_err(a, b))


@pytest.fixture
def deterministic():
    """torch.use_deterministic_algorithms(True) for one test (restored after)."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize(
    "n,v,d,opts",
    [
        (100, 700, 16, LogprobOptions()),  # one default tile
        (100, 700, 16, LogprobOptions(chunk_tokens=16, chunk_vocab=64)),  # 11 tiles > 8 slots
        (37, 1000, 24, LogprobOptions(chunk_tokens=5, chunk_vocab=48)),
        (64, 20000, 32, LogprobOptions()),  # the default tiling of a larger vocab
    ],
)
def test_deterministic_mode_is_bitwise_equal_across_thread_counts(threads, deterministic, monkeypatch, n, v, d, opts):
    """Under torch.use_deterministic_algorithms(True) every output is bitwise the same for 1, 2 and 3 threads
    (fixed work slots, fixed reduction order), for both strategies, and still matches the reference."""
    monkeypatch.setenv("HAF_CPP_PARTIAL_KB", "4")  # several token blocks in the recompute backward
    h, w, y, b = make_inputs(n, v, d, torch.float32, bias=True, ignore_frac=0.2)
    g = torch.randn(n, dtype=torch.float64)
    rlogp, rdh, rdw, rdb = reference_grads(h, w, y, b, opts, g)
    for strategy in STRATEGIES:
        runs = {}
        for nthreads in (1, 2, 3):
            torch.set_num_threads(nthreads)
            runs[nthreads] = run_backend(strategy, h, w, y, b, opts, g)
        for nthreads in (2, 3):
            for a, c, name in zip(runs[1], runs[nthreads], ("logp", "lse", "dh", "dw", "db"), strict=True):
                assert torch.equal(a, c), f"{strategy} {name}: 1 and {nthreads} threads differ in deterministic mode"
        assert_close(runs[1][0], rlogp, torch.float32, "logp")
        assert_close(runs[1][2], rdh, torch.float32, "dh")
        assert_close(runs[1][3], rdw, torch.float32, "dw")
        assert_close(runs[1][4], rdb, torch.float32, "db")


def test_deterministic_mode_whole_loss_across_thread_counts(threads, deterministic):
    """fused_haf_loss (both gradient paths) on the cpp backend: bitwise-equal loss and gradients for 1 and 2
    threads in deterministic mode."""
    from haf_kernels import fused_haf_loss

    h0 = torch.randn(4, 9, 16)
    w0 = torch.randn(3000, 16) * 0.3
    y = torch.randint(0, 3000, (4, 9))
    y[:, :3] = -100
    r0 = torch.randn(4)
    for grad_in_forward in (False, True):
        results = []
        for nthreads in (1, 2):
            torch.set_num_threads(nthreads)
            h, w, r = (t.clone().requires_grad_(True) for t in (h0, w0, r0))
            out = fused_haf_loss(h, w, y, r, backend="cpp", grad_in_forward=grad_in_forward)
            out.loss.backward()
            results.append((out.loss.detach(), h.grad, w.grad, r.grad))
        for a, c, name in zip(*results, ("loss", "dh", "dw", "drewards"), strict=True):
            assert torch.equal(a, c), f"grad_in_forward={grad_in_forward} {name}: 1 and 2 threads differ"


# ---------------------------------------------------------------- gradient filtering (HAF_GRAD_FILTER)

FILTER_EPS = 2.0**-12  # the benchmarks' (and Cut Cross-Entropy's) threshold


def with_filter(opts, eps):
    """``opts`` with ``Tuning.grad_filter = eps`` (what ``HAF_GRAD_FILTER`` sets)."""
    return dataclasses.replace(opts, tuning=dataclasses.replace(opts.tuning, grad_filter=float(eps)))


def filter_inputs(n=96, v=3000, d=64, seed=3):
    """Sharply peaked rows (``peaked_inputs`` with the peak ~30 above the rest) whose label is the peak for half the
    rows and a random token (p ~ 0: a gradient entry of ~g that filtering must keep) for the other half."""
    h, w, peak = peaked_inputs(n, v, d, target_logit=30.0, seed=seed)
    y = peak.clone()
    wrong = torch.arange(n) % 2 == 1
    y[wrong] = torch.randint(0, v, (int(wrong.sum()),), generator=torch.Generator().manual_seed(seed + 1))
    return h, w, y


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("isa_name", ISAS)
def test_grad_filter_skips_blocks_within_stated_bound(restore_isa, isa_name, strategy):
    """On peaked rows filtering makes most blocks sparse, and the filtered gradients differ from the unfiltered
    ones by at most the bound cpp.py states: ``ε·|g_t|·Σ_j |W_j|`` for dH[t], ``ε·Σ_t |g_t|·|h_t|`` for dW[j]
    (every dropped entry has ``|onehot − p| <= ε``); the targets' entries are never dropped (half the labels
    are not the peak, so a dropped target would cost ~|g|·|W_y|, far above the bound); db is exact. On every
    SIMD path (the block test is a vectorised max of |dz|)."""
    cpp.set_isa(isa_name)
    h, w, y = filter_inputs()
    b = torch.randn(w.shape[0]) * 0.1
    g = torch.randn(h.shape[0], dtype=torch.float64)
    opts = LogprobOptions(chunk_tokens=16, chunk_vocab=256)
    _, rdh, rdw, rdb = reference_grads(h, w, y, b, opts, g)
    g = g.float()
    off = run_backend(strategy, h, w, y, b, opts, g)
    assert cpp.filter_stats()[1] == 0
    on = run_backend(strategy, h, w, y, b, with_filter(opts, FILTER_EPS), g)
    blocks, sparse = cpp.filter_stats()
    assert blocks == 6 * 12 and sparse >= blocks // 3, (blocks, sparse)  # ~half: the off-label peaks stay dense
    assert torch.equal(on[0], off[0]) and torch.equal(on[1], off[1])  # the forward is untouched
    slack = 1 + 1e-3
    bound_h = FILTER_EPS * g.abs()[:, None] * w.abs().sum(0)[None, :] * slack + 1e-6
    bound_w = FILTER_EPS * (g.abs()[:, None] * h.abs()).sum(0)[None, :] * slack + 1e-6
    assert ((on[2] - off[2]).abs() <= bound_h).all(), ((on[2] - off[2]).abs() / bound_h).max()
    assert ((on[3] - off[3]).abs() <= bound_w).all(), ((on[3] - off[3]).abs() / bound_w).max()
    # against float64: the unfiltered error plus at most the bound
    assert ((on[2] - rdh).abs() <= (off[2] - rdh).abs() + bound_h).all()
    assert ((on[3] - rdw).abs() <= (off[3] - rdw).abs() + bound_w).all()
    assert_close(on[4], rdb, torch.float32, "db")
    assert (on[2] - off[2]).abs().max() > 0  # something was filtered


def test_grad_filter_nothing_qualifies_is_bitwise_off():
    """A threshold no block meets changes nothing, bitwise (filtering only ever replaces whole blocks), and
    uniform-ish rows (the ``random`` regime) have no sparse block at ε = 2^-12."""
    h, w, y, b = make_inputs(70, 900, 24, bias=True, ignore_frac=0.2)
    g = torch.randn(70)
    opts = LogprobOptions(chunk_tokens=16, chunk_vocab=128)
    for strategy in STRATEGIES:
        off = run_backend(strategy, h, w, y, b, opts, g)
        for eps in (1e-30, FILTER_EPS):
            on = run_backend(strategy, h, w, y, b, with_filter(opts, eps), g)
            assert cpp.filter_stats()[1] == 0, (strategy, eps, cpp.filter_stats())
            for a, c, name in zip(off, on, ("logp", "lse", "dh", "dw", "db"), strict=True):
                assert torch.equal(a, c), f"{strategy} {name} eps={eps}"


def test_grad_filter_keeps_nan():
    """A NaN gradient entry makes its block dense (never filtered away as small): NaN reaches dH and dW."""
    h, w, y = filter_inputs(32, 600, 64)
    h[5, 3] = float("nan")
    opts = with_filter(LogprobOptions(chunk_tokens=8, chunk_vocab=128), FILTER_EPS)
    for strategy in STRATEGIES:
        _, _, dh, dw, _ = run_backend(strategy, h, w, y, None, opts, torch.ones(32))
        assert torch.isnan(dh[5]).all() and torch.isnan(dw).any()
        assert cpp.filter_stats()[1] > 0


def test_grad_filter_whole_loss_repeatable(threads, monkeypatch):
    """fused_haf_loss with HAF_GRAD_FILTER on the cpp backend: sparse blocks are used, and two runs with the
    same thread count are bitwise equal."""
    from haf_kernels import fused_haf_loss

    assert backends.capabilities("cpp").grad_filter
    h, w, y = peaked_inputs(64, 2000, 64, target_logit=30.0)
    monkeypatch.setenv("HAF_GRAD_FILTER", repr(FILTER_EPS))
    monkeypatch.setenv("HAF_CHUNK_VOCAB", "256")
    torch.set_num_threads(2)
    results = []
    for _ in range(2):
        hh, ww = h.reshape(4, 16, 64).clone().requires_grad_(True), w.clone().requires_grad_(True)
        rewards = torch.randn(4, generator=torch.Generator().manual_seed(0))
        out = fused_haf_loss(hh, ww, y.reshape(4, 16), rewards, backend="cpp")
        out.loss.backward()
        results.append((out.loss.detach(), hh.grad, ww.grad))
        assert cpp.filter_stats()[1] > 0
    for a, c in zip(*results, strict=True):
        assert torch.equal(a, c)


# ---------------------------------------------------------------- forward_keep(out=...): a reused kept buffer


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_forward_keep_into_out_buffer(backend):
    """forward_keep writes the kept logits into ``out`` (a larger, dirty buffer): same bits as a fresh buffer,
    through backward_saved too; a buffer of the wrong dtype or too small is refused, naming ``out``."""
    mod = backends.get(backend)
    h, w, y, b = make_inputs(40, 300, 16, bias=True, ignore_frac=0.1)
    g = torch.randn(40)
    opts = LogprobOptions(chunk_tokens=8, chunk_vocab=64)
    needs = (True, True, True)
    logp, lse, saved = mod.forward_keep(h, w, y, b, opts)
    expect = (logp, lse, *mod.backward_saved(saved, g, h, w, y, b, lse, opts, needs))
    buf = torch.full((41 * 300 + 7,), float("nan"))
    logp2, lse2, saved2 = mod.forward_keep(h, w, y, b, opts, out=buf)
    assert saved2.data_ptr() == buf.data_ptr()
    got = (logp2, lse2, *mod.backward_saved(saved2, g, h, w, y, b, lse2, opts, needs))
    for a, c, name in zip(expect, got, ("logp", "lse", "dh", "dw", "db"), strict=True):
        assert torch.equal(a, c), name
    for bad in (torch.empty(40 * 300 - 1), torch.empty(40 * 300, dtype=torch.float64)):
        with pytest.raises(ValueError, match="out must be a contiguous"):
            mod.forward_keep(h, w, y, b, opts, out=bad)


def test_whole_loss_reuses_one_kept_buffer(monkeypatch):
    """fused_haf_loss hands every chunk after the first the buffer the previous chunk consumed: one allocation of
    kept logits per call instead of one per chunk, and the same loss and gradients as fresh buffers."""
    from haf_kernels import fused_haf_loss

    torch.manual_seed(0)
    hidden = torch.randn(6, 5, 8, requires_grad=True)
    weight = (torch.randn(40000, 8) / 3).requires_grad_(True)
    labels = torch.randint(0, 40000, (6, 5))
    labels[1, :2] = -100  # chunks of different token counts
    rewards = torch.randn(6)
    monkeypatch.setenv("HAF_KEEP_CHUNK_MB", "1")  # 6 tokens of fp32 logits: one pair (<= 10 tokens) per chunk
    calls: list[torch.Tensor | None] = []
    real = cpp.forward_keep

    def spy(*args, out=None):
        calls.append(out)
        return real(*args, out=out)

    results = []
    for fn in (spy, lambda *args: real(*args)):  # the second has no ``out``: fresh buffers
        monkeypatch.setattr(cpp, "forward_keep", fn)
        hidden.grad = weight.grad = None
        out = fused_haf_loss(hidden, weight, labels, rewards, backend="cpp", grad_in_forward=True)
        out.loss.backward()
        results.append((out.loss.detach(), hidden.grad.clone(), weight.grad.clone()))
    assert len(calls) == 3 and calls[0] is None
    assert calls[1] is not None and calls[2] is not None and calls[2].data_ptr() == calls[1].data_ptr()
    for a, c in zip(*results, strict=True):
        assert torch.equal(a, c)
