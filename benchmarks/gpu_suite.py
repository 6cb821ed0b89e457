"""One prepared GPU run: the GPU tests, then the loss benchmark, everything written into one directory.

    bash benchmarks/gpu_suite.sh OUT_DIR [--wheels DIR] [--budget SECONDS]     # on the GPU machine
    bash benchmarks/gpu_suite.sh OUT_DIR --dry-run                             # the plumbing on CPU

Runs from the repository root without installing this package (``PYTHONPATH``); ``--wheels DIR`` first installs
the peers' wheels found in DIR (``pip install --no-deps --no-index --target <temp dir>``: torch and Triton stay
the machine's own, nothing is written into its site-packages). Writes at most 8 files, flat, into OUT_DIR, all
named ``gpu-<date>-<device>-<what>``:

    -env.txt               card, driver, torch / CUDA / Triton / peer versions, backends; then a run summary
    -pytest.log, -pytest-junit.xml     ``pytest tests/test_gpu.py -m gpu`` (all skipped in a dry run: no CUDA)
    -loss.json, -loss.md, -loss.png    ``bench_loss.py --preset gpu`` (``dryrun``: tiny CPU shapes, Triton
                                       interpreted), rewritten after every block (a stopped run keeps them)
    -bench.log             the benchmark's progress and the workers' stderr

Everything runs within ``--budget`` seconds (default 470): the tests get at most ``--tests-timeout``, the
benchmark what is left (methods it cannot start in time are recorded as ``skipped``). Exit status 0 when the
tests passed and the benchmark finished, 1 otherwise, 2 when no CUDA device is visible (without ``--dry-run``).
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import benchutil as bu  # noqa: E402

PEERS = ("liger-kernel", "cut-cross-entropy", "trl", "transformers", "accelerate", "datasets", "matplotlib", "numpy")
MARGIN_S = 15  # kept free at the end: the benchmark's last save and this summary


def run_logged(cmd: list[str], log_path: Path, env: dict[str, str], timeout: float) -> tuple[int | None, float]:
    """Run ``cmd`` with stdout+stderr into ``log_path`` (and echoed here); ``(rc or None on timeout, seconds)``."""
    t0 = time.monotonic()
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT, start_new_session=True
        )
        deadline = t0 + timeout

        def reader() -> None:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                sys.stdout.write(line)
            sys.stdout.flush()

        th = threading.Thread(target=reader, daemon=True)
        th.start()
        rc: int | None
        try:
            rc = proc.wait(timeout=max(deadline - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                proc.kill()
            proc.wait()
            rc = None
        th.join(timeout=10)
        wall = time.monotonic() - t0
        if rc is None:
            log.write(f"\n[gpu_suite] TIMEOUT: stopped after {wall:.0f} s (limit {timeout:.0f} s)\n")
    return rc, wall


def install_wheels(wheel_dir: str, env_lines: list[str]) -> str | None:
    """``pip install --no-deps --no-index --target <tmp>`` of every wheel in ``wheel_dir``; the target or None."""
    wheels = sorted(glob.glob(os.path.join(wheel_dir, "*.whl")))
    if not wheels:
        env_lines.append(f"wheels: none found in {wheel_dir}")
        return None
    target = tempfile.mkdtemp(prefix="haf-peers-")
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", target, *wheels]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    env_lines.append("wheels: " + " ".join(Path(w).name for w in wheels))
    env_lines.append(f"pip install --target {target}: exit {proc.returncode}")
    if proc.returncode != 0:
        env_lines.append("  " + (proc.stderr or proc.stdout).strip().replace("\n", "\n  ")[-1500:])
        return None
    return target


def environment(device: str, extra_path: str | None) -> list[str]:
    """Lines of the env file: host, card and driver, versions of torch / Triton / the peers, backends."""
    from importlib import metadata

    import torch

    lines = [
        f"date: {bu.now_iso()}",
        f"host: {platform.node()}",
        f"python: {sys.executable} {platform.python_version()}",
        f"cpu: {bu.cpu_name()} x {os.cpu_count()}",
    ]
    smi = shutil.which("nvidia-smi")
    if smi:
        q = "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit"
        proc = subprocess.run([smi, q, "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        lines.append("nvidia-smi: " + (proc.stdout.strip() or proc.stderr.strip()))
    else:
        lines.append("nvidia-smi: not found")
    lines.append(f"torch: {torch.__version__} (cuda {torch.version.cuda}, cudnn {torch.backends.cudnn.version()})")
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        lines.append(
            f"device: {props.name}, capability {props.major}.{props.minor}, "
            f"{props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs"
        )
    else:
        lines.append("device: cpu (dry run)")
    try:
        import triton

        lines.append(f"triton: {triton.__version__}")
    except Exception as exc:
        lines.append(f"triton: does not import ({type(exc).__name__}: {exc})")
    for dist in PEERS:
        try:
            lines.append(f"{dist}: {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            lines.append(f"{dist}: not installed")
    if extra_path:
        lines.append(f"peers installed into: {extra_path}")
    v = bu.versions()
    lines.append(f"haf_kernels: {v.get('haf_kernels')} (git {v.get('git_commit') or 'unknown'})")
    from haf_kernels import backends

    lines.append(f"backends: {backends.available()}")
    for name, why in backends.unavailable_reasons().items():
        lines.append(f"  {name} unavailable: {why}")
    for k in sorted(os.environ):
        if k.startswith(("HAF_", "TRITON_", "CUDA_VISIBLE", "PYTORCH_")):
            lines.append(f"env {k}={os.environ[k]}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="directory for every output file (created; at most 8 files, flat)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreted: the plumbing only")
    p.add_argument("--wheels", help="directory of peer wheels to install first (pip --no-deps --no-index --target)")
    p.add_argument("--budget", type=float, default=470.0, help="seconds for the whole run (default 470)")
    p.add_argument("--tests-timeout", type=float, help="seconds for the tests (default 150; dry run 90)")
    p.add_argument("--skip-tests", action="store_true", help="benchmark only")
    p.add_argument("--bench-args", default="", help="extra arguments for bench_loss.py (e.g. '--methods floor')")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    if args.dry_run:  # before haf_kernels is imported: it reads TRITON_INTERPRET once
        os.environ["TRITON_INTERPRET"] = "1"
    env_lines: list[str] = []
    extra = install_wheels(args.wheels, env_lines) if args.wheels else None
    if extra:
        sys.path.insert(0, extra)
    import torch

    device = "cpu" if args.dry_run else "cuda"
    slug = "cpu-dryrun" if args.dry_run else (bu.device_slug("cuda") if torch.cuda.is_available() else "nocuda")
    stem = f"gpu-{bu.today()}-{slug}"
    env_path = out / f"{stem}-env.txt"
    if device == "cuda" and not torch.cuda.is_available():
        env_path.write_text("\n".join(env_lines + ["no CUDA device visible to " + sys.executable]) + "\n")
        print(f"gpu_suite: no CUDA device visible to {sys.executable}; wrote {env_path}", file=sys.stderr)
        return 2
    env_lines = environment(device, extra) + env_lines
    env_path.write_text("\n".join(env_lines) + "\n")
    print("\n".join(env_lines), flush=True)

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([extra] if extra else []) + [env.get("PYTHONPATH", "")])
    env["PYTHONPATH"] = env["PYTHONPATH"].rstrip(os.pathsep)
    env.setdefault("PYTHONHASHSEED", "0")
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)  # real kernels, not the CPU interpreter

    summary = [f"\n== run summary ({'dry run' if args.dry_run else 'GPU'}, budget {args.budget:.0f} s)"]
    test_rc: int | None = 0
    if not args.skip_tests:
        tests_timeout = args.tests_timeout or (90.0 if args.dry_run else 150.0)
        tests_timeout = min(tests_timeout, max(args.budget - (time.monotonic() - t0) - 60, 10))
        cmd = [sys.executable, "-m", "pytest", "tests/test_gpu.py", "-m", "gpu", "-v", "-rs", "--durations=15"]
        cmd += ["-p", "no:cacheprovider", f"--junitxml={out / (stem + '-pytest-junit.xml')}"]
        print(f"== tests (timeout {tests_timeout:.0f} s)", flush=True)
        test_rc, wall = run_logged(cmd, out / f"{stem}-pytest.log", env, tests_timeout)
        summary.append(f"tests: {'TIMEOUT' if test_rc is None else f'exit {test_rc}'} in {wall:.0f} s")
        junit = out / f"{stem}-pytest-junit.xml"
        if not junit.exists():  # pytest was stopped before writing it: say so in the same format
            why = f"pytest stopped after {wall:.0f} s (exit {test_rc}); see {stem}-pytest.log"
            junit.write_text(
                '<?xml version="1.0" encoding="utf-8"?>\n<testsuites><testsuite name="pytest" tests="1" errors="1" '
                f'failures="0" skipped="0"><testcase classname="gpu_suite" name="pytest"><error message="{why}"/>'
                "</testcase></testsuite></testsuites>\n"
            )

    left = args.budget - (time.monotonic() - t0) - MARGIN_S
    bench_rc: int | None = None
    if left < 30:
        summary.append(f"benchmark: not started, {left:.0f} s of the budget left")
    else:
        # the benchmark's own budget leaves time for its start (imports, versions) and its final save
        cmd = [sys.executable, str(HERE / "bench_loss.py"), "--preset", "dryrun" if args.dry_run else "gpu"]
        cmd += ["--out-dir", str(out), "--stem", f"{stem}-loss", "--budget", f"{max(left - 25, 10):.0f}"]
        cmd += args.bench_args.split()
        print(f"== benchmark (budget {left:.0f} s)", flush=True)
        bench_rc, wall = run_logged(cmd, out / f"{stem}-bench.log", env, left)
        summary.append(f"benchmark: {'TIMEOUT' if bench_rc is None else f'exit {bench_rc}'} in {wall:.0f} s")
        res_json, png = out / f"{stem}-loss.json", out / f"{stem}-loss.png"
        if res_json.exists() and not png.exists():  # stopped after a partial save: chart what it measured
            import json

            import bench_loss

            bench_loss.plot(json.loads(res_json.read_text()), png)
            summary.append("benchmark: chart drawn from the partial results")

    files = sorted(f.name for f in out.iterdir() if f.name.startswith(stem))
    summary.append(f"total: {time.monotonic() - t0:.0f} s; files: {', '.join(files)}")
    with open(env_path, "a") as f:
        f.write("\n".join(summary) + "\n")
    print("\n".join(summary), flush=True)
    return 0 if test_rc == 0 and bench_rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
