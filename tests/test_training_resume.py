"""Resuming: a run SIGKILLed after writing a checkpoint and resumed ends exactly like an uninterrupted run; a
resume that would change the run (config, data) is refused naming each key; ``--resume`` needs a checkpoint
(``--resume auto`` does not); a run directory scores and resumes after its base model folder is gone."""

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
from conftest import TINY_MODEL, tiny_train_config

from training import checkpoint as ckpt_io
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
            step = torch.load(ckpt, map_location="cpu", weights_only=True)["step"]
            if step >= 4:
                break
        time.sleep(0.1)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    step = torch.load(ckpt, map_location="cpu", weights_only=True)["step"]
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
    sa = ckpt_io.load(full / "checkpoint.pt")["model"]
    sb = ckpt_io.load(ckpt)["model"]
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------- in-process resumes
SMALL = TINY_MODEL


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume_data")
    write_task(d, n_train=32, n_test=8, n_shift=2)
    return d


def small_cfg(data: Path, run_dir: Path, **kw):
    return tiny_train_config(data, run_dir, **kw)


def test_resume_refuses_incoherent_changes_and_allows_safe_ones(small_data, tmp_path, capsys):
    from training.config import ConfigError
    from training.trainer import train

    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.jsonl", "test.jsonl"):
        (data / name).write_bytes((small_data / name).read_bytes())
    run = tmp_path / "run"
    train(small_cfg(data, run))
    # a new lr (and beta) is refused, naming each key: the restored optimiser/scheduler would keep the old lr
    with pytest.raises(ConfigError) as err:
        train(small_cfg(data, run, resume=True, max_steps=4, lr=2e-3, beta=0.2))
    msg = str(err.value)
    assert "lr: 0.001 in the checkpoint, 0.002 now" in msg and "beta: 0.1 in the checkpoint, 0.2 now" in msg
    assert "max_steps" not in msg.split("may change on resume")[0]  # max_steps is a safe change
    # data edited in place is noticed (same path, new content)
    original = (data / "train.jsonl").read_text()
    lines = original.splitlines(keepends=True)
    (data / "train.jsonl").write_text("".join(lines[1:] + lines[:1]))
    with pytest.raises(ConfigError, match=r"train_data: .*train\.jsonl changed since the checkpoint"):
        train(small_cfg(data, run, resume=True, max_steps=4))
    (data / "train.jsonl").write_text(original)  # restored content (new mtime): resumes
    # safe changes: max_steps, log_every, eval_every, save_every, reporting
    capsys.readouterr()
    out = train(small_cfg(data, run, resume=True, max_steps=4, log_every=2, eval_every=3, save_every=3))
    assert f"resumed from {run / 'checkpoint.pt'} at step 2" in capsys.readouterr().out
    assert out["reward_accuracy"] >= 0 and ckpt_io.load_state(run / "checkpoint.pt")["step"] == 4


def test_resume_needs_a_checkpoint_unless_auto(small_data, tmp_path, capsys):
    from training.config import ConfigError
    from training.trainer import train

    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"resume: no checkpoint to resume from at .*checkpoint\.pt.*--resume auto"):
        train(small_cfg(small_data, run, resume=True))
    assert not run.exists()  # refused before any work
    train(small_cfg(small_data, run, resume="auto"))  # no checkpoint: starts fresh
    assert "resumed from" not in capsys.readouterr().out
    train(small_cfg(small_data, run, resume="auto", max_steps=3))  # a checkpoint: resumes
    assert f"resumed from {run / 'checkpoint.pt'} at step 2" in capsys.readouterr().out


def make_base_model(path: Path) -> None:
    """A tiny local 'pretrained' Llama with the synthetic tokenizer, as a pretrained model folder."""
    import transformers

    from training.synthetic import SyntheticTask

    tok = SyntheticTask().tokenizer()
    conf = transformers.LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **SMALL)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(conf).save_pretrained(path)
    tok.save_pretrained(path)


def rewards_of(model, tok, data: Path) -> torch.Tensor:
    from training.data import collate_pairs, load_preferences

    ds = load_preferences(data / "test.jsonl", tok, max_length=32, max_prompt_length=8)
    batch = collate_pairs([ds[i] for i in range(len(ds))], tok.pad_token_id)
    with torch.no_grad():
        return model(batch.input_ids, batch.attention_mask).rewards


@pytest.mark.parametrize(
    "kw",
    [dict(lora_r=4, lora_target_modules=["gate_proj", "up_proj"]), dict(reference="precomputed")],
    ids=["lora", "precomputed"],
)
def test_run_dir_scores_and_resumes_without_the_base_model(small_data, tmp_path, capsys, kw):
    from training.trainer import load_trained, train

    base, run = tmp_path / "base", tmp_path / "run"
    make_base_model(base)
    cfg = small_cfg(small_data, run, model=str(base), tokenizer="", model_config={}, **kw)
    train(cfg)
    model, tok, _ = load_trained(run)
    before = rewards_of(model, tok, small_data)
    base.rename(tmp_path / "moved")  # the base model folder is gone
    model, tok, _ = load_trained(run)  # scores from the run directory alone
    torch.testing.assert_close(rewards_of(model, tok, small_data), before)
    capsys.readouterr()
    train(cfg.replace(resume=True, max_steps=4))  # and resumes
    assert f"resumed from {run / 'checkpoint.pt'} at step 2" in capsys.readouterr().out
    assert ckpt_io.load_state(run / "checkpoint.pt")["step"] == 4


def test_resume_without_base_model_says_what_it_needs(small_data, tmp_path):
    from training.config import ConfigError
    from training.trainer import train

    base, run = tmp_path / "base", tmp_path / "run"
    make_base_model(base)
    cfg = small_cfg(small_data, run, model=str(base), tokenizer="", model_config={}, reference="copy")
    train(cfg)
    base.rename(tmp_path / "moved")
    with pytest.raises(ConfigError, match=r"reference: 'copy' needs the initial weights of the base model .*base"):
        train(cfg.replace(resume=True, max_steps=4))
