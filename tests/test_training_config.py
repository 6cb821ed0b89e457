"""training.config: defaults < config file < flags; typed coercion; unknown keys rejected."""

from __future__ import annotations

import json

import pytest

from training.config import TrainConfig, build_config, parse_overrides


def test_precedence_and_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.002\nbeta: 0.5\nlora_target_modules: [q_proj, v_proj]\nprogress: false\n")
    cfg = build_config(
        [
            "--config",
            str(path),
            "--beta",
            "0.25",
            "--no-tensorboard",
            "--average_log_prob",
            "--model_config",
            json.dumps({"hidden_size": 16}),
            "--lora_r=8",
        ],
        max_steps=7,
    )
    assert cfg.lr == 0.002 and cfg.beta == 0.25 and cfg.max_steps == 7 and cfg.lora_r == 8
    assert cfg.lora_target_modules == ["q_proj", "v_proj"] and cfg.model_config == {"hidden_size": 16}
    assert cfg.progress is False and cfg.tensorboard is False and cfg.average_log_prob is True
    assert cfg.reference_mode == "lora"
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"policy_loss": "simpo"}))
    cfg = build_config([str(js), "--lora_target_modules", "a,b"])
    assert cfg.policy_loss == "simpo" and cfg.reference_mode == "none" and cfg.lora_target_modules == ["a", "b"]
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_errors():
    with pytest.raises(SystemExit, match="unknown option --nope"):
        parse_overrides(["--nope", "1"])
    with pytest.raises(ValueError, match="unknown config keys"):
        TrainConfig.from_dict({"nope": 1})
    with pytest.raises(ValueError, match="policy_loss"):
        build_config(["--policy_loss", "bogus"])
    with pytest.raises(ValueError, match="max_prompt_length"):
        build_config(["--max_length", "8", "--max_prompt_length", "8"])


def test_bundled_configs_parse():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "training" / "configs"
    lora = build_config([str(root / "haf_rm_lora.yaml"), "--model", "x"])
    assert lora.reference_mode == "lora" and lora.lora_r == 64 and lora.lr == 1e-5
    demo = build_config([str(root / "demo.yaml")])
    assert demo.model_config["hidden_size"] == 64 and demo.max_steps == 250
