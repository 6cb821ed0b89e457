"""training.config: defaults < config file < flags; typed coercion; unknown keys rejected; ``validate`` checks
every value before any work and reports all problems at once, one line per key."""

from __future__ import annotations

import json

import pytest

from training.config import ConfigError, TrainConfig, build_config, parse_overrides


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
    with pytest.raises(ValueError, match="nope: unknown config key"):
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


def test_all_problems_reported_at_once_one_line_per_key():
    with pytest.raises(ConfigError) as err:
        build_config(
            ["--lr", "-0.003", "--max_steps", "-5", "--beta", "abc", "--policy_loss", "kto", "--batch_size", "30"],
            need_data=True,
        )
    lines = str(err.value).splitlines()
    assert lines[0] == "invalid config (6 problems):"
    keys = [line.strip().split(":")[0] for line in lines[1:]]
    assert sorted(keys) == ["batch_size", "beta", "lr", "max_steps", "policy_loss", "train_data"]
    assert "  lr: must be > 0.0, got -0.003" in lines and "  max_steps: must be >= 0, got -5" in lines
    assert "  beta: expected a number, got 'abc'" in lines
    assert err.value.problems == [line.strip() for line in lines[1:]]


def test_validate_checks_python_api_values_too():
    with pytest.raises(ConfigError, match=r"^lr: expected a number, got 'fast' \(str\)$"):
        TrainConfig(lr="fast").validate()
    with pytest.raises(ConfigError, match=r"^max_steps: expected an integer, got 1.5 \(float\)$"):
        TrainConfig(max_steps=1.5).validate()
    with pytest.raises(ConfigError, match=r"^log_every: must be >= 1, got 0$"):
        TrainConfig(log_every=0).validate()
    assert TrainConfig(max_steps=12, warmup_steps=20).validate().warnings()[0].startswith("warmup_steps (20)")
    assert TrainConfig().validate() == TrainConfig()  # defaults are valid (no data needed)


def test_resume_values(tmp_path):
    assert build_config(["--resume", "auto"]).resume == "auto"
    assert build_config(["--resume", "--run_dir", str(tmp_path), "--resume=false"]).resume is False
    with pytest.raises(ConfigError, match=r'^resume: expected true, false or "auto", got \'maybe\'$'):
        build_config(["--resume", "maybe"])
    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    assert build_config(["--resume", "--run_dir", str(tmp_path)]).resume is True


def test_config_file_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.1\nbeta: [0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid YAML at line 3, column 1"):
        build_config([str(bad)])
    js = tmp_path / "bad.json"
    js.write_text('{"lr": 0.1,}')
    with pytest.raises(ConfigError, match=r"bad\.json: invalid JSON at line 1, column 12"):
        build_config(["--config", str(js)])
    with pytest.raises(ConfigError, match=r"config: no such file: .*missing\.yaml"):
        build_config([str(tmp_path / "missing.yaml")])
    empty = tmp_path / "empty.yaml"
    empty.write_text("eval_data:\nlr: 1e-4\n")  # an empty value is "", YAML's 1e-4 is a string: both coerced
    cfg = build_config([str(empty)])
    assert cfg.eval_data == "" and cfg.lr == 1e-4


def test_every_field_in_exactly_one_section_and_help_is_grouped(capsys):
    import dataclasses

    from training.cli import train_main
    from training.config import SECTIONS

    listed = [name for names in SECTIONS.values() for name in names]
    assert sorted(listed) == sorted(f.name for f in dataclasses.fields(TrainConfig)) and len(listed) == len(set(listed))
    train_main(["--help"])
    out = capsys.readouterr().out
    assert out.index(" objective:") < out.index("--policy_loss") < out.index(" optimisation:") < out.index("--lr ")


def test_policy_loss_lists_and_weights(tmp_path):
    """policy_loss takes one name, a comma-separated list (CLI) or a YAML list, with policy_loss_weights."""
    cfg = build_config(["--policy_loss", "sigmoid,bco_pair,sft", "--policy_loss_weights", "0.8,0.2,1"])
    assert cfg.policy_loss == "sigmoid,bco_pair,sft" and cfg.policy_loss_weights == [0.8, 0.2, 1.0]
    path = tmp_path / "c.yaml"
    path.write_text("policy_loss: [ipo, robust]\npolicy_loss_weights: [1, 0.5]\nlabel_smoothing: 0.1\n")
    cfg = build_config([str(path)])
    assert cfg.policy_loss == ["ipo", "robust"] and cfg.reference_mode == "precomputed"
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert build_config(["--policy_loss", "rdpo"]).policy_loss == "rdpo"  # the old name of robust still works
    assert build_config(["--policy_loss", "sigmoid,simpo"]).reference_mode == "none"
    cases = [
        (["--policy_loss", "sigmoid,kto"], r"policy_loss: must name registered objectives .* got unknown \['kto'\]"),
        (["--policy_loss", "sigmoid,hinge", "--policy_loss_weights", "1"], r"policy_loss_weights: must have one"),
        (["--policy_loss", "sigmoid,hinge", "--policy_loss_weights", "1,-2"], r"policy_loss_weights: must be finite"),
        (["--policy_loss_weights", "a,b"], r"policy_loss_weights: expected a list"),
        (["--policy_loss", "exo_pair"], r"label_smoothing: policy_loss exo_pair needs label_smoothing > 0"),
        (["--policy_loss", "aot", "--weight_column", "w"], r"policy_loss: aot sorts over the batch"),
        (["--discopop_tau", "0"], r"discopop_tau: must be > 0"),
    ]
    for argv, message in cases:
        with pytest.raises(ValueError, match=message):
            build_config(argv)
