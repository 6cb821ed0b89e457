"""Self-check: the HaF loss on random data with every available backend — backend, loss, time, peak memory.

Run ``python -m haf_kernels.selfcheck [--pairs 4 --seq 256 --dim 256 --vocab 32000]``. Each backend runs in
its own subprocess so its peak memory (CPU: peak RSS above the inputs; CUDA: max_memory_allocated above the
inputs) is its own. Exits non-zero if any backend disagrees with the float64 reference.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _inputs(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    n2 = 2 * args.pairs
    hidden = torch.randn(n2, args.seq, args.dim, generator=gen).to(device, dtype)
    weight = (torch.randn(args.vocab, args.dim, generator=gen) / args.dim**0.5).to(device, dtype)
    labels = torch.randint(0, args.vocab, (n2, args.seq), generator=gen)
    labels[:, : args.seq // 4] = -100  # a prompt
    rewards = torch.randn(n2, generator=gen).to(device)
    return hidden, weight, labels.to(device), rewards


def worker(args: argparse.Namespace) -> dict:
    import haf_kernels as hk

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    hidden, weight, labels, rewards = _inputs(args, device, dtype)
    hidden.requires_grad_()
    weight.requires_grad_()
    base_rss = _rss_mib()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    out = hk.fused_haf_loss(hidden, weight, labels, rewards, backend=args.backend)
    out.loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    peak = (
        (torch.cuda.max_memory_allocated() - base_cuda) / 2**20 if device.type == "cuda" else _peak_rss_mib() - base_rss
    )
    return {
        "backend": args.backend,
        "loss": out.loss.item(),
        "reward_loss": out.reward_loss.item(),
        "policy_loss": out.policy_loss.item(),
        "seconds": elapsed,
        "peak_extra_mib": max(peak, 0.0),
        "grad_norm_hidden": hidden.grad.float().norm().item(),
        "grad_norm_weight": weight.grad.float().norm().item(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    from haf_kernels import backends

    device = torch.device(args.device)
    names = [n for n in backends.BACKENDS if backends.is_available(n) and backends.supports_device(n, device)]
    print(
        f"haf_kernels self-check on {device} ({args.dtype}), pairs={args.pairs} T={args.seq} D={args.dim} "
        f"V={args.vocab}; torch {torch.__version__}"
    )
    print(f"available backends: {backends.available()} (auto -> {backends.resolve('auto', device)})")
    for name, why in backends.unavailable_reasons().items():
        print(f"  {name}: unavailable ({why})")
    rows = []
    for name in names:
        cmd = [
            sys.executable,
            "-m",
            "haf_kernels.selfcheck",
            "--worker",
            "--backend",
            name,
            "--pairs",
            str(args.pairs),
            "--seq",
            str(args.seq),
            "--dim",
            str(args.dim),
            "--vocab",
            str(args.vocab),
            "--dtype",
            args.dtype,
            "--device",
            args.device,
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"{name:>10}: FAILED\n{res.stderr}")
            return 1
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    ref = next((r for r in rows if r["backend"] == "reference"), None)
    print(f"{'backend':>10} {'loss':>12} {'|Δloss|':>10} {'fwd+bwd s':>10} {'peak extra MiB':>15}")
    ok = True
    for r in rows:
        delta = abs(r["loss"] - ref["loss"]) if ref else float("nan")
        ok &= not (ref and delta > 1e-4 * max(1.0, abs(ref["loss"])))
        print(
            f"{r['backend']:>10} {r['loss']:>12.6f} {delta:>10.2e} {r['seconds']:>10.3f} {r['peak_extra_mib']:>15.1f}"
        )
    print("OK: every backend agrees with the reference" if ok else "MISMATCH against the reference")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
