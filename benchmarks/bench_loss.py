"""Forward+backward of the full HaF loss: haf_kernels backends against naive PyTorch and the peers.

The loss (HaF-RM, reference-free so that every method computes the same thing)::

    loss = reward_weight · mean(−logσ(r_c − r_r)) + alpha · mean(−logσ(β · (logπ_c − logπ_r)))

with β = 0.1, alpha = 0.2, reward_weight = 1 and ``logπ`` the sequence sums of token log-probs of
``hidden [2B, T, D] @ weight[V, D]ᵀ``. Methods (each in a fresh subprocess, warm-up excluded):

    floor          the three raw GEMMs of the same shapes (H·Wᵀ, G·W, Gᵀ·H), no loss at all
    naive          materialised fp32 logits + log_softmax + gather (what TRL does)
    naive-compile  torch.compile of ``naive``
    haf-<backend>  fused_haf_loss(..., backend=<backend>) for torch / cpp / triton (reference: memcheck)
    haf-<backend>-keep        the same with grad_in_forward=True (gradients finished in the forward, 3 GEMMs)
    haf-<backend>-recompute   the same with grad_in_forward=False (lse saved, logits recomputed in backward)
    haf-<...>-filter          any haf method with HAF_GRAD_FILTER=GRAD_FILTER (gradient filtering on)
    liger          Liger-Kernel LigerFusedLinearDPOLoss (compiled) + the same BT term
    liger-ce       Liger-Kernel LigerFusedLinearCrossEntropyLoss(reduction="none") -> sequence log-probs
    cce            Cut Cross-Entropy per-token losses -> sequence log-probs -> the same O(B) loss
    trl            TRL's ChunkedLogProbFunction (trl.kernels.chunked_logprob) -> sequence log-probs
    debug-hang     sleeps for an hour (exercises the per-method timeout; in no preset)

Errors are ‖x − x_ref‖/‖x_ref‖ of the loss and of the gradients of hidden and weight against a reference
(``backend="reference"`` on the full problem, one chunk of pairs at a time: the loss is a mean of per-pair
terms, so chunking is exact), in float64 (CPU presets) or float32 (``gpu``: computed once per shape on the
device, cheap next to the bf16 errors it judges).

Isolation: the CPU presets run every method in a fresh subprocess; ``gpu`` and ``dryrun`` run all methods in
one worker process, one after another, each under its own timeout (a hung or crashed method kills that worker,
is recorded as ``timeout`` / ``error`` / ``oom``, and a fresh worker goes on with the rest), all within
``--budget`` seconds (what is left when it runs out is recorded as ``skipped``).

    python benchmarks/bench_loss.py --preset cpu            # writes benchmarks/results/cpu-<date>-loss.*
    python benchmarks/bench_loss.py --preset gpu            # bf16, two LLM-sized shapes, ~5 min on an H100
    python benchmarks/bench_loss.py --preset dryrun         # the gpu preset's plumbing on CPU, tiny shapes
    python benchmarks/bench_loss.py --preset memcheck       # torch backend peak RSS <= reference / 3 ?
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu  # noqa: E402

BETA, ALPHA, REWARD_WEIGHT = 0.1, 0.2, 1.0
IGNORE = -100
SEED = 1234
PEAKY_TARGET_LOGIT = 15.0  # average extra logit of the target token in the "peaky" regime

GRAD_FILTER = 2.0**-12  # HAF_GRAD_FILTER of the "-filter" methods: bf16 eps / 32, CCE's default filter_eps
TRL_CHUNK = 32768  # vocab columns per tile, as TRL's trainer calls ChunkedLogProbFunction

ALL_METHODS = ["floor", "naive", "naive-compile", "haf-torch", "haf-cpp", "haf-triton", "liger", "cce"]
# The GPU suite: every method that runs on CUDA, naive-compile left out (minutes of torch.compile per shape).
SUITE_METHODS = [
    "floor",
    "haf-triton-keep",
    "haf-triton-recompute",
    "haf-triton-keep-filter",
    "haf-triton-recompute-filter",
    "haf-torch",
    "liger",
    "liger-ce",
    "cce",
    "trl",
    "naive",
]
# Seconds each method may take in the one-process runner (warm-up with any JIT/compile included). The first
# Triton method of a run also compiles the kernels (no cache on a bare machine); Liger's DPO loss compiles.
METHOD_TIMEOUTS = {
    "floor": 45,
    "naive": 60,
    "haf-torch": 60,
    "liger": 120,
    "liger-ce": 60,
    "cce": 90,
    "trl": 60,
}
HAF_TRITON_TIMEOUT = 90
DEFAULT_TIMEOUT = 60
SETUP_TIMEOUT = 120  # imports, inputs and the reference of one block, between two methods

# shapes are (pairs, T, D, V); N = 2 · pairs · T tokens
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        device="cpu",
        dtype="float32",
        shapes=[(2, 16, 32, 512)],
        reps=3,
        warmup=1,
        threads=1,
        methods=ALL_METHODS,
        regimes=["random", "peaky"],
    ),
    "cpu": dict(
        device="cpu",
        dtype="float32",
        shapes=[(4, 256, 512, 32000), (8, 512, 1024, 32000)],
        reps=5,
        warmup=1,
        methods=ALL_METHODS,
        regimes=["random", "peaky"],
    ),
    "gpu": dict(  # 16384 tokens × 4096 × 128256 (Llama-3 8B head), 8192 × 2304 × 256000 (Gemma-2 2B head)
        device="cuda",
        dtype="bfloat16",
        shapes=[(16, 512, 4096, 128256), (8, 512, 2304, 256000)],
        reps=5,
        warmup=2,
        methods=SUITE_METHODS,
        regimes=["random", "peaky"],
        isolation="run",
        reference="float32",
    ),
    "dryrun": dict(  # the gpu preset's plumbing on CPU (TRITON_INTERPRET=1 for haf-triton), tiny shapes
        device="cpu",
        dtype="float32",
        shapes=[(1, 8, 16, 128), (1, 6, 16, 96)],
        reps=1,
        warmup=0,
        threads=1,
        methods=SUITE_METHODS,
        regimes=["peaky"],
        isolation="run",
        reference="float64",
    ),
    "memcheck": dict(
        device="cpu",
        dtype="float32",
        shapes=[(4, 256, 512, 32000)],
        reps=3,
        warmup=1,
        methods=["haf-reference", "haf-torch", "haf-torch-recompute"],
        regimes=["random"],
    ),
}


# ------------------------------------------------------------------------------------------------ inputs


def make_inputs(shape, regime: str, dtype, device: str, with_floor_grad: bool = False):
    """Seeded inputs ``(hidden [2B,T,D], weight [V,D], labels [2B,T], rewards [2B])`` (+ G [N,V] for floor).

    ``random``: hidden ~ N(0, 1), weight ~ N(0, 1/D) (logits ~ N(0, 1)), uniform labels.
    ``peaky`` (trained-like): as random, then each target row of the LM head gets ``c·h_t/D`` added for every
    token t that targets it, so the target logit is about ``PEAKY_TARGET_LOGIT`` above the rest and the
    softmax is sharply peaked, as in a trained model.
    """
    import torch

    pairs, t, d, v = shape
    gen = torch.Generator(device=device).manual_seed(SEED)
    hidden = torch.randn(2 * pairs, t, d, generator=gen, device=device, dtype=torch.float32)
    weight = torch.randn(v, d, generator=gen, device=device, dtype=torch.float32) / math.sqrt(d)
    labels = torch.randint(0, v, (2 * pairs, t), generator=gen, device=device)
    rewards = torch.randn(2 * pairs, generator=gen, device=device, dtype=torch.float32)
    if regime == "peaky":
        flat_h, flat_y = hidden.reshape(-1, d), labels.reshape(-1)
        weight.index_add_(0, flat_y, flat_h * (PEAKY_TARGET_LOGIT / d))
    elif regime != "random":
        raise ValueError(f"regime must be 'random' or 'peaky', got {regime!r}")
    g = None
    if with_floor_grad:
        g = torch.randn(2 * pairs * t, v, generator=gen, device=device, dtype=torch.float32).to(dtype)
    return hidden.to(dtype), weight.to(dtype), labels, rewards, g


def bt_term(rewards):
    import torch.nn.functional as F

    b = rewards.shape[0] // 2
    return -F.logsigmoid(rewards[:b] - rewards[b:]).mean()


def dpo_term(seq):
    import torch.nn.functional as F

    b = seq.shape[0] // 2
    return -F.logsigmoid(BETA * (seq[:b] - seq[b:])).mean()


def naive_loss(hidden, weight, labels, rewards):
    """What TRL does: full fp32 logits, log_softmax, gather, sequence sums, then the O(B) loss."""
    logits = (hidden @ weight.T).float()
    mask = labels != IGNORE
    logp = logits.log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    seq = (logp * mask).sum(-1)
    return REWARD_WEIGHT * bt_term(rewards) + ALPHA * dpo_term(seq)


# ------------------------------------------------------------------------------------------------ methods


class Unavailable(Exception):
    """A method that cannot run here: ``status`` is 'not installed' or 'not available'."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def parse_haf_method(name: str) -> tuple[str, bool | None, bool]:
    """``haf-<backend>[-keep|-recompute][-filter]`` -> (backend, grad_in_forward, gradient filtering on)."""
    rest = name[len("haf-") :]
    filt = rest.endswith("-filter")
    rest = rest[: -len("-filter")] if filt else rest
    gif = None  # library default: gradients finished inside the forward where the backend keeps logits
    for suffix, value in (("-keep", True), ("-recompute", False)):
        if rest.endswith(suffix):
            rest, gif = rest[: -len(suffix)], value
    return rest, gif, filt


@contextlib.contextmanager
def env_vars(values: dict[str, str]):
    """Set environment variables for the duration of the block, then restore them."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def build_method(name: str, device: str, hidden, weight, labels, rewards, g):
    """A zero-argument callable running one forward+backward of method ``name`` (grads land in ``.grad``)."""
    import torch

    if name == "floor":
        n, dim = hidden.shape[0] * hidden.shape[1], hidden.shape[2]
        h2 = hidden.detach().reshape(n, dim)
        w = weight.detach()

        @torch.no_grad()
        def floor():
            z = h2 @ w.T  # forward logits          [N, V]
            dh = g @ w  # dL/dH from dL/dlogits     [N, D]
            dw = g.T @ h2  # dL/dW                  [V, D]
            return z, dh, dw

        return floor

    if name.startswith("haf-"):
        from haf_kernels import backends, fused_haf_loss

        backend, gif, filt = parse_haf_method(name)
        avail = backends.available()
        if not avail.get(backend, False):
            raise Unavailable("not available", backends.unavailable_reasons().get(backend, "unknown backend"))
        if not backends.supports_device(backend, torch.device(device)):
            raise Unavailable("not available", f"backend {backend!r} does not run on {device} tensors")
        if filt and not backends.capabilities(backend).grad_filter:
            raise Unavailable("not available", f"backend {backend!r} does not implement gradient filtering")
        env = {"HAF_GRAD_FILTER": repr(GRAD_FILTER) if filt else "0"}

        def haf():
            with env_vars(env):  # read by haf_kernels.tuning at every call, backward included
                out = fused_haf_loss(
                    hidden,
                    weight,
                    labels,
                    rewards,
                    beta=BETA,
                    alpha=ALPHA,
                    reward_weight=REWARD_WEIGHT,
                    backend=backend,
                    grad_in_forward=gif,
                )
                out.loss.backward()
            return out.loss

        return haf

    if name == "debug-hang":  # a method that never finishes: exercises the per-method timeout

        def hang():
            time.sleep(3600)

        return hang

    if name == "naive" and device == "cuda":
        n_logits = hidden.shape[0] * hidden.shape[1] * weight.shape[0]
        need = 20 * n_logits  # dtype + fp32 logits, log-softmax, their gradients: ~5 fp32 copies
        free = torch.cuda.mem_get_info()[0]
        if need > free:
            raise Unavailable("skipped", f"needs ~{need / 2**30:.0f} GiB for full logits, {free / 2**30:.0f} GiB free")

    if name in ("naive", "naive-compile"):
        fn = torch.compile(naive_loss) if name == "naive-compile" else naive_loss

        def naive():
            loss = fn(hidden, weight, labels, rewards)
            loss.backward()
            return loss

        return naive

    if name == "liger":
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
        except ImportError as exc:
            raise Unavailable("not installed", f"liger-kernel: {exc}") from exc
        # forward(lin_weight, _input[2B, T, D], target[2B, T]); returns (loss, aux); loss = mean over pairs of
        # −logσ(β·d); use_ref_model=False is the reference-free loss; compute_nll_loss=False drops the SFT term.
        mod = LigerFusedLinearDPOLoss(
            ignore_index=IGNORE,
            beta=BETA,
            compute_nll_loss=False,
            compiled=True,
            use_ref_model=False,
            average_log_prob=False,
            loss_type="sigmoid",
        )

        def liger():
            dpo = mod(weight, hidden, labels)[0]
            loss = REWARD_WEIGHT * bt_term(rewards) + ALPHA * dpo
            loss.backward()
            return loss

        return liger

    if name == "liger-ce":
        try:
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        except ImportError as exc:
            raise Unavailable("not installed", f"liger-kernel: {exc}") from exc
        if device != "cuda":
            raise Unavailable("not available", "Liger's fused linear cross-entropy is a Triton kernel (CUDA only)")
        # reduction="none": per-token −logp, gradients recomputed in backward with the per-token upstream gradient
        ce = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="none")
        two_b, t, d = hidden.shape

        def liger_ce():
            tok = ce(weight, hidden.reshape(two_b * t, d), labels.reshape(two_b * t))
            seq = -tok.float().view(two_b, t).sum(-1)
            loss = REWARD_WEIGHT * bt_term(rewards) + ALPHA * dpo_term(seq)
            loss.backward()
            return loss

        return liger_ce

    if name == "cce":
        try:
            from cut_cross_entropy import linear_cross_entropy
        except ImportError as exc:
            raise Unavailable("not installed", f"cut-cross-entropy: {exc}") from exc
        kw = {"impl": "torch_compile"} if device == "cpu" else {}

        def cce():
            tok = linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE, reduction="none", **kw)
            seq = -tok.float().sum(-1)  # per-token −logp (0 where ignored) -> sequence log-probs
            loss = REWARD_WEIGHT * bt_term(rewards) + ALPHA * dpo_term(seq)
            loss.backward()
            return loss

        return cce

    if name == "trl":
        try:
            import trl.trainer.utils  # noqa: F401  (the function's backward imports it at call time)
            from trl.kernels.chunked_logprob import ChunkedLogProbFunction
        except Exception as exc:  # trl needs transformers, accelerate, datasets, ... besides its own wheel
            raise Unavailable("not installed", f"trl: {type(exc).__name__}: {exc}") from exc
        mask = labels != IGNORE
        flat_mask = mask.reshape(-1)
        two_b, t, d = hidden.shape

        def trl_logprob():
            # as TRL's trainer calls it: only the scored positions, no optional outputs, vocab tiles of 32768
            h = hidden.reshape(two_b * t, d)[flat_mask]
            y = labels.reshape(-1)[flat_mask]
            logp = ChunkedLogProbFunction.apply(h, weight, None, y, 1.0, TRL_CHUNK, None, 1.0, ())[0]
            seq = logp.new_zeros(mask.shape).masked_scatter(mask, logp).float().sum(-1)
            loss = REWARD_WEIGHT * bt_term(rewards) + ALPHA * dpo_term(seq)
            loss.backward()
            return loss

        return trl_logprob

    raise ValueError(f"unknown method {name!r}")


# ------------------------------------------------------------------------------------------------ reference


def compute_reference(spec: dict[str, Any], ref_dtype: str):
    """Loss and gradients of the full problem with ``backend='reference'`` in ``ref_dtype``, chunked by pairs.

    Returns ``({"loss", "dh" [2B,T,D], "dw" [V,D]}, info)``; the tensors stay on the inputs' device.
    """
    import torch

    from haf_kernels import fused_haf_loss

    device, shape = spec["device"], tuple(spec["shape"])
    pairs, t, d, v = shape
    hidden, weight, labels, rewards, _ = make_inputs(shape, spec["regime"], getattr(torch, spec["dtype"]), device)
    rdt = getattr(torch, ref_dtype)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # a true fp32 reference, not TF32
    hr, wr, rr = hidden.to(rdt), weight.to(rdt).requires_grad_(True), rewards.to(rdt)
    del hidden, weight
    budget = 512 << 20  # bytes of reference logits per chunk
    per = max(1, budget // (2 * t * v * hr.element_size()))
    dh = torch.zeros_like(hr)
    dw = torch.zeros_like(wr)
    loss = torch.zeros((), dtype=torch.float64, device=device)
    t0 = time.perf_counter()
    for p0 in range(0, pairs, per):
        p1 = min(p0 + per, pairs)
        rows = torch.cat([torch.arange(p0, p1, device=device), torch.arange(pairs + p0, pairs + p1, device=device)])
        h = hr.index_select(0, rows).requires_grad_(True)
        out = fused_haf_loss(
            h,
            wr,
            labels.index_select(0, rows),
            rr.index_select(0, rows),
            beta=BETA,
            alpha=ALPHA,
            reward_weight=REWARD_WEIGHT,
            backend="reference",
        )
        part = out.loss * ((p1 - p0) / pairs)
        gh, gw = torch.autograd.grad(part, [h, wr])
        dh.index_copy_(0, rows, gh)
        dw += gw
        loss += part.detach().double()
        del out, part, gh, gw, h
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    info = {
        "status": "ok",
        "dtype": ref_dtype,
        "loss": loss.item(),
        "time_s": round(elapsed, 2),
        "pairs_per_chunk": per,
    }
    return {"loss": loss.item(), "dh": dh, "dw": dw.detach()}, info


def reference_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Worker job of the per-method isolation: the float64 reference, saved to ``spec['ref_path']``."""
    import torch

    ref, info = compute_reference(spec, "float64")
    keep64 = ref["dw"].numel() * 8 <= (1 << 30)
    store = torch.float64 if keep64 else torch.float32
    torch.save(
        {"loss": ref["loss"], "dh": ref["dh"].to(store).cpu(), "dw": ref["dw"].to(store).cpu()}, spec["ref_path"]
    )
    return {**info, "stored_dtype": str(store)[6:]}


def rel_err(a, b, rows: int = 4096) -> float:
    """‖a − b‖ / ‖b‖ in float64, a row block at a time (the inputs may be large)."""
    import torch

    a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    num = den = 0.0
    for i in range(0, a2.shape[0], rows):
        x = a2[i : i + rows].to(torch.float64)
        y = b2[i : i + rows].to(device=x.device, dtype=torch.float64)
        num += (x - y).pow(2).sum().item()
        den += y.pow(2).sum().item()
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


# ------------------------------------------------------------------------------------------------- worker


def measure(spec: dict[str, Any], ref: dict[str, Any] | None) -> dict[str, Any]:
    """Build seeded inputs, run ``warmup`` + ``reps`` forward+backward steps of ``spec['method']``; one result row."""
    import torch

    device, name = spec["device"], spec["method"]
    dtype = getattr(torch, spec["dtype"])
    cuda = device == "cuda"
    rss_start = bu.rss_bytes()
    alloc_start = torch.cuda.memory_allocated() if cuda else 0  # e.g. the reference held by a suite worker
    hidden, weight, labels, rewards, g = make_inputs(
        tuple(spec["shape"]), spec["regime"], dtype, device, with_floor_grad=name == "floor"
    )
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    rewards.requires_grad_(True)
    rss_made = bu.rss_bytes()
    try:
        fn = build_method(name, device, hidden, weight, labels, rewards, g)
    except Unavailable as exc:
        return {"status": exc.status, "reason": exc.reason}
    if cuda:
        torch.cuda.synchronize()
        base_alloc = torch.cuda.memory_allocated()
    rss_inputs = bu.rss_bytes()

    def step():
        hidden.grad = weight.grad = rewards.grad = None
        return bu.timed_call(fn, cuda)

    t_first = None
    for i in range(spec["warmup"]):
        dt_, _ = step()
        if i == 0:
            t_first = dt_
    rss_warm = bu.rss_bytes()
    hwm_reset = bu.reset_hwm() if not cuda else False
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    out = None
    for _ in range(spec["reps"]):
        dt_, out = step()
        times.append(dt_)
    res: dict[str, Any] = {
        "status": "ok",
        "time_ms": round(1e3 * bu.median(times), 3),
        "time_ms_min": round(1e3 * min(times), 3),
        "times_ms": [round(1e3 * x, 3) for x in times],
        "first_call_s": None if t_first is None else round(t_first, 3),
        "reps": spec["reps"],
        "warmup": spec["warmup"],
    }
    if cuda:
        res["mem"] = {
            "peak_above_inputs_mib": bu.mib(torch.cuda.max_memory_allocated() - base_alloc),
            "inputs_mib": bu.mib(base_alloc - alloc_start),
        }
    else:
        peak_timed = bu.hwm_bytes()
        res["mem"] = {
            "peak_rss_mib": bu.mib(bu.lifetime_peak_bytes()),
            "peak_rss_timed_mib": bu.mib(peak_timed) if hwm_reset else None,
            "rss_after_inputs_mib": bu.mib(rss_inputs),
            "inputs_mib": bu.mib(rss_made - rss_start),
            "setup_mib": bu.mib(rss_inputs - rss_made),
            # upper bound: includes what warm-up (compilation, allocator pools) left resident
            "peak_above_inputs_mib": bu.mib((peak_timed if hwm_reset else bu.lifetime_peak_bytes()) - rss_inputs),
            # lower bound: rise of the high-water mark during the timed reps over the RSS after warm-up
            "peak_above_warm_mib": bu.mib(peak_timed - rss_warm) if hwm_reset else None,
            "hwm_reset_after_warmup": hwm_reset,
        }
    if name != "floor":
        res["loss"] = float(out.detach().float().item())
        if ref is not None:
            res["err"] = {
                "loss": abs(res["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-30),
                "hidden": rel_err(hidden.grad.detach(), ref["dh"]),
                "weight": rel_err(weight.grad.detach(), ref["dw"]),
            }
    return res


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Per-method isolation: one method (or the float64 reference) in this fresh process."""
    import torch

    torch.manual_seed(SEED)
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    if spec["method"] == "fp64-reference":
        return reference_job(spec)
    ref = None
    ref_path = spec.get("ref_path")
    if ref_path and os.path.exists(ref_path):
        ref = torch.load(ref_path, map_location="cpu", weights_only=True)
    return measure(spec, ref)


def _line(tag: str, obj: dict[str, Any]) -> None:
    sys.stdout.write(f"{tag} {json.dumps(obj)}\n")
    sys.stdout.flush()


def _fatal_device_error(msg: str) -> bool:
    """An error after which this process's CUDA context is unusable (the next method needs a fresh worker)."""
    low = msg.lower()
    return "out of memory" not in low and any(
        k in low for k in ("illegal memory access", "device-side assert", "cuda error", "unspecified launch failure")
    )


def suite_worker(spec: dict[str, Any]) -> int:
    """One-process isolation: every (block, method) of ``spec['blocks']`` in turn, results as tagged lines.

    Per block: ``REFSTART``/``REF`` (the reference, unless ``no_ref``), then per method ``START`` and ``RESULT``.
    Exits with status 3 after a method left the device unusable, so that the parent starts a fresh worker.
    """
    import torch

    torch.manual_seed(SEED)
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    cuda = spec["device"] == "cuda"
    for blk in spec["blocks"]:
        base = {k: spec[k] for k in ("device", "dtype", "reps", "warmup")}
        base.update(shape=blk["shape"], regime=blk["regime"], reps=blk.get("reps") or spec["reps"])
        ref = None
        if blk.get("reference"):
            _line("REFSTART", {"block": blk["index"]})
            try:
                ref, info = compute_reference(base, blk["reference"])
            except Exception as exc:
                info = {"status": "oom" if "out of memory" in str(exc).lower() else "error", "reason": str(exc)[:800]}
            _line("REF", {"block": blk["index"], **info})
            gc.collect()
        for m in blk["methods"]:
            _line("START", {"block": blk["index"], "method": m})
            fatal = False
            try:
                r = measure({**base, "method": m}, ref)
            except Exception as exc:
                import traceback

                traceback.print_exc()
                msg = f"{type(exc).__name__}: {exc}"
                r = {"status": "oom" if "out of memory" in msg.lower() else "error", "reason": msg[:800]}
                fatal = cuda and _fatal_device_error(msg)
            _line("RESULT", {"block": blk["index"], "method": m, **r})
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            if fatal:
                return 3
        del ref
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return 0


# ---------------------------------------------------------------------------------------- one-process runner


def method_timeout(name: str, override: float | None) -> float:
    """Seconds method ``name`` may take in the one-process runner (``override`` wins)."""
    if override is not None:
        return override
    if name.startswith("haf-triton"):
        return HAF_TRITON_TIMEOUT
    return METHOD_TIMEOUTS.get(name, DEFAULT_TIMEOUT)


def run_in_one_process(
    script: str,
    common: dict[str, Any],
    blocks: list[dict[str, Any]],
    timeout: float | None,
    deadline: float,
    on_result=None,
) -> tuple[list[dict[str, dict[str, Any]]], list[dict[str, Any] | None]]:
    """Run every (block, method) in a worker process, restarting it after a timeout or crash.

    ``blocks``: ``[{"shape", "regime", "methods", "reference"}]``; ``deadline``: ``time.monotonic()`` value after
    which nothing more is started (running methods are stopped, the rest recorded as ``skipped``).
    Returns per block ``{method: row}`` and the reference info; ``on_result(block_index, rows, refs)`` after
    each row.
    """
    rows: list[dict[str, dict[str, Any]]] = [{} for _ in blocks]
    refs: list[dict[str, Any] | None] = [None for _ in blocks]
    no_ref: set[int] = set()

    def pending() -> list[dict[str, Any]]:
        out = []
        for i, blk in enumerate(blocks):
            left = [m for m in blk["methods"] if m not in rows[i]]
            if left:
                want_ref = blk.get("reference") if i not in no_ref else None
                keys = ("shape", "regime", "reps")
                out.append({"index": i, "methods": left, "reference": want_ref, **{k: blk.get(k) for k in keys}})
            elif refs[i] is None and blk.get("reference") and i not in no_ref:
                refs[i] = {"status": "skipped", "reason": "no method left to compare"}
        return out

    def record(i: int, m: str, row: dict[str, Any]) -> None:
        rows[i][m] = row
        log(f"  {m:28s} {row['status']:13s} {summary(row)}")
        if on_result is not None:
            on_result(i, rows, refs)

    while True:
        todo = pending()
        if not todo:
            break
        if time.monotonic() >= deadline:
            for blk in todo:
                for m in blk["methods"]:
                    record(blk["index"], m, {"status": "skipped", "reason": "suite time budget used up"})
            break
        spec = {**common, "blocks": todo}
        cmd = [sys.executable, script, "--suite-worker", "--spec", json.dumps(spec)]
        env = dict(os.environ)
        env.setdefault("PYTHONHASHSEED", "0")
        env["PYTHONPATH"] = os.pathsep.join([str(bu.ROOT)] + [x for x in [env.get("PYTHONPATH")] if x])
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=bu.ROOT,
            start_new_session=True,
        )
        lines: queue.Queue = queue.Queue()
        tail: deque = deque(maxlen=8)

        def pump_out(stream=proc.stdout, q=lines) -> None:
            for ln in stream:
                q.put(ln.rstrip("\n"))
            q.put(None)

        def pump_err(stream=proc.stderr, t=tail) -> None:
            for ln in stream:
                sys.stderr.write(ln)
                t.append(ln.rstrip("\n"))
            sys.stderr.flush()

        threads = [threading.Thread(target=f, daemon=True) for f in (pump_out, pump_err)]
        for th in threads:
            th.start()
        try:
            phase, current, started = "setup", None, time.monotonic()
            progressed = False
            first = todo[0]
            while True:
                now = time.monotonic()
                limit = {"setup": SETUP_TIMEOUT, "reference": SETUP_TIMEOUT}.get(phase) or method_timeout(
                    current[1], timeout
                )
                wait = min(started + limit, deadline) - now
                try:
                    line = lines.get(timeout=max(wait, 0.0))
                except queue.Empty:
                    _kill(proc)
                    budget = started + limit > deadline
                    why = "suite time budget used up" if budget else f"ran past its {limit:.0f} s timeout"
                    if phase == "method":
                        record(current[0], current[1], {"status": "timeout", "reason": why})
                    elif phase == "reference":
                        refs[current[0]] = {"status": "timeout", "reason": f"reference {why}"}
                        no_ref.add(current[0])
                    elif not progressed:  # stuck before its first method: charge that method, so the run moves on
                        record(
                            first["index"], first["methods"][0], {"status": "timeout", "reason": f"worker setup {why}"}
                        )
                    break
                if line is None:  # the worker exited
                    rc = proc.wait()
                    for th in threads:
                        th.join(timeout=5)
                    reason = f"worker exit {rc}: " + " | ".join(tail)[-800:]
                    status = "oom" if rc in (-9, 137) or "out of memory" in reason.lower() else "error"
                    if phase == "method":
                        record(current[0], current[1], {"status": status, "reason": reason})
                    elif phase == "reference":
                        refs[current[0]] = {"status": status, "reason": reason}
                        no_ref.add(current[0])
                    elif not progressed and rc != 0:
                        record(first["index"], first["methods"][0], {"status": status, "reason": reason})
                    break
                tag, _, payload = line.partition(" ")
                if tag not in ("START", "RESULT", "REFSTART", "REF"):
                    continue  # stray output of a method
                obj = json.loads(payload)
                i = obj.pop("block")
                started = time.monotonic()
                if tag == "REFSTART":
                    phase, current = "reference", (i, None)
                elif tag == "REF":
                    refs[i] = obj
                    if obj.get("status") == "ok":
                        where = f"{tuple(blocks[i]['shape'])} {blocks[i]['regime']}"
                        log(f"{where}: {obj['dtype']} reference {obj['time_s']} s")
                    else:
                        no_ref.add(i)
                    phase, current = "setup", None
                elif tag == "START":
                    phase, current = "method", (i, obj["method"])
                else:
                    m = obj.pop("method")
                    record(i, m, obj)
                    phase, current, progressed = "setup", None, True
        finally:
            _kill(proc)
    return rows, refs


def _kill(proc: subprocess.Popen) -> None:
    """Stop a worker and everything it started (its own session), then reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


# ------------------------------------------------------------------------------------------------- driver


def flops_bytes(shape, itemsize: int) -> dict[str, float]:
    """Predicted floor: 3 GEMMs of 2·N·V·D FLOPs; bytes a fused kernel must move (H, W, dH, dW once)."""
    pairs, t, d, v = shape
    n = 2 * pairs * t
    return {
        "N": n,
        "gemm_flops": 6.0 * n * v * d,
        "fused_min_bytes": float(itemsize * 2 * (n * d + v * d)),
        "logits_fp32_bytes": float(4 * n * v),
    }


def run(args: argparse.Namespace, on_block=None) -> dict[str, Any]:
    """Run every (shape, regime, method); ``on_block(res)`` after each shape/regime block (partial saves)."""
    import torch

    preset = dict(PRESETS[args.preset])
    if args.dtype:
        preset["dtype"] = args.dtype
    device = preset["device"]
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("preset needs a CUDA device and none is visible")
    methods = args.methods.split(",") if args.methods else preset["methods"]
    regimes = args.regimes.split(",") if args.regimes else preset["regimes"]
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")] if args.shapes else preset["shapes"]
    reps = args.reps or preset["reps"]
    warmup = preset["warmup"] if args.warmup is None else args.warmup
    threads = args.threads or preset.get("threads")
    isolation = preset.get("isolation", "method")
    ref_dtype = preset.get("reference", "float64")
    timeout = 3600.0 if args.timeout is None else args.timeout  # per worker, per-method isolation
    script = str(Path(__file__).resolve())
    results = []
    tmp = tempfile.TemporaryDirectory(prefix="haf-bench-")
    per_shape = [int(x) for x in args.reps_per_shape.split(",")] if args.reps_per_shape else []
    shape_reps = {}
    for i, shape in enumerate(shapes):
        shape_reps[shape] = per_shape[i] if i < len(per_shape) else reps
    res = {
        "bench": "loss",
        "preset": args.preset,
        "date": bu.now_iso(),
        "device": bu.device_info(device),
        "versions": bu.versions(),
        "dtype": preset["dtype"],
        "config": {
            "beta": BETA,
            "alpha": ALPHA,
            "reward_weight": REWARD_WEIGHT,
            "ref_logps": None,
            "reps": reps,
            "warmup": warmup,
            "seed": SEED,
            "threads": threads,
            "peaky_target_logit": PEAKY_TARGET_LOGIT,
            "concurrent_workers": args.jobs,
            "rounds": args.rounds,
            "reps_note": args.reps_note or None,
            "reps_per_shape": args.reps_per_shape or None,
            "isolation": isolation,
            "reference_dtype": None if args.no_errors else ref_dtype,
            "grad_filter": GRAD_FILTER,
            "budget_s": args.budget,
        },
        "results": results,
        "partial": True,
    }
    itemsize = torch.empty(0, dtype=getattr(torch, preset["dtype"])).element_size()
    if isolation == "run":
        blocks = [
            {
                "shape": list(shape),
                "regime": regime,
                "methods": methods,
                "reference": None if args.no_errors else ref_dtype,
            }
            for regime in regimes  # regime outer: every shape gets measured before the budget runs short
            for shape in shapes
        ]
        for blk in blocks:
            blk["reps"] = shape_reps[tuple(blk["shape"])]
        deadline = time.monotonic() + (args.budget if args.budget else 1e9)
        common = {"device": device, "dtype": preset["dtype"], "threads": threads, "warmup": warmup, "reps": reps}
        state: dict[str, Any] = {}

        def assemble() -> None:
            results.clear()
            for i, blk in enumerate(blocks):
                got = state["rows"][i] if state else {}
                rows = []
                for m in methods:
                    if m in got:
                        rows.append({**got[m], "method": m, "shape": blk["shape"], "regime": blk["regime"]})
                if not rows:
                    continue  # not reached yet (partial save)
                add_x_floor(rows)
                results.append(
                    {
                        "shape": dict(zip(("pairs", "T", "D", "V"), blk["shape"])),
                        "regime": blk["regime"],
                        "predicted": flops_bytes(tuple(blk["shape"]), itemsize),
                        "reference": state["refs"][i] if state else None,
                        "methods": rows,
                    }
                )

        def progress(i: int, rows, refs) -> None:
            if on_block is not None and len(rows[i]) == len(blocks[i]["methods"]):
                state.update(rows=rows, refs=refs)
                assemble()
                on_block(res)

        log(f"{len(blocks)} blocks x {len(methods)} methods in one worker process, budget {args.budget} s")
        rows_, refs_ = run_in_one_process(script, common, blocks, args.timeout, deadline, progress)
        state.update(rows=rows_, refs=refs_)
        assemble()
        tmp.cleanup()
        res["partial"] = False
        return res
    for shape in shapes:
        for regime in regimes:
            base = {
                "device": device,
                "dtype": preset["dtype"],
                "shape": list(shape),
                "regime": regime,
                "threads": threads,
            }
            ref_info = None
            ref_path = None
            if not args.no_errors:
                ref_path = os.path.join(tmp.name, f"ref-{'x'.join(map(str, shape))}-{regime}.pt")
                ref_info = bu.run_worker(script, {**base, "method": "fp64-reference", "ref_path": ref_path}, timeout)
                log(f"{shape} {regime}: fp64 reference {ref_info.get('status')} {ref_info.get('time_s', '')} s")

            def one(m: str, shape=shape, regime=regime, base=base, ref_path=ref_path) -> dict[str, Any]:
                spec = {**base, "method": m, "reps": shape_reps[shape], "warmup": warmup, "ref_path": ref_path}
                r = bu.run_worker(script, spec, timeout)
                r.update(method=m, shape=list(shape), regime=regime)
                log(f"  {m:14s} {r['status']:13s} {summary(r)}")
                return r

            if args.jobs > 1:  # smoke tests only: concurrent workers spoil each other's timings
                with ThreadPoolExecutor(args.jobs) as pool:
                    rows = list(pool.map(one, methods))
            else:
                # --rounds K: the whole method list K times, round by round, so a slow spell of the machine
                # (another VM on the host) falls on every method alike instead of on whichever ran then
                rounds = [[one(m) for m in methods] for _ in range(args.rounds)]
                rows = [merge_rounds([rnd[i] for rnd in rounds]) for i in range(len(methods))]
            add_x_floor(rows)
            results.append(
                {
                    "shape": dict(zip(("pairs", "T", "D", "V"), shape)),
                    "regime": regime,
                    "predicted": flops_bytes(shape, itemsize),
                    "reference": ref_info,
                    "methods": rows,
                }
            )
            if on_block is not None:
                on_block(res)
    tmp.cleanup()
    res["partial"] = False
    return res


def merge_rounds(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One method's rows of several interleaved rounds as one row: the median and minimum over every timed step of
    every round, the largest peak memory, the first round's errors, and each round's median (``round_ms``)."""
    if len(rows) == 1:
        return rows[0]
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        return {**bad[0], "rounds": len(rows)}
    times = [t for r in rows for t in r["times_ms"]]
    out = dict(rows[0])
    out.update(
        time_ms=round(bu.median(times), 3),
        time_ms_min=round(min(times), 3),
        times_ms=times,
        round_ms=[r["time_ms"] for r in rows],
        rounds=len(rows),
        worker_wall_s=round(sum(r.get("worker_wall_s") or 0.0 for r in rows), 2),
    )
    out["mem"] = max((r["mem"] for r in rows), key=lambda m: m.get("peak_above_inputs_mib") or 0.0)
    return out


def add_x_floor(rows: list[dict[str, Any]]) -> None:
    """``x_floor`` = time / floor's time for every ok row of one block (when the floor ran)."""
    floor = next((r for r in rows if r["method"] == "floor" and r["status"] == "ok"), None)
    for r in rows:
        if floor and r["status"] == "ok":
            r["x_floor"] = round(r["time_ms"] / floor["time_ms"], 2)


def summary(r: dict[str, Any]) -> str:
    if r["status"] != "ok":
        return str(r.get("reason", ""))[:160]
    mem = r.get("mem", {})
    err = r.get("err", {})
    errs = " ".join(f"{k}={v:.1e}" for k, v in err.items())
    return f"{r['time_ms']:10.2f} ms  mem+{mem.get('peak_above_inputs_mib')} MiB  {errs}"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def to_markdown(res: dict[str, Any]) -> str:
    cpu = res["device"]["type"] == "cpu"
    c = res["config"]
    reps = f"per-shape reps {c['reps_per_shape']}" if c.get("reps_per_shape") else f"{c['reps']} reps"
    threads = (
        f"{c['threads']} torch threads" if c.get("threads") else f"{res['device'].get('torch_threads')} torch threads"
    )
    out = [
        f"# HaF loss forward+backward — {res['device']['name']} ({res['device']['type']}), {res['date']}",
        "",
        f"preset `{res['preset']}`, dtype {res['dtype']}, β={BETA}, alpha={ALPHA}, reward_weight={REWARD_WEIGHT}, "
        f"reference-free; median of {reps} after {c['warmup']} warm-up; {threads}; "
        f"versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items() if v),
        "",
    ]
    if c.get("reference_dtype"):
        out += [
            f"Errors: ‖x − x_ref‖/‖x_ref‖ of the loss, dH and dW against a {c['reference_dtype']} reference "
            "(`backend='reference'`, same inputs, computed once per shape and regime).",
            "",
        ]
    if c.get("isolation") == "run":
        out += [
            "All methods ran in one worker process, one after another, each under its own timeout "
            f"(budget {c.get('budget_s')} s for the run); `-filter` methods ran with "
            f"HAF_GRAD_FILTER={c['grad_filter']}.",
            "",
        ]
    if res.get("note"):
        out += [f"Note: {res['note']}", ""]
    if res["config"].get("reps_note"):
        out += [f"Note: {res['config']['reps_note']}", ""]
    if c.get("rounds", 1) > 1:
        out += [
            f"Rounds: the method list ran {c['rounds']} times, interleaved (each method in a fresh process each "
            "round); medians are over every timed step of every round, per-round medians in the JSON (`round_ms`).",
            "",
        ]
    if res["config"].get("concurrent_workers", 1) > 1:
        out += [f"Note: {res['config']['concurrent_workers']} workers ran at once: timings are not comparable.", ""]
    mem_cols = ["peak above inputs (MiB)", "peak RSS (MiB)"] if cpu else ["peak above inputs (MiB)"]
    header = ["method", "status", "median (ms)", "× floor", *mem_cols, "err loss", "err dH", "err dW"]
    for block in res["results"]:
        s = block["shape"]
        n = 2 * s["pairs"] * s["T"]
        pred = block["predicted"]
        out += [
            f"## pairs={s['pairs']} T={s['T']} (N={n}), D={s['D']}, V={s['V']} — `{block['regime']}`",
            "",
            f"floor FLOPs 6·N·V·D = {pred['gemm_flops']:.3g}; full fp32 logits would be "
            f"{pred['logits_fp32_bytes'] / 2**20:.0f} MiB; timed reps: "
            f"{next((r['reps'] for r in block['methods'] if r['status'] == 'ok'), '–')}",
            "",
        ]
        rows = []
        for r in block["methods"]:
            ok = r["status"] == "ok"
            mem = r.get("mem", {})
            err = r.get("err", {})
            memv = (
                [mem.get("peak_above_inputs_mib"), mem.get("peak_rss_mib")]
                if cpu
                else [mem.get("peak_above_inputs_mib")]
            )
            status = r["status"] if ok else f"{r['status']}: {str(r.get('reason', ''))[:60]}"
            rows.append(
                [
                    r["method"],
                    status,
                    r.get("time_ms") if ok else None,
                    r.get("x_floor"),
                    *memv,
                    err.get("loss"),
                    err.get("hidden"),
                    err.get("weight"),
                ]
            )
        out += [bu.md_table(header, rows), ""]
    return "\n".join(out)


def memcheck_verdict(res: dict[str, Any]) -> dict[str, Any] | None:
    rows = {r["method"]: r for r in res["results"][0]["methods"]} if res["results"] else {}
    ref, tor = rows.get("haf-reference"), rows.get("haf-torch")
    if not (ref and tor and ref["status"] == "ok" and tor["status"] == "ok"):
        return None
    a, b = tor["mem"]["peak_above_inputs_mib"], ref["mem"]["peak_above_inputs_mib"]
    out = {
        "torch_peak_above_inputs_mib": a,
        "reference_peak_above_inputs_mib": b,
        "ratio": round(a / b, 4) if b else None,
        "pass_at_most_one_third": bool(b and a <= b / 3),
    }
    rec = rows.get("haf-torch-recompute")
    if rec and rec["status"] == "ok" and b:
        c = rec["mem"]["peak_above_inputs_mib"]
        out.update(
            torch_recompute_peak_above_inputs_mib=c,
            recompute_ratio=round(c / b, 4),
            recompute_pass_at_most_one_third=bool(c <= b / 3),
        )
    return out


def plot(res: dict[str, Any], path: Path) -> bool:
    """Bar charts of time and memory per method and block (matplotlib, else a plain PNG from ``benchutil``)."""
    blocks = res["results"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        panels = []
        for block in blocks:
            ok = [r for r in block["methods"] if r["status"] == "ok"]
            s = block["shape"]
            where = f"b={s['pairs']} t={s['T']} d={s['D']} v={s['V']} {block['regime']}"
            panels.append((f"{where}: median fwd+bwd ms", [(r["method"], r["time_ms"]) for r in ok]))
            mem = [(r["method"], r.get("mem", {}).get("peak_above_inputs_mib")) for r in ok]
            panels.append((f"{where}: peak mib above inputs", mem))
        title = f"haf loss fwd+bwd, {res['device']['name']}, {res['dtype']}, {res['date'][:10]}"
        bu.bar_chart_png(path, title, panels)
        return True
    fig, axes = plt.subplots(len(blocks), 2, figsize=(12, 2.8 * len(blocks) + 0.6), squeeze=False)
    for ax_row, block in zip(axes, blocks):
        ok = [r for r in block["methods"] if r["status"] == "ok"]
        names = [r["method"] for r in ok]
        s = block["shape"]
        title = f"B={s['pairs']} T={s['T']} D={s['D']} V={s['V']} {block['regime']}"
        ax_row[0].barh(names, [r["time_ms"] for r in ok], color="tab:blue")
        ax_row[0].set_xlabel("median fwd+bwd time (ms)")
        ax_row[0].set_title(title, fontsize=9)
        ax_row[1].barh(names, [r.get("mem", {}).get("peak_above_inputs_mib") or 0 for r in ok], color="tab:orange")
        ax_row[1].set_xlabel("peak memory above inputs (MiB)")
        ax_row[1].set_title(title, fontsize=9)
        for ax in ax_row:
            ax.invert_yaxis()
            ax.tick_params(labelsize=8)
    fig.suptitle(f"HaF loss fwd+bwd, {res['device']['name']}, {res['dtype']}, {res['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--methods", help="comma list (default: the preset's); e.g. floor,naive,haf-torch")
    p.add_argument("--regimes", help="comma list of random,peaky")
    p.add_argument("--shapes", help="comma list of PAIRSxTxDxV overriding the preset's shapes")
    p.add_argument("--reps", type=int, help="timed repetitions (default: preset's, 5 on CPU)")
    p.add_argument("--reps-per-shape", help="comma list of reps per shape, e.g. 5,2 (fewer for big CPU shapes)")
    p.add_argument("--reps-note", default="", help="free text recorded when reps were reduced")
    p.add_argument("--warmup", type=int)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="override the preset's dtype")
    p.add_argument("--threads", type=int, help="torch.set_num_threads in the workers")
    p.add_argument(
        "--timeout",
        type=float,
        help="seconds per worker (per-method isolation, default 3600) or per method (one-process presets: "
        "default METHOD_TIMEOUTS)",
    )
    p.add_argument("--budget", type=float, help="one-process presets: seconds for the whole run (the rest is skipped)")
    p.add_argument("--jobs", type=int, default=1, help="concurrent workers (smoke tests only: spoils timings)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="CPU presets: run the method list this many times, interleaved, and report the median over all rounds' "
        "steps (a shared VM's slow spells then hit every method alike)",
    )
    p.add_argument("--no-errors", action="store_true", help="skip the float64 reference and the error columns")
    p.add_argument("--out-dir", default=str(bu.RESULTS))
    p.add_argument("--tag", default="", help="extra file-name tag")
    p.add_argument("--stem", help="file name without extension for the results (instead of <device>-<date>-loss...)")
    p.add_argument("--note", default="", help="free text printed above the tables (e.g. machine load)")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="combine the JSON files of split runs into one")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--suite-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.suite_worker:
        return suite_worker(json.loads(args.spec))
    if args.worker:
        try:
            bu.emit(worker(json.loads(args.spec)))
        except Exception as exc:  # report instead of a bare traceback
            import traceback

            traceback.print_exc()
            msg = f"{type(exc).__name__}: {exc}"
            bu.emit({"status": "oom" if "out of memory" in msg.lower() else "error", "reason": msg[:800]})
        return 0
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, got {args.rounds}")
    if args.rounds > 1 and (args.jobs > 1 or PRESETS[args.preset].get("isolation", "method") == "run"):
        raise SystemExit("--rounds needs the per-method isolation of the CPU presets and --jobs 1")
    if args.reps and args.reps < 5 and not args.reps_note:
        args.reps_note = f"only {args.reps} timed repetitions (fewer than the usual 5)"
    if args.reps_per_shape and not args.reps_note:
        args.reps_note = f"timed repetitions per shape: {args.reps_per_shape} (fewer than 5 where below 5)"
    if args.merge:  # combine split runs (e.g. one GPU shape per command) into one result
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        res = parts[0]
        for extra in parts[1:]:
            res["results"] += extra["results"]
        res["merged_from"] = [Path(f).name for f in args.merge]
        args.preset = res["preset"]
        dev = res["device"]["type"]
        slug = "cpu" if dev != "cuda" else "".join(c if c.isalnum() else "-" for c in res["device"]["name"].lower())
        date = res["date"][:10]
    else:
        slug = bu.device_slug(PRESETS[args.preset]["device"])
        date = bu.today()
        res = run(args, on_block=lambda partial: save(partial, args, slug, date, quiet=True))
    if args.note:
        res["note"] = args.note
    save(res, args, slug, date)
    return 0


def save(res: dict[str, Any], args: argparse.Namespace, slug: str, date: str, quiet: bool = False) -> None:
    """Write ``<slug>-<date>-loss[-preset][-tag].{json,md,png}`` (also after each block, marked partial)."""
    if args.preset == "memcheck" and not res.get("partial"):
        res["memcheck"] = memcheck_verdict(res)
        log(f"memcheck: {res['memcheck']}")
    if res.get("partial"):
        res = {**res, "results": list(res["results"])}
    stem = f"{slug}-{date}-loss" + ("" if args.preset in ("cpu", "gpu") else f"-{args.preset}")
    stem += f"-{args.tag}" if args.tag else ""
    stem = args.stem or stem
    out = Path(args.out_dir)
    bu.write_json(out / f"{stem}.json", res)
    md = to_markdown(res)
    if res.get("memcheck"):
        mc = res["memcheck"]
        md += (
            f"\n**memcheck**: torch backend (default path) {mc['torch_peak_above_inputs_mib']} MiB vs reference "
            f"{mc['reference_peak_above_inputs_mib']} MiB above inputs: ratio {mc['ratio']} "
            f"({'PASS' if mc['pass_at_most_one_third'] else 'FAIL'}: at most 1/3)\n"
        )
        if "recompute_ratio" in mc:
            md += (
                f"\ntorch backend, grad_in_forward=False: {mc['torch_recompute_peak_above_inputs_mib']} MiB, "
                f"ratio {mc['recompute_ratio']} ({'PASS' if mc['recompute_pass_at_most_one_third'] else 'FAIL'})\n"
            )
    if res.get("partial"):
        md = "**Partial result: the run has not finished (or was stopped).**\n\n" + md
    (out / f"{stem}.md").write_text(md)
    if not res.get("partial"):
        plot(res, out / f"{stem}.png")
    if not quiet:
        log(f"wrote {out / stem}.json/.md/.png")


if __name__ == "__main__":
    sys.exit(main())
