"""HafRewardModel: fused per-token log-probs equal the wrapped model's own logits; LoRA reference mode."""

from __future__ import annotations

import pytest
import torch
import transformers

from training.model import HafRewardModel, apply_lora, last_token_index

V = 37


def tiny_config(arch: str):
    common = dict(vocab_size=V, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        return transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            **common,
        )
    if arch == "qwen2":
        return transformers.Qwen2Config(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            **common,
        )
    if arch == "gpt2":
        return transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common
        )
    if arch == "gemma2":
        return transformers.Gemma2Config(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            final_logit_softcapping=3.0,
            **common,
        )
    raise ValueError(arch)


def batch(s: int = 3, t: int = 9):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (s, t), generator=g)
    mask = torch.ones(s, t, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 4:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    labels = labels.masked_fill(torch.cat([mask[:, 1:], torch.zeros(s, 1, dtype=torch.long)], 1) == 0, -100)
    labels[:, :2] = -100  # a "prompt"
    return ids, mask, labels


def reference_logprobs(lm, ids, mask, labels):
    with torch.no_grad():
        logits = lm(input_ids=ids, attention_mask=mask).logits.double()
    logp = logits.log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    return logp.masked_fill(labels == -100, 0.0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gemma2"])
def test_logprobs_equal_model_logits(arch):
    torch.manual_seed(0)
    lm = transformers.AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    model = HafRewardModel(lm).eval()
    ids, mask, labels = batch()
    with torch.no_grad():
        out = model(ids, mask)
        got = model.token_logprobs(out.hidden, labels)
    want = reference_logprobs(lm, ids, mask, labels)
    assert out.hidden.shape == (3, 9, 32) and out.rewards.shape == (3,) and out.features.shape == (3, 32)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)
    idx = last_token_index(mask)
    assert idx.tolist() == [8, 5, 3]
    torch.testing.assert_close(out.features, out.hidden[torch.arange(3), idx])
    if arch == "gemma2":
        assert model.softcap == 3.0
    if arch == "qwen2":
        assert model.lm_head_weight.data_ptr() != lm.get_input_embeddings().weight.data_ptr()


def test_logit_scale_from_config():
    from training.model import head_transform

    assert head_transform(transformers.CohereConfig(logit_scale=0.25)) == (0.25, None)
    assert head_transform(transformers.GraniteConfig(logits_scaling=4.0)) == (0.25, None)
    assert head_transform(transformers.LlamaConfig()) == (1.0, None)


def test_lora_reference_is_base_model():
    torch.manual_seed(0)
    lm = transformers.AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    ids, mask, labels = batch()
    base = reference_logprobs(lm, ids, mask, labels)
    model = apply_lora(HafRewardModel(lm), r=4, alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"])
    with torch.no_grad():  # make the adapter non-trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    model.eval()
    with torch.no_grad():
        adapted = model.token_logprobs(model(ids, mask).hidden, labels).double()
        with model.adapter_disabled():
            ref = model.token_logprobs(model(ids, mask).hidden, labels).double()
    torch.testing.assert_close(ref, base, atol=2e-5, rtol=1e-5)
    assert (adapted - base).abs().max() > 1e-3
    assert not model.lm_head_weight.requires_grad
    assert model.reward_head.weight.requires_grad
