"""Forward+backward of the full HaF loss: haf_kernels backends against naive PyTorch and the peers.

The loss (HaF-RM, reference-free so that every method computes the same thing)::

    loss = reward_weight · mean(−logσ(r_c − r_r)) + alpha · mean(−logσ(β · (logπ_c − logπ_r)))

with β = 0.1, alpha = 0.2, reward_weight = 1 and ``logπ`` the sequence sums of token log-probs of
``hidden [2B, T, D] @ weight[V, D]ᵀ``. Methods (each in a fresh subprocess, warm-up excluded):

    floor          the three raw GEMMs of the same shapes (H·Wᵀ, G·W, Gᵀ·H), no loss at all
    naive          materialised fp32 logits + log_softmax + gather (what TRL does)
    naive-compile  torch.compile of ``naive``
    haf-<backend>  fused_haf_loss(..., backend=<backend>) for torch / cpp / triton (reference: memcheck)
    haf-<backend>-recompute   the same with grad_in_forward=False (lse saved, logits recomputed in backward)
    liger          Liger-Kernel LigerFusedLinearDPOLoss (compiled) + the same BT term
    cce            Cut Cross-Entropy per-token losses -> sequence log-probs -> the same O(B) loss

Errors are ‖x − x_ref‖/‖x_ref‖ of the loss and of the gradients of hidden and weight against a float64
reference (``backend="reference"`` in float64 on the full problem, one chunk of pairs at a time: the loss is
a mean of per-pair terms, so chunking is exact).

    python benchmarks/bench_loss.py --preset cpu            # writes benchmarks/results/cpu-<date>-loss.*
    python benchmarks/bench_loss.py --preset gpu
    python benchmarks/bench_loss.py --preset memcheck       # torch backend peak RSS <= reference / 3 ?
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu  # noqa: E402

BETA, ALPHA, REWARD_WEIGHT = 0.1, 0.2, 1.0
IGNORE = -100
SEED = 1234
PEAKY_TARGET_LOGIT = 15.0  # average extra logit of the target token in the "peaky" regime

ALL_METHODS = ["floor", "naive", "naive-compile", "haf-torch", "haf-cpp", "haf-triton", "liger", "cce"]

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
    "gpu": dict(
        device="cuda",
        dtype="bfloat16",
        shapes=[(16, 512, 4096, 128256), (8, 512, 2048, 151936), (4, 512, 4096, 256000)],
        reps=10,
        warmup=3,
        methods=ALL_METHODS,
        regimes=["random", "peaky"],
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

        backend = name[4:]
        gif = None  # library default: gradients finished inside the forward when a chunk of pairs fits
        if backend.endswith("-recompute"):  # linear_logprobs path: lse only, logits recomputed in backward
            backend, gif = backend[: -len("-recompute")], False
        avail = backends.available()
        if not avail.get(backend, False):
            raise Unavailable("not available", backends.unavailable_reasons().get(backend, "unknown backend"))
        if not backends.supports_device(backend, torch.device(device)):
            raise Unavailable("not available", f"backend {backend!r} does not run on {device} tensors")

        def haf():
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

    raise ValueError(f"unknown method {name!r}")


# ------------------------------------------------------------------------------------------- float64 truth


def reference_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Float64 loss and gradients of the full problem with ``backend='reference'``, chunked by pairs."""
    import torch

    from haf_kernels import fused_haf_loss

    device, shape = spec["device"], tuple(spec["shape"])
    pairs, t, d, v = shape
    hidden, weight, labels, rewards, _ = make_inputs(shape, spec["regime"], getattr(torch, spec["dtype"]), device)
    h64, w64, r64 = hidden.double(), weight.double().requires_grad_(True), rewards.double()
    budget = 512 << 20  # bytes of fp64 logits per chunk
    per = max(1, budget // (2 * t * v * 8))
    dh = torch.zeros_like(h64)
    dw = torch.zeros_like(w64)
    loss = torch.zeros((), dtype=torch.float64, device=device)
    t0 = time.perf_counter()
    for p0 in range(0, pairs, per):
        p1 = min(p0 + per, pairs)
        rows = torch.cat([torch.arange(p0, p1, device=device), torch.arange(pairs + p0, pairs + p1, device=device)])
        h = h64.index_select(0, rows).requires_grad_(True)
        out = fused_haf_loss(
            h,
            w64,
            labels.index_select(0, rows),
            r64.index_select(0, rows),
            beta=BETA,
            alpha=ALPHA,
            reward_weight=REWARD_WEIGHT,
            backend="reference",
        )
        part = out.loss * ((p1 - p0) / pairs)
        gh, gw = torch.autograd.grad(part, [h, w64])
        dh.index_copy_(0, rows, gh)
        dw += gw
        loss += part.detach()
    elapsed = time.perf_counter() - t0
    keep64 = dw.numel() * 8 <= (1 << 30)
    store = torch.float64 if keep64 else torch.float32
    torch.save({"loss": loss.item(), "dh": dh.to(store).cpu(), "dw": dw.to(store).cpu()}, spec["ref_path"])
    return {
        "status": "ok",
        "loss": loss.item(),
        "time_s": round(elapsed, 2),
        "stored_dtype": str(store)[6:],
        "pairs_per_chunk": per,
    }


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


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.manual_seed(SEED)
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    if spec["method"] == "fp64-reference":
        return reference_job(spec)

    device, name = spec["device"], spec["method"]
    dtype = getattr(torch, spec["dtype"])
    cuda = device == "cuda"
    rss_start = bu.rss_bytes()
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
            "inputs_mib": bu.mib(base_alloc),
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
        ref_path = spec.get("ref_path")
        if ref_path and os.path.exists(ref_path):
            ref = torch.load(ref_path, map_location="cpu", weights_only=True)
            res["err"] = {
                "loss": abs(res["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-30),
                "hidden": rel_err(hidden.grad.detach().cpu(), ref["dh"]),
                "weight": rel_err(weight.grad.detach().cpu(), ref["dw"]),
            }
    return res


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
            "reps_note": args.reps_note or None,
            "reps_per_shape": args.reps_per_shape or None,
        },
        "results": results,
        "partial": True,
    }
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
                ref_info = bu.run_worker(
                    script, {**base, "method": "fp64-reference", "ref_path": ref_path}, args.timeout
                )
                log(f"{shape} {regime}: fp64 reference {ref_info.get('status')} {ref_info.get('time_s', '')} s")

            def one(m: str, shape=shape, regime=regime, base=base, ref_path=ref_path) -> dict[str, Any]:
                spec = {**base, "method": m, "reps": shape_reps[shape], "warmup": warmup, "ref_path": ref_path}
                r = bu.run_worker(script, spec, args.timeout)
                r.update(method=m, shape=list(shape), regime=regime)
                log(f"  {m:14s} {r['status']:13s} {summary(r)}")
                return r

            if args.jobs > 1:  # smoke tests only: concurrent workers spoil each other's timings
                with ThreadPoolExecutor(args.jobs) as pool:
                    rows = list(pool.map(one, methods))
            else:
                rows = [one(m) for m in methods]
            floor = next((r for r in rows if r["method"] == "floor" and r["status"] == "ok"), None)
            for r in rows:
                if floor and r["status"] == "ok":
                    r["x_floor"] = round(r["time_ms"] / floor["time_ms"], 2)
            results.append(
                {
                    "shape": dict(zip(("pairs", "T", "D", "V"), shape)),
                    "regime": regime,
                    "predicted": flops_bytes(
                        shape, torch.empty(0, dtype=getattr(torch, preset["dtype"])).element_size()
                    ),
                    "reference": ref_info,
                    "methods": rows,
                }
            )
            if on_block is not None:
                on_block(res)
    tmp.cleanup()
    res["partial"] = False
    return res


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
    if res.get("note"):
        out += [f"Note: {res['note']}", ""]
    if res["config"].get("reps_note"):
        out += [f"Note: {res['config']['reps_note']}", ""]
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
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    blocks = res["results"]
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
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per worker")
    p.add_argument("--jobs", type=int, default=1, help="concurrent workers (smoke tests only: spoils timings)")
    p.add_argument("--no-errors", action="store_true", help="skip the float64 reference and the error columns")
    p.add_argument("--out-dir", default=str(bu.RESULTS))
    p.add_argument("--tag", default="", help="extra file-name tag")
    p.add_argument("--note", default="", help="free text printed above the tables (e.g. machine load)")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="combine the JSON files of split runs into one")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        try:
            bu.emit(worker(json.loads(args.spec)))
        except Exception as exc:  # report instead of a bare traceback
            import traceback

            traceback.print_exc()
            msg = f"{type(exc).__name__}: {exc}"
            bu.emit({"status": "oom" if "out of memory" in msg.lower() else "error", "reason": msg[:800]})
        return 0
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
    plot(res, out / f"{stem}.png")
    if not quiet:
        log(f"wrote {out / stem}.json/.md/.png")


if __name__ == "__main__":
    sys.exit(main())
