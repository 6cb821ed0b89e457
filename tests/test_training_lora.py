"""LoRA targets per architecture: the default config trains on Llama, Qwen2, GPT-2 (Conv1D) and Gemma-2; the
paper config ("mlp") picks each architecture's MLP projections; explicit lists keep working or fail clearly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers

from training.config import TrainConfig, load_config_file
from training.ensemble import load_member
from training.lora import resolve_lora_targets
from training.model import HafRewardModel, apply_lora
from training.synthetic import SyntheticTask, write_task
from training.trainer import build_model, load_tokenizer, train

CONFIGS = Path(__file__).resolve().parent.parent / "training" / "configs"

# tiny from-config bodies for the trainer (vocab and special ids come from the synthetic tokenizer)
ARCHS = {
    "llama": dict(
        model_type="llama",
        model_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
    ),
    "qwen2": dict(
        model_type="qwen2",
        model_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=False,
        ),
    ),
    "gpt2": dict(model_type="gpt2", model_config=dict(n_embd=16, n_layer=1, n_head=2, n_positions=64)),
    "gemma2": dict(
        model_type="gemma2",
        model_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            final_logit_softcapping=3.0,
        ),
    ),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    write_task(d, n_train=16, n_test=8, n_shift=2, noise_rate=0.0)
    return d


def cfg_for(data, run_dir, arch, **kw) -> TrainConfig:
    base = dict(
        train_data=str(data / "train.jsonl"),
        eval_data=str(data / "test.jsonl"),
        tokenizer="synthetic",
        max_length=32,
        max_prompt_length=8,
        batch_size=4,
        micro_batch_size=4,
        max_steps=2,
        log_every=1,
        lr=1e-2,
        lora_r=4,
        run_dir=str(run_dir),
        progress=False,
        tensorboard=False,
        plots=False,
        backend="torch",
    )
    return TrainConfig.from_dict({**base, **ARCHS[arch], **kw})


@pytest.mark.parametrize("arch", list(ARCHS))
def test_default_lora_targets_train_two_steps(data, tmp_path, arch):
    cfg = cfg_for(data, tmp_path / "run", arch)
    assert cfg.lora_target_modules == TrainConfig().lora_target_modules  # the default, not a per-test list
    assert cfg.reference_mode == "lora"
    tok = load_tokenizer(cfg)
    before = build_model(cfg, tok)  # build_model is seeded: the run starts from these weights
    init = {n: p.detach().clone() for n, p in before.named_parameters()}
    lora_names = [n for n in init if "lora_" in n]
    assert lora_names, "no LoRA parameters"
    head_names = [n for n, p in before.named_parameters() if p is before.lm_head_weight]
    assert len(head_names) == 1 and not before.lm_head_weight.requires_grad
    trainable = {n for n, p in before.named_parameters() if p.requires_grad}
    assert trainable == set(lora_names) | {"reward_head.weight"}

    metrics = train(cfg)
    assert math.isfinite(metrics["reward_margin"])
    rec = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rec if r["split"] == "train"]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)

    after, _, _ = load_member(tmp_path / "run")
    got = dict(after.named_parameters())
    for n in lora_names:
        if "lora_B" in n:  # initialised to zero: every adapted layer received gradient
            assert got[n].abs().sum() > 0, n
    assert any(not torch.equal(got[n], init[n]) for n in lora_names if "lora_A" in n)
    assert not torch.equal(got["reward_head.weight"], init["reward_head.weight"])
    frozen = [n for n in init if n not in trainable]
    for n in frozen:  # the LM head (policy layer) and every base weight are unchanged
        torch.testing.assert_close(got[n], init[n], rtol=0, atol=0, msg=n)
    assert head_names[0] in frozen


def tiny_lm(arch: str):
    common = dict(vocab_size=40, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    configs = {
        "llama": lambda: transformers.LlamaConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, **common
        ),
        "qwen2": lambda: transformers.Qwen2Config(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            **common,
        ),
        "gemma2": lambda: transformers.Gemma2Config(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            **common,
        ),
        "gpt2": lambda: transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=32, **common),
        "phi": lambda: transformers.PhiConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, **common
        ),
        "falcon": lambda: transformers.FalconConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, **common
        ),
        "gpt_neox": lambda: transformers.GPTNeoXConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, **common
        ),
    }
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(configs[arch]())


def adapted(model: HafRewardModel) -> set[str]:
    """Dotted names (inside the causal LM) of the layers that carry a LoRA adapter."""
    base = model.base_lm
    return {n for n, m in base.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}


MLP_LAYERS = {
    "llama": {"gate_proj", "up_proj", "down_proj"},
    "qwen2": {"gate_proj", "up_proj", "down_proj"},
    "gemma2": {"gate_proj", "up_proj", "down_proj"},
    "gpt2": {"mlp.c_fc", "mlp.c_proj"},
    "phi": {"fc1", "fc2"},
    "falcon": {"dense_h_to_4h", "dense_4h_to_h"},
    "gpt_neox": {"dense_h_to_4h", "dense_4h_to_h"},
}


@pytest.mark.parametrize("arch", list(MLP_LAYERS))
def test_paper_config_targets_the_mlp_of_every_architecture(arch):
    spec = load_config_file(CONFIGS / "haf_rm_lora.yaml")["lora_target_modules"]
    model = apply_lora(HafRewardModel(tiny_lm(arch)), r=2, alpha=4, target_modules=spec)
    names = adapted(model)
    assert names and all(".mlp." in f".{n}." for n in names), names
    assert {".".join(n.split(".")[-2:]) if arch == "gpt2" else n.split(".")[-1] for n in names} == MLP_LAYERS[arch]
    ids = torch.randint(3, 40, (2, 6))
    out = model(ids, torch.ones_like(ids))
    assert torch.isfinite(out.rewards).all()


@pytest.mark.parametrize("arch", ["falcon", "gpt_neox", "phi"])
def test_default_targets_on_other_architectures(arch):
    model = apply_lora(HafRewardModel(tiny_lm(arch)), r=2, alpha=4, target_modules=TrainConfig().lora_target_modules)
    assert adapted(model) and not model.lm_head_weight.requires_grad
    assert all(not n.endswith(("lm_head", "embed_out")) for n in adapted(model))


def test_explicit_lists_keep_working_and_missing_names_are_named():
    model = apply_lora(HafRewardModel(tiny_lm("llama")), r=2, alpha=4, target_modules=["gate_proj", "up_proj"])
    assert {n.split(".")[-1] for n in adapted(model)} == {"gate_proj", "up_proj"}
    assert model.lora_target_modules == ["gate_proj", "up_proj"]
    with pytest.raises(ValueError) as err:
        apply_lora(HafRewardModel(tiny_lm("gpt2")), r=2, alpha=4, target_modules=["gate_proj", "c_fc", "up_proj"])
    msg = str(err.value)
    assert "'gate_proj', 'up_proj' not found in gpt2" in msg and "'c_fc'" not in msg, msg
    assert all(name in msg for name in ("c_attn", "c_proj", "c_fc")), msg  # the available layers


def test_keywords_never_target_heads():
    lm = tiny_lm("llama")
    for spec in (["auto"], ["all-linear"], "all-linear", ["mlp", "q_proj"]):
        targets = resolve_lora_targets(lm, spec)
        assert "lm_head" not in targets and not any(t.endswith("lm_head") for t in targets), (spec, targets)
    assert resolve_lora_targets(lm, ["mlp", "q_proj"]) == ["q_proj", "gate_proj", "up_proj", "down_proj"]


def test_synthetic_demo_model_unchanged_by_explicit_targets(tmp_path):
    """A config saved with explicit names reloads onto the same adapter layout (old checkpoints)."""
    task = SyntheticTask(seed=0)
    tok = task.tokenizer()
    cfg = TrainConfig.from_dict(
        dict(
            tokenizer="synthetic", lora_r=2, lora_target_modules=["gate_proj", "up_proj", "down_proj"], **ARCHS["llama"]
        )
    )
    model = build_model(cfg, tok)
    assert {n.split(".")[-1] for n in adapted(model)} == {"gate_proj", "up_proj", "down_proj"}
