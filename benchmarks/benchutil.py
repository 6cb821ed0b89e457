"""Shared helpers of the benchmarks: worker subprocesses, memory probes, environment facts, result files.

Every measured method runs in a fresh subprocess (the same script with ``--worker``) so that compile
caches, allocator pools and the peak-RSS high-water mark of one method never leak into another. The worker
prints one line ``RESULT <json>`` on stdout; anything else it prints is kept only for error messages.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
RESULT_TAG = "RESULT "

if str(ROOT) not in sys.path:  # the package need not be installed to benchmark it
    sys.path.insert(0, str(ROOT))


# ----------------------------------------------------------------------------------------------- memory


def rss_bytes() -> int:
    """Current resident set size of this process (``VmRSS``), 0 where ``/proc`` is missing."""
    return _status_kb("VmRSS") * 1024


def hwm_bytes() -> int:
    """Peak resident set size of this process (``VmHWM``, reset by ``reset_hwm``), else ``ru_maxrss``."""
    kb = _status_kb("VmHWM")
    if kb == 0:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * 1024


def lifetime_peak_bytes() -> int:
    """Peak RSS over the whole life of this process (``ru_maxrss``; not affected by ``reset_hwm``)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_hwm() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ``/proc/self/clear_refs`` = 5). False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kb(key: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def mib(n: float | None) -> float | None:
    return None if n is None else round(n / (1 << 20), 1)


# ------------------------------------------------------------------------------------------ environment


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: str) -> dict[str, Any]:
    """What the numbers were measured on: device name, core count, memory."""
    import torch

    info: dict[str, Any] = {
        "type": device,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            name=props.name,
            total_memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
        )
    else:
        info["name"] = info["cpu"]
        try:
            with open("/proc/meminfo") as f:
                info["total_memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
        except OSError:
            pass
    return info


def device_slug(device: str) -> str:
    """File-name tag of the device: ``cpu``, or the GPU name in lower case (``nvidia-h100-80gb-hbm3``)."""
    if device != "cuda":
        return "cpu"
    import torch

    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")


def versions() -> dict[str, str | None]:
    """Versions of torch, triton, transformers, haf_kernels and the peers (``None`` = not installed)."""
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("torch", "triton", "transformers", "liger-kernel", "cut-cross-entropy", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    try:
        import haf_kernels

        out["haf_kernels"] = haf_kernels.__version__
    except Exception as exc:  # pragma: no cover - reported, not fatal
        out["haf_kernels"] = f"import failed: {exc}"
    try:
        out["git_commit"] = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def today() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------------------------- workers


def run_worker(script: str, spec: dict[str, Any], timeout: float, env: dict[str, str] | None = None) -> dict:
    """Run ``script --worker --spec <json>`` in a fresh interpreter; its ``RESULT`` dict, or an error dict."""
    cmd = [sys.executable, script, "--worker", "--spec", json.dumps(spec)]
    full_env = dict(os.environ)
    full_env.setdefault("PYTHONHASHSEED", "0")
    full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [full_env.get("PYTHONPATH")] if p])
    if env:
        full_env.update(env)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "reason": f"worker ran past {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            out = json.loads(line[len(RESULT_TAG) :])
            out.setdefault("worker_wall_s", round(wall, 2))
            return out
    tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-6:]
    killed = proc.returncode in (-9, 137)
    status = "oom" if killed or any("out of memory" in t.lower() for t in tail) else "error"
    return {"status": status, "reason": f"exit {proc.returncode}: " + " | ".join(tail)[-800:]}


def timed_call(fn: Any, cuda: bool) -> tuple[float, Any]:
    """``(seconds, fn())``, with the device synchronised before and after on CUDA."""
    import torch

    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def emit(result: dict[str, Any]) -> None:
    """Worker side: print the one ``RESULT`` line the parent parses."""
    sys.stdout.write(RESULT_TAG + json.dumps(result) + "\n")
    sys.stdout.flush()


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


# ----------------------------------------------------------------------------------------------- output


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")


def fmt(x: Any, spec: str = ".3g") -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if x != 0 and abs(x) < 1e-2:
            return f"{x:.2e}"
        if abs(x) >= 100:
            return f"{x:.0f}"
        return format(x, spec)
    return str(x)


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------- PNG without matplotlib

# A 3×5 bitmap font (rows top to bottom, 3 bits each): enough for method names, numbers and units.
_FONT = {
    "a": "010101111101101",
    "b": "110101110101110",
    "c": "011100100100011",
    "d": "110101101101110",
    "e": "111100110100111",
    "f": "111100110100100",
    "g": "011100101101011",
    "h": "101101111101101",
    "i": "111010010010111",
    "j": "001001001101010",
    "k": "101101110101101",
    "l": "100100100100111",
    "m": "101111111101101",
    "n": "110101101101101",
    "o": "010101101101010",
    "p": "110101110100100",
    "q": "010101101110011",
    "r": "110101110101101",
    "s": "011100010001110",
    "t": "111010010010010",
    "u": "101101101101111",
    "v": "101101101101010",
    "w": "101101111111101",
    "x": "101101010101101",
    "y": "101101010010010",
    "z": "111001010100111",
    "0": "111101101101111",
    "1": "010110010010111",
    "2": "110001010100111",
    "3": "110001010001110",
    "4": "101101111001001",
    "5": "111100110001110",
    "6": "011100111101111",
    "7": "111001010010010",
    "8": "111101111101111",
    "9": "111101111001110",
    " ": "000000000000000",
    "-": "000000111000000",
    ".": "000000000000010",
    "=": "000111000111000",
    ":": "000010000010000",
    "(": "010100100100010",
    ")": "010001001001010",
    "/": "001001010100100",
    ",": "000000000010100",
    "_": "000000000000111",
    "+": "000010111010000",
    "%": "101001010100101",
    "?": "110001010000010",
}


def bar_chart_png(path: Path, title: str, panels: list[tuple[str, list[tuple[str, float]]]]) -> None:
    """Write horizontal bar charts as a PNG with only the standard library (when matplotlib is missing).

    ``panels``: ``[(panel title, [(label, value), ...])]``, one bar per label, scaled to the panel's maximum.
    """
    import struct
    import zlib

    scale, label_w, bar_w, row_h = 2, 240, 520, 14
    width = label_w + bar_w + 120
    heights = [row_h * (len(rows) + 2) for _, rows in panels]
    height = 30 + sum(heights)
    px = bytearray(b"\xff" * (width * height * 3))

    def rect(x0: int, y0: int, w: int, h: int, rgb: tuple[int, int, int]) -> None:
        for y in range(max(0, y0), min(height, y0 + h)):
            row = (y * width + max(0, x0)) * 3
            n = max(0, min(width, x0 + w) - max(0, x0))
            px[row : row + 3 * n] = bytes(rgb) * n

    def text(x: int, y: int, s: str) -> None:
        for ch in s.lower():
            glyph = _FONT.get(ch, _FONT["?"])
            for r in range(5):
                for c in range(3):
                    if glyph[3 * r + c] == "1":
                        rect(x + c * scale, y + r * scale, scale, scale, (0, 0, 0))
            x += 4 * scale

    text(6, 8, title[: (width - 12) // (4 * scale)])
    y = 30
    colors = [(31, 119, 180), (255, 127, 14)]
    for k, ((ptitle, rows), h) in enumerate(zip(panels, heights)):
        text(6, y + 2, ptitle[: (width - 12) // (4 * scale)])
        top = max([v for _, v in rows if v and v > 0] or [1.0])
        for j, (label, value) in enumerate(rows):
            yy = y + row_h * (j + 1) + 2
            text(6, yy, label[: label_w // (4 * scale) - 1])
            w = int(bar_w * (value or 0) / top) if value and value > 0 else 0
            rect(label_w, yy - 1, max(w, 1), row_h - 3, colors[k % 2])
            text(label_w + w + 6, yy, fmt(float(value)) if value is not None else "-")
        y += h
    raw = b"".join(b"\x00" + bytes(px[r * width * 3 : (r + 1) * width * 3]) for r in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    Path(path).write_bytes(png)
