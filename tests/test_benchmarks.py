"""The benchmark harness end to end on the ``tiny`` preset (each method in its own subprocess).

Checks that every method reports either a time or an honest 'not installed' / 'not available' status, that
the haf backends match the float64 reference within the fp32 tolerance, and that the result files appear.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_loss  # noqa: E402
from conftest import torch_err_bound  # noqa: E402

FP32_TOL = 1e-5  # DESIGN.md §4: ‖out − ref‖/‖ref‖ < 1e-5 in fp32


def _run(script: str, out_dir: Path, *extra: str, timeout: float = 300) -> dict:
    cmd = [sys.executable, str(BENCH / script), "--preset", "tiny", "--out-dir", str(out_dir), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(out_dir.glob("*.json"))
    assert len(files) == 1, files
    stem = files[0].with_suffix("")
    assert stem.with_suffix(".md").exists()
    return json.loads(files[0].read_text())


def test_bench_loss_tiny(tmp_path: Path) -> None:
    res = _run("bench_loss.py", tmp_path, "--regimes", "peaky", "--jobs", "4")
    assert res["bench"] == "loss" and res["device"]["name"] and res["versions"]["torch"]
    assert res["partial"] is False
    assert res["results"], "no shape was run"
    for block in res["results"]:
        assert block["reference"]["status"] == "ok", block["reference"]
        by_name = {r["method"]: r for r in block["methods"]}
        assert set(by_name) == set(bench_loss.ALL_METHODS)
        for name, r in by_name.items():
            if name.startswith("haf-") or name in ("liger", "cce"):
                allowed = {"ok", "not available"} if name.startswith("haf-") else {"ok", "not installed"}
                assert r["status"] in allowed, (name, r)
            else:
                assert r["status"] == "ok", (name, r)
            if r["status"] == "ok":
                assert r["time_ms"] > 0 and len(r["times_ms"]) == r["reps"]
                assert r["x_floor"] > 0
                assert r["mem"]["peak_rss_mib"] > 0
            else:
                assert r["reason"], (name, r)
        assert by_name["haf-torch"]["status"] == "ok"  # the portable backend always runs
        naive = by_name["naive"]["err"]  # plain fp32 PyTorch on the same inputs, in the same run
        for name, r in by_name.items():
            if name == "floor" or r["status"] != "ok":
                continue
            err = r["err"]
            for key in ("loss", "hidden", "weight"):
                assert err[key] == err[key], (name, key)  # not NaN
                if name.startswith("haf-"):
                    bound = torch_err_bound(naive[key], torch.float32)
                    assert err[key] <= bound, (name, key, err[key], "naive", naive[key])
                    assert err[key] < FP32_TOL, (name, key, err[key])


def test_bench_loss_rounds_interleave_and_merge(tmp_path: Path) -> None:
    """--rounds 2 runs every method twice and reports the median over both rounds' steps, with each round's median."""
    res = _run("bench_loss.py", tmp_path, "--regimes", "random", "--methods", "floor,haf-torch", "--rounds", "2")
    assert res["config"]["rounds"] == 2
    for r in res["results"][0]["methods"]:
        assert r["status"] == "ok" and r["rounds"] == 2 and len(r["round_ms"]) == 2, r
        assert len(r["times_ms"]) == 2 * r["reps"]
        assert r["time_ms"] == pytest.approx(bench_loss.bu.median(r["times_ms"]), abs=1e-3)
        assert r["time_ms_min"] == min(r["times_ms"])
    md = next(tmp_path.glob("*.md")).read_text()
    assert "the method list ran 2 times, interleaved" in md


def test_merge_rounds_keeps_a_failure() -> None:
    ok = {"status": "ok", "time_ms": 2.0, "times_ms": [1.0, 3.0], "mem": {"peak_above_inputs_mib": 1.0}}
    bad = {"status": "error", "reason": "boom"}
    assert bench_loss.merge_rounds([ok, bad]) == {**bad, "rounds": 2}
    merged = bench_loss.merge_rounds(
        [ok, {**ok, "times_ms": [5.0, 7.0], "time_ms": 6.0, "mem": {"peak_above_inputs_mib": 4.0}}]
    )
    assert merged["times_ms"] == [1.0, 3.0, 5.0, 7.0] and merged["round_ms"] == [2.0, 6.0]
    assert merged["time_ms"] == 4.0 and merged["time_ms_min"] == 1.0 and merged["mem"]["peak_above_inputs_mib"] == 4.0


def test_make_inputs_deterministic_and_peaky() -> None:
    shape = (2, 8, 16, 64)
    a = bench_loss.make_inputs(shape, "peaky", torch.float32, "cpu")
    b = bench_loss.make_inputs(shape, "peaky", torch.float32, "cpu")
    for x, y in zip(a[:4], b[:4]):
        assert torch.equal(x, y)
    hidden, weight, labels, _, _ = a
    logits = hidden @ weight.T
    target = logits.gather(-1, labels[..., None])[..., 0]
    # trained-like: the target logit is far above the rest of the row
    assert (target - logits.mean(-1)).mean() > 8
    r_hidden, r_weight, r_labels, _, _ = bench_loss.make_inputs(shape, "random", torch.float32, "cpu")
    r_logits = r_hidden @ r_weight.T
    assert (r_logits.gather(-1, r_labels[..., None])[..., 0] - r_logits.mean(-1)).mean().abs() < 1


@pytest.mark.slow
def test_bench_train_tiny(tmp_path: Path) -> None:
    res = _run("bench_train.py", tmp_path)
    rows = {r["method"]: r for r in res["results"]}
    assert set(rows) == {"naive", "haf"}
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0 and r["mem"]["peak_rss_mib"] > 0
    # same seeded model and batch: the first step's loss agrees between the fused and the naive loss
    assert abs(rows["haf"]["first_loss"] - rows["naive"]["first_loss"]) < 1e-4


def test_profile_cpp_tiny() -> None:
    """The chunk profiler runs at a tiny shape and reports every stage and the fused/GEMM ratio."""
    import profile_cpp

    from haf_kernels.backends import cpp

    if not cpp.is_available():
        pytest.skip("the cpp backend is not built")
    med = profile_cpp.main(["--n", "16", "--d", "8", "--v", "300", "--iters", "2"])
    assert set(med) == {"forward_keep", "backward_saved", "H·Wᵀ", "Z·W", "Zᵀ·H", "ratio"}
    assert all(v > 0 for v in med.values())
    with pytest.raises(SystemExit, match="--iters must be >= 1"):
        profile_cpp.main(["--iters", "0"])
