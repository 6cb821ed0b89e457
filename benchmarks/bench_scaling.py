"""How the cpp backend's whole loss scales: time and memory vs tokens N, vocabulary V and threads, at a small D.

Every point runs in a fresh worker process (``benchutil.run_worker``): seeded ``random``-regime inputs of
``pairs = N / (2·T)`` pairs of ``T`` tokens, then ``fused_haf_loss(..., backend="cpp")`` forward+backward
(``warmup`` + ``reps`` timed steps, median). Reported per point: the median time, the time per unit of
``6·N·V·D`` (the 3-GEMM flops; constant while cost grows linearly), and the peak RSS above the inputs.

    python benchmarks/bench_scaling.py                     # N 1k → 16k at V 32k, V 32k → 256k at N 2k; 1 and 2 threads
    python benchmarks/bench_scaling.py --quick             # two points of each sweep, 1 rep (a smoke run)

Writes ``results/<device>-<date>-scaling.{json,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu  # noqa: E402

T = 256  # tokens per sequence
SEED = 1234


def worker(spec: dict) -> dict:
    """One point: median time of the cpp whole loss and its peak RSS above the inputs."""
    import torch

    from haf_kernels import fused_haf_loss

    torch.set_num_threads(spec["threads"])
    n, v, d = spec["n"], spec["v"], spec["d"]
    gen = torch.Generator().manual_seed(SEED)
    hidden = torch.randn(n // T, T, d, generator=gen)
    weight = torch.randn(v, d, generator=gen) / d**0.5
    labels = torch.randint(0, v, (n // T, T), generator=gen)
    rewards = torch.randn(n // T, generator=gen)
    rss_inputs = bu.rss_bytes()
    times = []
    for i in range(spec["warmup"] + spec["reps"]):
        if i == spec["warmup"]:
            bu.reset_hwm()
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        t0 = time.perf_counter()
        fused_haf_loss(h, w, labels, rewards, backend="cpp").loss.backward()
        times.append(time.perf_counter() - t0)
        del h, w
    timed = times[spec["warmup"] :]
    return {
        "status": "ok",
        "time_s": bu.median(timed),
        "reps_s": timed,
        "peak_above_inputs_mib": bu.mib(bu.hwm_bytes() - rss_inputs),
    }


def points(quick: bool) -> list[dict]:
    ns = [1024, 16384] if quick else [1024, 2048, 4096, 8192, 16384]
    vs = [32000, 256000] if quick else [32000, 64000, 128000, 256000]
    out = []
    for threads in (1, 2):
        out += [{"sweep": "N", "n": n, "v": 32000, "d": 128, "threads": threads} for n in ns]
        out += [{"sweep": "V", "n": 2048, "v": v, "d": 128, "threads": threads} for v in vs]
    return out


def plot(path: Path, rows: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG")
        return
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for col, sweep in enumerate(("N", "V")):
        key = sweep.lower()
        for threads in (1, 2):
            pts = [r for r in rows if r["sweep"] == sweep and r["threads"] == threads and r.get("status") == "ok"]
            xs = [p[key] for p in pts]
            axes[0, col].plot(xs, [p["ns_per_unit"] for p in pts], "o-", label=f"{threads} thread(s)")
            axes[1, col].plot(xs, [p["peak_above_inputs_mib"] for p in pts], "o-", label=f"{threads} thread(s)")
        for row, what in enumerate(("time / (6·N·V·D) [ps]", "peak RSS above inputs [MiB]")):
            ax = axes[row, col]
            ax.set_xscale("log", base=2)
            ax.set_xlabel(sweep + (" (V = 32000)" if sweep == "N" else " (N = 2048)") + ", D = 128")
            ax.set_ylabel(what)
            ax.legend()
    fig.suptitle("cpp backend: whole HaF loss fwd+bwd scaling")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="two points per sweep, 1 rep")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    if args.worker:
        bu.emit(worker(json.loads(args.spec)))
        return
    reps = 1 if args.quick else args.reps
    rows = []
    for p in points(args.quick):
        spec = {**p, "reps": reps, "warmup": 1}
        load_before = os.getloadavg()[0]
        res = bu.run_worker(__file__, spec, timeout=900)
        row = {**p, **res, "loadavg_1min": [load_before, os.getloadavg()[0]]}  # a shared machine shows here
        if res.get("status") == "ok":
            row["ns_per_unit"] = res["time_s"] / (6 * p["n"] * p["v"] * p["d"]) * 1e12
        rows.append(row)
        print(json.dumps({k: row.get(k) for k in ("sweep", "n", "v", "threads", "time_s", "ns_per_unit")}))
    stem = f"{bu.device_slug('cpu')}-{bu.today()}-scaling"
    out = Path(args.out_dir)
    info = {"device": bu.device_info("cpu"), "versions": bu.versions(), "date": bu.now_iso(), "T": T, "rows": rows}
    bu.write_json(out / f"{stem}.json", info)
    plot(out / f"{stem}.png", rows)
    print(f"wrote {out / stem}.json/.png")


if __name__ == "__main__":
    main()
