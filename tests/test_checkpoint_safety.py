"""Run directories are data, never code; checkpoints are whole or refused with a one-line reason; a non-finite
loss or gradient never reaches the weights or a checkpoint.

- ``checkpoint.pt`` loads with ``torch.load(weights_only=True)``, the weights are ``model.safetensors``;
- a malicious pickle (``__reduce__`` creating a file) in ``checkpoint.pt`` or the reference cache is refused
  without running (the file is not created), through ``load_trained`` (``haf-score RUN_DIR``) and ``--resume``;
- truncated files, a failed save (full disk: no ``.tmp`` left), a save killed between its two renames;
- old (pickled) checkpoints: a clear error, and ``--convert-trusted``;
- ``nonfinite: stop|skip``: the step and micro-batch are named, weights stay finite, nothing non-finite is saved.
"""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
from pathlib import Path

import pytest
import torch
from conftest import tiny_train_config

from training import checkpoint as ckpt
from training.config import TrainConfig
from training.synthetic import write_task


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("safety")
    write_task(d, n_train=32, n_test=8, n_shift=2)
    return d


def cfg_for(data: Path, run_dir: Path, **kw) -> TrainConfig:
    return tiny_train_config(data, run_dir, **kw)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A finished 2-step run directory (precomputed reference, so it has a reference cache)."""
    from training.trainer import train

    run = tmp_path_factory.mktemp("trained") / "run"
    train(cfg_for(data, run, reference="precomputed"))
    return run


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


class MakesAFile:
    """Unpickling this creates ``path``: what a malicious checkpoint could do (here harmlessly)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# ---------------------------------------------------------------------------------------------- format
def test_checkpoint_is_safetensors_plus_weights_only_state(trained):
    from safetensors.torch import load_file

    state = torch.load(trained / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["format"] == ckpt.FORMAT and state["step"] == 2 and "model" not in state
    assert state["config"]["reference"] == "precomputed" and set(state["data"]) == {"train_data", "eval_data"}
    weights = load_file(str(trained / "model.safetensors"))
    assert "reward_head.weight" in weights and all(torch.isfinite(t).all() for t in weights.values())
    cache = trained / state["reference_cache"]
    assert cache.exists() and torch.load(cache, weights_only=True)
    assert not list(trained.rglob("*.tmp"))


def test_rng_state_round_trips_through_weights_only(tmp_path):
    import random

    import numpy as np

    ckpt.save_atomic({"rng": ckpt.rng_state()}, tmp_path / "rng.pt")
    a = (random.random(), torch.rand(3), np.random.rand(3))
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    b = (random.random(), torch.rand(3), np.random.rand(3))
    assert a[0] == b[0] and torch.equal(a[1], b[1]) and np.array_equal(a[2], b[2])


# ---------------------------------------------------------------------------------------------- malicious files
def test_malicious_checkpoint_is_refused_without_running(data, trained, tmp_path):
    from training.cli import score_pairs
    from training.trainer import load_trained, train

    marker = tmp_path / "pwned"
    run = copy_run(trained, tmp_path / "run")
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    torch.save(dict(state, payload=MakesAFile(marker)), run / "checkpoint.pt")
    for load in (
        lambda: load_trained(run),  # haf-score RUN_DIR
        lambda: score_pairs(str(run), str(data / "test.jsonl")),
        lambda: ckpt.load(run / "checkpoint.pt"),
        lambda: train(cfg_for(data, run, reference="precomputed", resume=True, max_steps=4)),  # --resume
    ):
        with pytest.raises(ckpt.CheckpointError, match=r"checkpoint\.pt: refusing to load this checkpoint.*GLOBAL"):
            load()
        assert not marker.exists()
    # a plain (non-zip) pickle under the checkpoint's name: refused the same way
    with open(run / "checkpoint.pt", "wb") as f:
        pickle.dump({"step": 1, "config": {}, "x": MakesAFile(marker)}, f)
    with pytest.raises(ckpt.CheckpointError, match="refusing to load"):
        load_trained(run)
    assert not marker.exists()


def test_malicious_reference_cache_is_never_unpickled(data, trained, tmp_path, capsys):
    from training.trainer import train

    marker = tmp_path / "pwned"
    run = copy_run(trained, tmp_path / "run")
    cache = run / torch.load(run / "checkpoint.pt", weights_only=True)["reference_cache"]
    good = torch.load(cache, weights_only=True)
    torch.save({"train": good["train"], "eval": good["eval"], "x": MakesAFile(marker)}, cache)
    train(cfg_for(data, run, reference="precomputed"))  # a fresh run on the same run dir finds the cache
    assert not marker.exists()
    assert "refusing to load this reference log-prob cache" in capsys.readouterr().out  # recomputed instead
    assert torch.load(cache, weights_only=True).keys() == good.keys()


# ---------------------------------------------------------------------------------------------- torn / failed writes
def test_truncated_files_give_one_line_errors(trained, tmp_path):
    from training.trainer import load_trained

    run = copy_run(trained, tmp_path / "run")
    blob = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint\.pt: truncated or corrupted checkpoint") as err:
        load_trained(run)
    assert "\n" not in str(err.value)
    (run / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match=r"truncated or corrupted checkpoint \(0 bytes"):
        load_trained(run)
    (run / "checkpoint.pt").write_bytes(blob)
    weights = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(weights[: len(weights) - 100])
    with pytest.raises(ckpt.CheckpointError, match=r"model\.safetensors: unreadable weights") as err:
        load_trained(run)
    assert "\n" not in str(err.value)


def test_failed_save_leaves_no_tmp_and_keeps_the_old_checkpoint(trained, tmp_path, monkeypatch):
    run = copy_run(trained, tmp_path / "run")
    before = (run / "checkpoint.pt").read_bytes(), (run / "model.safetensors").read_bytes()
    real_save = torch.save

    def disk_full(obj, f, *a, **k):
        real_save(obj, f, *a, **k)  # a partial file exists when the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save_atomic({"x": torch.zeros(3)}, run / "other.pt")
    with pytest.raises(OSError, match="No space left"):
        ckpt.save(run, {"w": torch.ones(2)}, {"step": 3, "config": {}})
    assert not list(run.rglob("*.tmp"))
    assert ((run / "checkpoint.pt").read_bytes(), (run / "model.safetensors").read_bytes()) == before


def test_save_killed_between_its_two_renames_is_finished_on_load(tmp_path, monkeypatch):
    run = tmp_path / "run"
    ckpt.save(run, {"w": torch.zeros(2)}, {"step": 1, "config": {}})
    real_replace = os.replace

    def killed_before_weights(src, dst):
        if str(dst).endswith(ckpt.MODEL_FILE):
            raise KeyboardInterrupt  # stands for SIGKILL after the commit point
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", killed_before_weights)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(run, {"w": torch.ones(2)}, {"step": 2, "config": {}})
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    state = ckpt.load(run / ckpt.CHECKPOINT)  # the new state and its weights, moved into place
    assert state["step"] == 2 and torch.equal(state["model"]["w"], torch.ones(2))
    assert not (run / "model.safetensors.tmp").exists()


def test_weights_from_another_save_are_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    ckpt.save(a, {"w": torch.zeros(2)}, {"step": 1, "config": {}})
    ckpt.save(b, {"w": torch.ones(2)}, {"step": 2, "config": {}})
    (a / ckpt.MODEL_FILE).write_bytes((b / ckpt.MODEL_FILE).read_bytes())
    with pytest.raises(ckpt.CheckpointError, match=r"model\.safetensors: does not belong to .*checkpoint\.pt"):
        ckpt.load(a / ckpt.CHECKPOINT)


def test_old_pickled_checkpoint_is_refused_then_converted(data, trained, tmp_path):
    import numpy as np

    from training.trainer import load_trained

    run = copy_run(trained, tmp_path / "run")
    new = ckpt.load(run / ckpt.CHECKPOINT)
    old = {k: v for k, v in new.items() if k not in ("format", "save_id", "model_file")}
    old["rng"] = dict(old["rng"], numpy=np.random.get_state())  # format 1 pickled numpy arrays
    (run / ckpt.MODEL_FILE).unlink()
    torch.save(old, run / ckpt.CHECKPOINT)
    with pytest.raises(ckpt.CheckpointError, match=r"before format 2.*--convert-trusted"):
        load_trained(run)
    ckpt.convert_trusted(run)
    model, _, _ = load_trained(run)
    torch.testing.assert_close(model.reward_head.weight, new["model"]["reward_head.weight"])


# ---------------------------------------------------------------------------------------------- non-finite guard
def nan_at(steps: set[int]):
    """``aux_loss`` hook: NaN added to the loss of the first micro-batch at ``steps`` (0-based step index)."""
    seen = {"calls": 0}

    def aux(out, batch, model, step):
        seen["calls"] += 1
        if step in steps and seen["calls"] % 2 == 1:
            return out.rewards.sum() * float("nan")
        return None

    return aux


class NanGrad(torch.autograd.Function):
    """Value 0, gradient NaN: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.sum() * 0

    @staticmethod
    def backward(ctx, g):
        return torch.full(ctx.shape, float("nan"))


def nan_grad_at(step_no: int):
    def aux(out, batch, model, step):
        return NanGrad.apply(out.features) if step == step_no else None

    return aux


def test_nonfinite_loss_stops_naming_step_and_micro_batch(data, tmp_path):
    from training.trainer import NonFiniteError, TrainHooks, train

    run = tmp_path / "run"
    cfg = cfg_for(data, run, max_steps=5, save_every=2)
    with pytest.raises(NonFiniteError, match=r"step 3: non-finite loss in micro-batch 1 of 2 \(loss nan\)"):
        train(cfg, TrainHooks(aux_loss=nan_at({2})))
    state = ckpt.load(run / ckpt.CHECKPOINT)
    assert state["step"] == 2 and all(torch.isfinite(t).all() for t in state["model"].values())
    rec = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rec if r["split"] == "train")


def test_nonfinite_gradient_is_detected(data, tmp_path):
    from training.trainer import NonFiniteError, TrainHooks, train

    with pytest.raises(NonFiniteError, match=r"step 2: non-finite gradient \(norm nan\) with finite losses"):
        train(cfg_for(data, tmp_path / "run", max_steps=3), TrainHooks(aux_loss=nan_grad_at(1)))


def test_nonfinite_skip_drops_the_update_and_caps_consecutive_skips(data, tmp_path, capsys):
    from training.trainer import NonFiniteError, TrainHooks, train

    run = tmp_path / "run"
    out = train(cfg_for(data, run, max_steps=4, nonfinite="skip"), TrainHooks(aux_loss=nan_at({1})))
    assert math.isfinite(out["reward_margin"])
    assert "step 2: non-finite loss in micro-batch 1 of 2 (loss nan); update skipped (1 in a row" in (
        capsys.readouterr().out
    )
    rec = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_rec = {r["step"]: r for r in rec if r["split"] == "train"}
    assert train_rec[2]["skipped_steps"] == 1 and train_rec[3]["skipped_steps"] == 0
    assert all(math.isfinite(r["grad_norm"]) for r in train_rec.values() if "loss" in r)
    assert all(torch.isfinite(t).all() for t in ckpt.load(run / ckpt.CHECKPOINT)["model"].values())
    with pytest.raises(NonFiniteError, match=r"step 3: .*training stopped after 2 consecutive skipped steps"):
        train(
            cfg_for(data, tmp_path / "run2", max_steps=6, nonfinite="skip", nonfinite_max_skips=2),
            TrainHooks(aux_loss=nan_at({0, 1, 2, 3, 4, 5})),
        )


def test_nonfinite_weights_are_never_checkpointed(data, tmp_path):
    from training.trainer import NonFiniteError, TrainHooks, train

    run = tmp_path / "run"

    def poison(state):
        if state.step == 2:
            with torch.no_grad():
                state.raw_model.reward_head.weight[0, 0] = float("inf")

    with pytest.raises(NonFiniteError, match=r"step 2: refusing to write a checkpoint.*reward_head\.weight"):
        train(cfg_for(data, run, max_steps=4, save_every=2), TrainHooks(on_step_end=poison))
    assert not (run / ckpt.CHECKPOINT).exists() and not list(run.glob("*.tmp"))


def test_nonfinite_lm_head_in_the_first_steps_is_named(data, tmp_path):
    """check_finite_steps: a NaN in the LM head (a broken model) stops at step 1 naming the tensor."""
    from training.trainer import NonFiniteError, TrainHooks, train

    def on_model(model, cfg):
        with torch.no_grad():
            model.lm_head_weight[3, 1] = float("nan")

    with pytest.raises(NonFiniteError, match=r"step 1: non-finite loss input in micro-batch 1 of 2: lm_head_weight \["):
        train(cfg_for(data, tmp_path / "run", max_steps=3), TrainHooks(on_model=on_model))
    # with the check off, the same model reaches the non-finite loss guard instead (no tensor named)
    with pytest.raises(NonFiniteError, match=r"step 1: non-finite loss in micro-batch 1"):
        train(cfg_for(data, tmp_path / "run2", max_steps=3, check_finite_steps=0), TrainHooks(on_model=on_model))
