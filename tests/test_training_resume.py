"""A training run SIGKILLed after writing a checkpoint and resumed ends exactly like an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from training.synthetic import write_task

ROOT = Path(__file__).resolve().parents[1]
MODEL = json.dumps(
    dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
)


def common_args(data: Path, run_dir: Path, steps: int = 10) -> list[str]:
    return [
        "--train_data",
        str(data / "train.jsonl"),
        "--eval_data",
        str(data / "test.jsonl"),
        "--tokenizer",
        "synthetic",
        "--model_config",
        MODEL,
        "--max_length",
        "32",
        "--max_prompt_length",
        "8",
        "--batch_size",
        "8",
        "--micro_batch_size",
        "4",
        "--max_steps",
        str(steps),
        "--log_every",
        "1",
        "--lr",
        "1e-3",
        "--warmup_steps",
        "3",
        "--save_every",
        "2",
        "--no-progress",
        "--no-plots",
        "--num_threads",
        "1",
        "--run_dir",
        str(run_dir),
    ]


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted(tmp_path):
    data = tmp_path / "data"
    write_task(data, n_train=96, n_test=24, n_shift=4)
    steps = 10
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(
        [sys.executable, "-m", "training", *common_args(data, full, steps)],
        env=env(),
        check=True,
        cwd=ROOT,
        capture_output=True,
    )

    proc = subprocess.Popen(
        [sys.executable, "-m", "training", *common_args(data, killed, steps), "--debug_step_sleep", "0.7"],
        env=env(),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpt = killed / "checkpoint.pt"
    deadline = time.time() + 240
    step = 0
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists():
            step = torch.load(ckpt, map_location="cpu", weights_only=False)["step"]
            if step >= 4:
                break
        time.sleep(0.1)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    step = torch.load(ckpt, map_location="cpu", weights_only=False)["step"]
    assert 4 <= step < steps
    assert max(r["step"] for r in records(killed)) < steps

    out = subprocess.run(
        [sys.executable, "-m", "training", *common_args(data, killed, steps), "--resume"],
        env=env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"resumed from {ckpt} at step {step}" in out.stdout

    a, b = records(full), records(killed)
    train_a = {r["step"]: r for r in a if r["split"] == "train"}
    train_b = {r["step"]: r for r in b if r["split"] == "train"}
    assert sorted(train_a) == sorted(train_b) == list(range(1, steps + 1))
    for s in train_a:
        for k in ("loss", "reward_loss", "policy_loss", "reward_accuracy", "grad_norm", "lr"):
            assert train_a[s][k] == pytest.approx(train_b[s][k], rel=1e-6, abs=1e-7), (s, k)
    final_a = next(r for r in a if r["split"] == "final")
    final_b = next(r for r in b if r["split"] == "final")
    for k in ("reward_accuracy", "implicit_accuracy", "reward_margin", "implicit_margin", "reward_ece"):
        assert final_a[k] == pytest.approx(final_b[k], rel=1e-6, abs=1e-7), k
    sa = torch.load(full / "checkpoint.pt", weights_only=False)["model"]
    sb = torch.load(ckpt, weights_only=False)["model"]
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], rtol=1e-6, atol=1e-7)
