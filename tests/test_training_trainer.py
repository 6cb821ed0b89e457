"""In-process smoke runs of the loop: reference modes, policy losses, per-pair columns and hooks."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_train_config

from training import checkpoint as ckpt
from training.config import TrainConfig
from training.synthetic import write_task
from training.trainer import TrainHooks, default_pair_terms, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("trainer")
    write_task(d, n_train=32, n_test=8, n_shift=2, noise_rate=0.2)
    return d


def cfg_for(data, run_dir, **kw) -> TrainConfig:
    return tiny_train_config(data, run_dir, **kw)


@pytest.mark.parametrize(
    "kw, mode",
    [
        (dict(lora_r=4, lora_target_modules=["gate_proj", "up_proj"]), "lora"),
        (dict(reference="copy", gradient_checkpointing=True), "copy"),
        (dict(policy_loss="simpo", simpo_gamma=0.5), "none"),
        (dict(policy_loss="ipo", reference="precomputed", average_log_prob=True), "precomputed"),
        # means (ipo) and sums (sigmoid) in one loss, and a batch-coupled objective, from the precomputed cache
        (dict(policy_loss="ipo,sigmoid,aot_unpaired", policy_loss_weights=[1.0, 0.5, 0.2]), "precomputed"),
    ],
)
def test_reference_modes_and_losses(data, tmp_path, kw, mode):
    cfg = cfg_for(data, tmp_path / "run", **kw)
    assert cfg.reference_mode == mode
    metrics = train(cfg)
    n_eval = metrics["n_pairs"]  # accuracies are fractions of the held-out pairs; margins finite
    assert metrics["reward_accuracy"] * n_eval == pytest.approx(round(metrics["reward_accuracy"] * n_eval))
    assert math.isfinite(metrics["implicit_margin"]) and math.isfinite(metrics["reward_margin"])
    assert "reward_true_accuracy" in metrics and "subset/clear/n_pairs" in metrics
    rec = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rec if r["split"] == "train"] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in rec if r["split"] == "train")


def test_hooks_and_pair_columns(data, tmp_path):
    cfg = cfg_for(data, tmp_path / "run", margin_column="true_reward_chosen", margin_scale=0.5, weight_column="flipped")
    seen = {"aux": 0, "end": 0}

    def on_model(model, c):
        model.extra = torch.nn.Linear(16, 1)

    def aux_loss(out, batch, model, step):
        seen["aux"] += 1
        assert out.features.shape == (2 * batch.n_pairs, 16)
        margin, weights = default_pair_terms(batch, cfg)
        assert torch.allclose(margin, 0.5 * batch.columns["true_reward_chosen"])
        assert set(weights.tolist()) <= {0.0, 1.0}
        return 0.01 * model.extra(out.features).pow(2).mean()

    def on_step_end(state):
        seen["end"] += 1
        assert state.raw_model.extra.weight.grad is None  # zeroed after the step

    train(cfg, TrainHooks(on_model=on_model, aux_loss=aux_loss, on_step_end=on_step_end))
    assert seen == {"aux": 4, "end": 2}  # 2 steps × 2 micro-batches
    rec = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("aux_loss" in r for r in rec if r["split"] == "train")
    state = ckpt.load(tmp_path / "run" / ckpt.CHECKPOINT)
    assert "extra.weight" in state["model"] and state["config"]["weight_column"] == "flipped"


def test_reward_centering_flag(data, tmp_path):
    """center_rewards_coefficient: the loop logs the centering term and eval reports where the rewards sit;
    a strong coefficient pulls the mean reward towards 0 compared with the same run without it."""
    runs = {}
    for c in (0.0, 1.0):
        cfg = cfg_for(data, tmp_path / f"run{c}", max_steps=30, lr=3e-2, head_lr=0.1, center_rewards_coefficient=c)
        runs[c] = train(cfg)
        rec = [json.loads(x) for x in (tmp_path / f"run{c}" / "metrics.jsonl").read_text().splitlines()]
        assert all(("center_loss" in r) == (c > 0) for r in rec if r["split"] == "train")
        assert math.isfinite(runs[c]["reward_mean"]) and runs[c]["reward_std"] > 0
    assert abs(runs[1.0]["reward_mean"]) < abs(runs[0.0]["reward_mean"]), runs
