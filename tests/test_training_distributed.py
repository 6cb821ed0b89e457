"""2 processes (torchrun, gloo, CPU) under DDP and FSDP2 give the single-process losses and gradients."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch
from test_training_resume import ROOT, common_args, env, records

from training import checkpoint as ckpt
from training.synthetic import write_task


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    write_task(tmp / "data", n_train=64, n_test=16, n_shift=4)
    run = tmp / "single"
    # one process: micro-batches of 4 pairs, 2 accumulation steps per 8-pair optimiser step
    subprocess.run(
        [sys.executable, "-m", "training", *common_args(tmp / "data", run, steps=4), "--save_every", "0"],
        env=env(),
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return tmp, records(run)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_equals_single(single, mode):
    tmp, ref = single
    run = tmp / mode
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "training",
        *common_args(tmp / "data", run, steps=4),
        "--save_every",
        "0",
        "--distributed",
        mode,
    ]
    out = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "(accum 1, world 2)" in out.stdout
    got = records(run)
    tr_ref = [r for r in ref if r["split"] == "train"]
    tr_got = [r for r in got if r["split"] == "train"]
    assert len(tr_ref) == len(tr_got) == 4
    for a, b in zip(tr_ref, tr_got):  # same losses every step, and the same (all-reduced) gradient norm
        for k in ("loss", "reward_loss", "policy_loss", "reward_accuracy", "implicit_accuracy", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (a["step"], k)
    fa = next(r for r in ref if r["split"] == "final")
    fb = next(r for r in got if r["split"] == "final")
    for k in ("reward_accuracy", "implicit_accuracy", "reward_margin", "implicit_margin"):
        assert fa[k] == pytest.approx(fb[k], rel=1e-5, abs=1e-6), k
    assert json.loads((run / "config.json").read_text())["distributed"] == mode
    # same gradients ⇒ same parameters after 4 AdamW steps (FSDP checkpoints gather the full state)
    sa = ckpt.load(tmp / "single" / ckpt.CHECKPOINT)["model"]
    sb = ckpt.load(run / ckpt.CHECKPOINT)["model"]
    assert sorted(sa) == sorted(sb)
    for name in sa:
        torch.testing.assert_close(sb[name], sa[name], rtol=1e-5, atol=1e-6)
