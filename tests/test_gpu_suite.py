"""The one-command GPU run (``benchmarks/gpu_suite.sh``) end to end in its CPU dry run, and the timeouts and
time budget of the benchmark's one-process runner.

The dry run exercises everything but the GPU: argument parsing, the pytest step and its junit file, the
benchmark at tiny shapes (Triton interpreted, peers that are not installed reported as such), the result
files (JSON, Markdown, PNG) and the limits the device machine puts on them (at most 8 flat files, plain names).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_loss  # noqa: E402

SUFFIXES = ["bench.log", "env.txt", "loss.json", "loss.md", "loss.png", "pytest-junit.xml", "pytest.log"]
SKIP_STATUSES = {"not installed", "not available"}
FP32_TOL = 1e-5  # DESIGN.md §4: ‖out − ref‖/‖ref‖ < 1e-5 in fp32 (the Triton interpreter's fp32 dot included)


@pytest.mark.slow  # ~35 s of CPU: three interpreters, the Triton interpreter and trl's imports
def test_dry_run_writes_every_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    cmd = ["bash", str(BENCH / "gpu_suite.sh"), str(out), "--dry-run"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    # what the device machine returns: at most 8 plain files, one level
    entries = sorted(out.iterdir())
    assert all(e.is_file() for e in entries), entries
    names = [e.name for e in entries]
    assert len(names) <= 8, names
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names), names
    stems = {re.fullmatch(r"(gpu-\d{4}-\d{2}-\d{2}-cpu-dryrun)-.*", n).group(1) for n in names}
    assert len(stems) == 1, names
    stem = stems.pop()
    assert names == sorted(f"{stem}-{s}" for s in SUFFIXES)
    f = {s: out / f"{stem}-{s}" for s in SUFFIXES}

    env_txt = f["env.txt"].read_text()
    for key in ("torch:", "triton:", "liger-kernel:", "cut-cross-entropy:", "trl:", "backends:", "run summary"):
        assert key in env_txt, key
    assert "tests: exit 0" in env_txt and "benchmark: exit 0" in env_txt, env_txt

    suite = ET.parse(f["pytest-junit.xml"]).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n_tests, n_skipped = int(suite.get("tests")), int(suite.get("skipped"))
    assert n_tests > 10 and int(suite.get("failures")) == 0 and int(suite.get("errors")) == 0
    assert n_skipped == n_tests  # no CUDA in a dry run: every GPU test skips, none fails
    assert "skipped" in f["pytest.log"].read_text()

    res = json.loads(f["loss.json"].read_text())
    assert res["preset"] == "dryrun" and res["partial"] is False
    assert res["config"]["isolation"] == "run" and res["config"]["reference_dtype"] == "float64"
    shapes = {tuple(b["shape"].values()) for b in res["results"]}
    assert shapes == set(bench_loss.PRESETS["dryrun"]["shapes"])
    for block in res["results"]:
        assert block["reference"]["status"] == "ok", block["reference"]
        rows = {r["method"]: r for r in block["methods"]}
        assert list(rows) == bench_loss.SUITE_METHODS  # a row per method and shape, in order
        for name, r in rows.items():
            if name.startswith("haf-") or name in ("floor", "naive"):
                assert r["status"] == "ok", (name, r)  # haf-triton through TRITON_INTERPRET=1
            else:
                assert r["status"] in {"ok"} | SKIP_STATUSES, (name, r)
            if r["status"] == "ok":
                assert r["time_ms"] > 0 and r["x_floor"] > 0 and len(r["times_ms"]) == r["reps"]
            else:
                assert r["reason"], (name, r)
        for name, r in rows.items():
            if r["status"] != "ok" or name == "floor":
                continue
            for key in ("loss", "hidden", "weight"):
                assert r["err"][key] == r["err"][key], (name, key)  # not NaN
                if name.startswith("haf-") and not name.endswith("-filter"):  # filtering drops small terms
                    assert r["err"][key] < FP32_TOL, (name, key, r["err"])

    md = f["loss.md"].read_text()
    assert "| method | status | median (ms) | × floor |" in md
    assert md.count("| haf-triton-keep | ok |") == len(shapes)
    assert "Partial result" not in md
    assert f["loss.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in f["bench.log"].read_text()
    print(f"dry run: {wall:.1f} s wall")


@pytest.mark.slow  # two worker start-ups and the 6 s timeout: ~15-30 s
def test_method_past_its_timeout_is_recorded_and_the_run_goes_on(tmp_path: Path) -> None:
    """``debug-hang`` sleeps for an hour: it is stopped at its timeout, the next method runs in a fresh worker."""
    cmd = [sys.executable, str(BENCH / "bench_loss.py"), "--preset", "dryrun", "--methods", "floor,debug-hang,naive"]
    cmd += ["--shapes", "1x4x8x32", "--timeout", "6", "--no-errors", "--out-dir", str(tmp_path), "--stem", "t"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.monotonic() - t0 < 250
    res = json.loads((tmp_path / "t.json").read_text())
    rows = {r["method"]: r for r in res["results"][0]["methods"]}
    assert list(rows) == ["floor", "debug-hang", "naive"]
    assert rows["debug-hang"]["status"] == "timeout" and "6 s timeout" in rows["debug-hang"]["reason"]
    assert rows["floor"]["status"] == "ok" and rows["naive"]["status"] == "ok", rows
    assert rows["naive"]["x_floor"] > 0
    assert "| debug-hang | timeout:" in (tmp_path / "t.md").read_text()


def test_used_up_budget_skips_what_is_left() -> None:
    blocks = [{"shape": [1, 4, 8, 32], "regime": "random", "methods": ["floor", "naive"], "reference": "float64"}]
    rows, refs = bench_loss.run_in_one_process("never-started.py", {}, blocks, None, time.monotonic() - 1)
    assert [r["status"] for r in rows[0].values()] == ["skipped", "skipped"]
    assert "budget" in rows[0]["floor"]["reason"]


@pytest.mark.parametrize(
    "name, parsed",
    [
        ("haf-triton", ("triton", None, False)),
        ("haf-triton-keep", ("triton", True, False)),
        ("haf-triton-recompute-filter", ("triton", False, True)),
        ("haf-torch-keep-filter", ("torch", True, True)),
    ],
)
def test_haf_method_names(name: str, parsed: tuple) -> None:
    assert bench_loss.parse_haf_method(name) == parsed
