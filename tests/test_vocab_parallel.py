"""Vocab-parallel LM head: 2 and 3 gloo processes on CPU, each holding a vocab shard, against the unsharded float64
reference (values and gradients of ``linear_logprobs`` and ``fused_haf_loss``), plus the collective argument checks.

One spawn of 3 ranks runs every case (spawning costs seconds, the cases milliseconds): first on a group of ranks
{0, 1} (V = 37 split 19 + 18), then on all 3 (split 13 + 13 + 11, uneven); each rank writes what it measured to a JSON
file and the tests below assert on it. One case gives the shards out of rank order through ``vocab_start``; the
3-rank pass also shards a ``DTensor`` LM head ``Shard(0)`` and lets its gradients flow back into the DTensor.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import BACKENDS, rel_err, torch_err_bound

import haf_kernels as hk
from haf_kernels.vocab_parallel import VocabParallel, from_dtensor

V, D, N = 37, 16, 13  # vocab (not divisible by 2 or 3), hidden size, tokens
PAIRS, T = 2, 5  # fused_haf_loss: hidden [2B, T, D]
DTYPES = {
    "torch": (torch.float32, torch.float64, torch.bfloat16),
    "cpp": (torch.float32, torch.float64, torch.bfloat16),
    "triton": (torch.float32,),  # the interpreter's tl.dot is wrong for bf16 (conftest)
}
CASES = {  # name: (bias, logit_scale, softcap)
    "plain": (False, 1.0, None),
    "bias_scale_softcap": (True, 0.7, 2.0),  # |logits| reach ~3: the cap acts
}
JOIN_TIMEOUT_S = 120
pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)
SEED = int(os.environ.get("HAF_TEST_SEED", "0"))  # conftest's seed; the ranks draw the same inputs from it


def runs(backend: str, world: int, case: str, grad_in_forward: bool | None = None) -> bool:
    """Whether a combination runs: the Triton interpreter costs ~0.3 s a call, so it runs one case of each call
    (2 ranks, softcap + scale + bias; the whole loss on its gradients-in-forward path, over the sharded
    forward/backward), and everything else runs everywhere."""
    if backend != "triton":
        return True
    return world == 2 and case == "bias_scale_softcap" and grad_in_forward in (None, True)


def split(world: int) -> list[tuple[int, int]]:
    """Rank-ordered shards ``(start, rows)`` as DTensor's ``Shard(0)`` makes them (``torch.chunk`` sizes)."""
    rows = [len(c) for c in torch.arange(V).chunk(world)]
    return [(sum(rows[:r]), rows[r]) for r in range(world)]


def make_inputs(seed: int, n: int, shard_starts: list[int]) -> tuple[torch.Tensor, ...]:
    """Full float64 inputs, identical on every rank: hidden [n, D], weight [V, D], bias [V], labels [n], g [n].

    Labels put a target in every shard (and at both ends of the vocab) and ignore two tokens.
    """
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, D, generator=gen, dtype=torch.float64)
    w = torch.randn(V, D, generator=gen, dtype=torch.float64) * 0.6
    b = torch.randn(V, generator=gen, dtype=torch.float64) * 0.5
    y = torch.randint(0, V, (n,), generator=gen)
    y[: len(shard_starts)] = torch.tensor(shard_starts)
    y[len(shard_starts)] = V - 1
    y[-1] = y[-3] = -100
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    return h, w, b, y, g


def leaf(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to(dtype).clone().requires_grad_(True)


def logprob_grads(h, w, b, y, g, dtype, case, backend, shard=None, vp=None):
    """``(logp, dH, dW, db)`` of ``linear_logprobs`` (sharded when ``vp``), upstream gradient ``g``."""
    bias, scale, cap = CASES[case]
    start, rows = shard if shard is not None else (0, V)
    hh, ww = leaf(h, dtype), leaf(w[start : start + rows], dtype)
    bb = leaf(b[start : start + rows], dtype) if bias else None
    logp = hk.linear_logprobs(hh, ww, y, bias=bb, logit_scale=scale, softcap=cap, backend=backend, vocab_parallel=vp)
    logp.backward(g.to(logp.dtype))
    return logp, hh.grad, ww.grad, None if bb is None else bb.grad


def loss_grads(h, w, b, y, dtype, case, backend, grad_in_forward, shard=None, vp=None):
    """``(loss, dH, dW, db)`` of ``fused_haf_loss`` with rewards and reference log-probs (sharded when ``vp``)."""
    bias, scale, cap = CASES[case]
    start, rows = shard if shard is not None else (0, V)
    hh, ww = leaf(h, dtype), leaf(w[start : start + rows], dtype)
    bb = leaf(b[start : start + rows], dtype) if bias else None
    rewards = torch.linspace(-1, 1, 2 * PAIRS, dtype=dtype)
    ref = torch.linspace(-9, -7, 2 * PAIRS, dtype=dtype)
    out = hk.fused_haf_loss(
        hh,
        ww,
        y,
        rewards,
        ref,
        beta=0.5,
        alpha=1.0,
        lm_head_bias=bb,
        logit_scale=scale,
        softcap=cap,
        backend=backend,
        grad_in_forward=grad_in_forward,
        vocab_parallel=vp,
    )
    out.loss.backward()
    return out.loss, hh.grad, ww.grad, None if bb is None else bb.grad


def full_rows(t: torch.Tensor, start: int, group: dist.ProcessGroup) -> torch.Tensor:
    """The ``[V, ...]`` tensor whose rows ``[start, start + len(t))`` each rank holds (float64, exact for fp32)."""
    world = dist.get_world_size(group)
    meta = [torch.zeros(2, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(meta, torch.tensor([start, t.shape[0]]), group=group)
    most = max(int(m[1]) for m in meta)
    padded = torch.zeros((most,) + tuple(t.shape[1:]), dtype=torch.float64)
    padded[: t.shape[0]] = t.detach().double()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    full = torch.zeros((V,) + tuple(t.shape[1:]), dtype=torch.float64)
    for (s0, rows), part in zip((m.tolist() for m in meta), parts):
        full[s0 : s0 + rows] = part[:rows]
    return full


def compare(got, ref64, plain, dtype, start, group) -> dict:
    """``{output: [err, bound]}``: errors vs the float64 reference and the rule's bound from plain PyTorch at ``dtype``
    (conftest: 2 × its error + a floor). dW and db are compared whole (every rank's shard rows gathered): a shard's
    own norm can be tiny (a saturated softcap), and the optimizer and gradient clipping see the whole."""
    out = {}
    for i, name in enumerate(("value", "dH", "dW", "db")):
        if ref64[i] is None:
            continue
        mine = full_rows(got[i], start, group) if name in ("dW", "db") else got[i]
        err, terr = rel_err(mine, ref64[i]), rel_err(plain[i], ref64[i])
        out[name] = [err, torch_err_bound(terr, dtype)]
    return out


def expect_error(fn, exc_type=(ValueError, TypeError)) -> str:
    try:
        fn()
    except exc_type as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def _worker(rank: int, world: int, store: str, out_dir: str, backends: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:  # an exception reaches the test as ProcessRaisedException, with this rank's traceback
        pair = dist.new_group([0, 1])  # every rank takes part in creating it
        results = {"world2": _run_cases(rank, 2, pair, backends) if rank < 2 else None}
        results["world3"] = _run_cases(rank, world, dist.group.WORLD, backends)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def _run_cases(rank: int, world: int, group: dist.ProcessGroup, backend_names: list[str]) -> dict:
    layout = split(world)
    shard = layout[rank]
    res: dict = {"values": {}, "errors": {}, "shard": shard}
    f64 = torch.float64

    # ---- linear_logprobs: values and gradients, random upstream gradient
    h, w, b, y, g = make_inputs(SEED * 2 + 1, N, [s for s, _ in layout])
    for case in CASES:
        ref64 = logprob_grads(h, w, b, y, g, f64, case, "reference")
        plains = {
            dt: logprob_grads(h, w, b, y, g, dt, case, "reference") for dt in (torch.float32, f64, torch.bfloat16)
        }
        for backend in backend_names:
            for dtype in DTYPES[backend]:
                if not runs(backend, world, case):
                    continue
                plain = plains[dtype]
                got = logprob_grads(h, w, b, y, g, dtype, case, backend, shard, group)
                res["values"][f"linear_logprobs/{backend}/{str(dtype)[6:]}/{case}"] = compare(
                    got, ref64, plain, dtype, shard[0], group
                )
        # the partial dH (reduce_grad_hidden=False) sums over ranks to the full one
        vp = VocabParallel(group, reduce_grad_hidden=False)
        part = logprob_grads(h, w, b, y, g, f64, case, "torch", shard, vp)[1]
        dist.all_reduce(part, group=group)
        res["values"][f"partial_dH/{case}"] = {"dH": [rel_err(part, ref64[1]), torch_err_bound(0.0, f64)]}

    # ---- fused_haf_loss: loss and gradients, 3-GEMM path and recompute path
    hf, wf, bf, yf, _ = make_inputs(SEED * 2 + 2, 2 * PAIRS * T, [s for s, _ in layout])
    hf, yf = hf.view(2 * PAIRS, T, D), yf.view(2 * PAIRS, T)
    for case in ("plain", "bias_scale_softcap"):
        ref64 = loss_grads(hf, wf, bf, yf, f64, case, "reference", None)
        plains = {
            dt: loss_grads(hf, wf, bf, yf, dt, case, "reference", None) for dt in (torch.float32, f64, torch.bfloat16)
        }
        for backend in backend_names:
            for dtype in DTYPES[backend]:
                plain = plains[dtype]
                for gif in (True, False):
                    if not runs(backend, world, case, gif):
                        continue
                    got = loss_grads(hf, wf, bf, yf, dtype, case, backend, gif, shard, group)
                    key = f"fused_haf_loss/{backend}/{str(dtype)[6:]}/{case}/{'3gemm' if gif else 'recompute'}"
                    res["values"][key] = compare(got, ref64, plain, dtype, shard[0], group)

    # ---- sequence_logprobs (forward only, reference models) on the shard
    sums, counts = hk.sequence_logprobs(hf, wf[shard[0] : shard[0] + shard[1]], yf, vocab_parallel=group)
    ref_sums, ref_counts = hk.sequence_logprobs(hf, wf, yf, backend="reference")
    res["values"]["sequence_logprobs"] = {
        "value": [rel_err(sums, ref_sums), torch_err_bound(0.0, f64)],
        "counts": [float((counts != ref_counts).sum()), 0.0],
    }

    # ---- an empty shard: V = 2 over 3 ranks is Shard(0)'s [1, 1, 0]
    if world == 3:
        rows2 = [1, 1, 0][rank]
        y2 = torch.where(yf == -100, yf, yf % 2)
        w2, b2 = wf[:2], bf[:2]
        got = []
        for h_in, w_in, b_in in ((hf, w2[rank : rank + rows2], b2[rank : rank + rows2]), (hf, w2, b2)):
            hh, ww, bb = leaf(h_in, f64), leaf(w_in, f64), leaf(b_in, f64)
            vp = group if w_in.shape[0] != 2 else None
            backend = "cpp" if "cpp" in backend_names else "torch"
            out = hk.fused_haf_loss(
                hh,
                ww,
                y2,
                lm_head_bias=bb,
                beta=0.5,
                alpha=1.0,
                grad_in_forward=True,
                backend=backend,
                vocab_parallel=vp,
            )
            out.loss.backward()
            got.append((out.loss, hh.grad, ww.grad, bb.grad))
        (loss, dh, dw, db), (rloss, rdh, rdw, rdb) = got
        bound = torch_err_bound(0.0, f64)
        res["values"]["empty_shard"] = {
            "value": [rel_err(loss, rloss), bound],
            "dH": [rel_err(dh, rdh), bound],
            "dW": [rel_err(dw, rdw[rank : rank + rows2]) if rows2 else float(dw.numel()), bound],
            "db": [rel_err(db, rdb[rank : rank + rows2]) if rows2 else float(db.numel()), bound],
        }

    # ---- shards given out of rank order through vocab_start (rank r holds the shard of rank world-1-r)
    mirrored = layout[world - 1 - rank]
    vp = VocabParallel(group, vocab_start=mirrored[0])
    ref64 = logprob_grads(h, w, b, y, g, f64, "bias_scale_softcap", "reference")
    got = logprob_grads(h, w, b, y, g, f64, "bias_scale_softcap", "torch", mirrored, vp)
    res["values"]["vocab_start_reordered"] = compare(got, ref64, ref64, f64, mirrored[0], group)

    # ---- DTensor Shard(0) LM head (weight and bias), gradients back into the DTensor
    if world == 3:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        w_dt = torch.nn.Parameter(distribute_tensor(wf.clone(), mesh, [Shard(0)]))
        b_dt = torch.nn.Parameter(distribute_tensor(bf.clone(), mesh, [Shard(0)]))
        w_local, b_local, vp = from_dtensor(w_dt, b_dt)
        hh = leaf(hf, f64)
        out = hk.fused_haf_loss(hh, w_local, yf, lm_head_bias=b_local, beta=0.5, alpha=1.0, vocab_parallel=vp)
        out.loss.backward()
        ww, bb, hr = leaf(wf, f64), leaf(bf, f64), leaf(hf, f64)
        ref = hk.fused_haf_loss(hr, ww, yf, lm_head_bias=bb, beta=0.5, alpha=1.0, backend="reference")
        ref.loss.backward()
        bound = torch_err_bound(0.0, f64)
        res["values"]["dtensor"] = {
            "value": [rel_err(out.loss, ref.loss), bound],
            "dH": [rel_err(hh.grad, hr.grad), bound],
            "dW": [rel_err(w_dt.grad.full_tensor(), ww.grad), bound],
            "db": [rel_err(b_dt.grad.full_tensor(), bb.grad), bound],
            "local_rows": [float(w_local.shape[0]), float(shard[1])],
        }

    # ---- argument errors: raised on every rank, and the group stays usable afterwards
    start, rows = shard
    wl, hl = w[start : start + rows], h.clone()
    errs = res["errors"]
    errs["label_out_of_range"] = expect_error(
        lambda: hk.linear_logprobs(hl, wl, torch.full((N,), V), backend="torch", vocab_parallel=group)
    )
    bad_d = hl[:, :-1] if rank == world - 1 else hl  # only the last rank passes the wrong D
    errs["one_rank_bad_shape"] = expect_error(lambda: hk.linear_logprobs(bad_d, wl, y, vocab_parallel=group))
    y_rank = y.clone()
    y_rank[0] = (y[0] + rank) % V
    errs["labels_differ"] = expect_error(lambda: hk.linear_logprobs(hl, wl, y_rank, vocab_parallel=group))
    errs["overlap"] = expect_error(
        lambda: hk.linear_logprobs(hl, wl, y, vocab_parallel=VocabParallel(group, vocab_start=0))
    )
    mixed = VocabParallel(group, vocab_start=start if rank == 0 else None)
    errs["mixed_vocab_start"] = expect_error(lambda: hk.linear_logprobs(hl, wl, y, vocab_parallel=mixed))
    errs["bad_type"] = expect_error(lambda: hk.linear_logprobs(hl, wl, y, vocab_parallel="tp"))
    errs["reference_backend"] = expect_error(
        lambda: hk.linear_logprobs(hl, wl, y, backend="reference", vocab_parallel=group)
    )
    bad_rewards = torch.zeros(2 * PAIRS + (1 if rank == 0 else 0))  # fused_haf_loss: only rank 0's rewards are bad
    errs["fused_one_rank_bad_rewards"] = expect_error(
        lambda: hk.fused_haf_loss(hf, wl, yf, bad_rewards, vocab_parallel=group)
    )
    after = hk.linear_logprobs(hl, wl, y, backend="torch", vocab_parallel=group)  # no collective left unmatched
    errs["after"] = rel_err(after, hk.linear_logprobs(h, w, y, backend="reference"))
    return res


def _spawn(world: int, tmp_path) -> list[dict]:
    """Run ``_worker`` on ``world`` spawned ranks; fail (never hang) after ``JOIN_TIMEOUT_S``."""
    store, out_dir = str(tmp_path / "store"), str(tmp_path)
    # forkserver: one clean process imports torch, haf_kernels and this module once and forks the ranks from it (a
    # plain fork of pytest could inherit a started OpenMP pool; spawn would import everything once per rank)
    multiprocessing.get_context("forkserver").set_forkserver_preload(["torch", "haf_kernels", __name__])
    ctx = mp.start_processes(
        _worker, args=(world, store, out_dir, BACKENDS), nprocs=world, join=False, start_method="forkserver"
    )
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{world} vocab-parallel ranks did not finish within {JOIN_TIMEOUT_S} s (a hang?)")
    finally:
        for p in ctx.processes:  # only ours, by handle; a no-op once they have exited
            if p.is_alive():
                p.kill()
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> list[dict]:
    return _spawn(3, tmp_path_factory.mktemp("vocab_parallel"))


@pytest.fixture(params=["world2", "world3"])
def ranks(request, spawned) -> list[dict]:
    """Per rank of that pass, what it measured (the 2-rank pass ran on ranks 0 and 1)."""
    return [r[request.param] for r in spawned if r[request.param] is not None]


def _check_values(ranks: list[dict], prefix: str) -> None:
    seen = 0
    for r, res in enumerate(ranks):
        for key, outs in res["values"].items():
            if not key.startswith(prefix):
                continue
            for name, (err, bound) in outs.items():
                seen += 1
                assert err == err and err <= bound, f"rank {r} {key} {name}: rel err {err:.2e} > bound {bound:.2e}"
    assert seen > 0, f"no results for {prefix}"


def test_linear_logprobs_matches_unsharded_reference(ranks):
    """Values, dH (all-reduced), the shard's dW and db, for every backend, dtype, softcap/scale/bias."""
    _check_values(ranks, "linear_logprobs/")
    world = len(ranks)
    expected = {
        f"linear_logprobs/{b}/{str(d)[6:]}/{c}" for b in BACKENDS for d in DTYPES[b] for c in CASES if runs(b, world, c)
    }
    assert expected <= set(ranks[0]["values"])


def test_partial_grad_hidden_sums_to_full(ranks):
    _check_values(ranks, "partial_dH/")


def test_fused_haf_loss_matches_unsharded_reference(ranks):
    """Loss and gradients of the whole HaF loss, 3-GEMM (gradients in forward) and recompute paths."""
    _check_values(ranks, "fused_haf_loss/")
    assert any(k.endswith("/3gemm") for k in ranks[0]["values"]) and any(
        k.endswith("/recompute") for k in ranks[0]["values"]
    )


def test_vocab_start_in_any_order(ranks):
    _check_values(ranks, "vocab_start_reordered")


def test_sequence_logprobs(ranks):
    _check_values(ranks, "sequence_logprobs")


def test_empty_shard(ranks):
    """A rank may hold no rows (DTensor's ``Shard(0)`` of V = 2 over 3 ranks): it still joins every collective."""
    if len(ranks) != 3:
        pytest.skip("the empty shard runs in the 3-rank pass")
    _check_values(ranks, "empty_shard")


def test_dtensor_shard0_head(ranks):
    if len(ranks) != 3:
        pytest.skip("the DTensor case runs in the 3-rank pass")
    _check_values(ranks, "dtensor")


def test_errors_raise_on_every_rank(ranks):
    world = len(ranks)
    for r, res in enumerate(ranks):
        e = res["errors"]
        assert e["label_out_of_range"].startswith("ValueError") and f"must be in [0, {V})" in e["label_out_of_range"]
        if r == world - 1:
            assert "must share D" in e["one_rank_bad_shape"], e["one_rank_bad_shape"]
        else:
            assert f"rank(s) [{world - 1}]" in e["one_rank_bad_shape"], e["one_rank_bad_shape"]
        assert "labels differ across the ranks" in e["labels_differ"]
        assert "without gaps or overlaps" in e["overlap"]
        assert "given on every rank or on none" in e["mixed_vocab_start"]
        assert e["bad_type"].startswith("TypeError") and "vocab_parallel must be" in e["bad_type"]
        assert "backend='reference' has no vocab-parallel form" in e["reference_backend"]
        if r == 0:
            assert "rewards must be [2B]" in e["fused_one_rank_bad_rewards"]
        else:
            assert "rank(s) [0]" in e["fused_one_rank_bad_rewards"]
        assert e["after"] <= torch_err_bound(0.0, torch.float32) + 1e-6


def test_haf_loss_module_passes_vocab_parallel():
    """``HafLoss(vocab_parallel=...)`` reaches ``fused_haf_loss`` (a bad value is refused there, by name)."""
    hidden = torch.randn(2 * PAIRS, T, D)
    weight = torch.randn(V, D)
    labels = torch.randint(0, V, (2 * PAIRS, T))
    module = hk.HafLoss(vocab_parallel="not a group")
    assert "vocab_parallel='not a group'" in repr(module)
    with pytest.raises(TypeError, match="vocab_parallel must be"):
        module(hidden, weight, labels, torch.randn(2 * PAIRS))
    assert hk.VocabParallel is VocabParallel
