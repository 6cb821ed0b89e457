"""One chunk of the cpp backend's 3-GEMM path against its three plain GEMMs, timed side by side in one process.

    python benchmarks/profile_cpp.py                                   # n 512, D 512, V 32000, 1 thread
    python benchmarks/profile_cpp.py --n 1024 --d 1024 --threads 2     # the large CPU shape's chunk

Per iteration: ``forward_keep`` (logits, softmax statistics; the kept buffer is the previous iteration's, as in the
whole loss), ``backward_saved`` (dz in place, then dH and dW added into an accumulator), then ``H·Wᵀ``, ``Z·W`` and
``Zᵀ·H`` as plain ``torch.mm`` calls. Prints the medians after one warm-up and the ratio of the fused pair to the
three GEMMs. Wrap it in ``perf record`` to see where the time goes (row kernels vs MKL's sgemm and packing).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=512, help="tokens in the chunk")
    ap.add_argument("--d", type=int, default=512, help="hidden size")
    ap.add_argument("--v", type=int, default=32000, help="vocabulary")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=5, help="timed iterations (after one warm-up)")
    args = ap.parse_args(argv)
    for name in ("n", "d", "v", "threads", "iters"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1, got {getattr(args, name)}")
    import torch

    from haf_kernels.backends import cpp
    from haf_kernels.options import LogprobOptions

    if not cpp.is_available():
        raise SystemExit(f"the cpp backend is not built: {cpp.why_unavailable()}")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(args.n, args.d, generator=gen)
    w = torch.randn(args.v, args.d, generator=gen) / args.d**0.5
    y = torch.randint(0, args.v, (args.n,), generator=gen)
    g = torch.randn(args.n, generator=gen) * 1e-3
    opts = LogprobOptions()
    keep, dw = None, None
    rows: dict[str, list[float]] = {k: [] for k in ("forward_keep", "backward_saved", "H·Wᵀ", "Z·W", "Zᵀ·H")}
    for i in range(args.iters + 1):
        t = [time.perf_counter()]
        logp, lse, saved = cpp.forward_keep(h, w, y, None, opts, out=keep)
        t.append(time.perf_counter())
        _, dw, _ = cpp.backward_saved(saved, g, h, w, y, None, lse, opts, (True, True, False), dw_acc=dw)
        keep = saved
        t.append(time.perf_counter())
        z = h @ w.T
        t.append(time.perf_counter())
        _ = z @ w
        t.append(time.perf_counter())
        _ = z.T @ h
        t.append(time.perf_counter())
        if i > 0:  # the first iteration warms up (and faults in the kept buffer and dW)
            for k, a, b in zip(rows, t, t[1:], strict=False):
                rows[k].append(1e3 * (b - a))
    med = {k: statistics.median(v) for k, v in rows.items()}
    fused, gemms = med["forward_keep"] + med["backward_saved"], med["H·Wᵀ"] + med["Z·W"] + med["Zᵀ·H"]
    print(f"n={args.n} D={args.d} V={args.v} threads={args.threads}, median of {args.iters} (ms):")
    for k, v in med.items():
        print(f"  {k:15s} {v:9.1f}")
    print(f"  fused / GEMMs   {fused / gemms:9.2f}  ({fused:.1f} vs {gemms:.1f} ms)")
    return dict(med, ratio=fused / gemms)


if __name__ == "__main__":
    main()
