"""Export: AutoModelForSequenceClassification.from_pretrained(export) gives the trainer's rewards."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
import transformers
from test_training_model import tiny_config

from training.cli import score_pairs
from training.data import collate_pairs, load_preferences
from training.export import export_pretrained
from training.model import HafRewardModel, apply_lora
from training.synthetic import SyntheticTask


@pytest.mark.parametrize("arch, lora", [("llama", False), ("gpt2", False), ("qwen2", True)])
def test_export_reload_gives_same_rewards(tmp_path, arch, lora):
    task = SyntheticTask(seed=0)
    tok = task.tokenizer()
    cfg = tiny_config(arch)
    cfg.vocab_size = len(tok)
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    torch.manual_seed(0)
    model = HafRewardModel(transformers.AutoModelForCausalLM.from_config(cfg))
    if lora:
        model = apply_lora(model, r=4, alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"])
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.3)
    model.eval()
    rows = task.pairs(6, seed=5)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_preferences(data, tok, max_length=32, max_prompt_length=8)
    batch = collate_pairs(list(ds), tok.pad_token_id)
    assert (batch.attention_mask == 0).any()  # padded rows: the classifier must find the last real token
    with torch.no_grad():
        want = model(batch.input_ids, batch.attention_mask).rewards

    # a generic (word-level) tokenizer beside a qwen2 config: transformers 5's AutoTokenizer rebuilds it as
    # Qwen2Tokenizer, so the export says so (warning + haf_reward.json) and haf-score loads the recorded class
    rebuilt = arch == "qwen2" and int(transformers.__version__.split(".")[0]) >= 5
    with pytest.warns(UserWarning, match="tokenizes differently") if rebuilt else contextlib.nullcontext():
        out = export_pretrained(model, tok, tmp_path / "export", max_length=32, max_prompt_length=8)
    contract = json.loads((out / "haf_reward.json").read_text())
    assert contract["tokenizer_class"] == type(tok).__name__
    assert contract["auto_tokenizer_matches"] is (not rebuilt)
    assert (contract["max_length"], contract["max_prompt_length"]) == (32, 8)
    assert contract["pad_token_id"] == tok.pad_token_id
    seq = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert seq.config.num_labels == 1 and seq.config.pad_token_id == tok.pad_token_id
    with torch.no_grad():
        got = seq(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, 0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    policy = transformers.AutoModelForCausalLM.from_pretrained(out / "policy").eval()
    with torch.no_grad():
        hidden = model(batch.input_ids, batch.attention_mask).hidden
        lp = model.token_logprobs(hidden, batch.labels)
        logits = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    ref = logits.log_softmax(-1).gather(-1, batch.labels.clamp_min(0)[..., None])[..., 0]
    torch.testing.assert_close(lp, ref.masked_fill(batch.labels == -100, 0.0), rtol=1e-4, atol=1e-4)

    # haf-score on the export (lengths from haf_reward.json): the same rewards and pairwise accuracy
    res = score_pairs(str(out), str(data))
    b = batch.n_pairs
    assert [r["reward_chosen"] for r in res["rows"]] == pytest.approx(want[:b].tolist(), rel=1e-4, abs=1e-5)
    assert res["accuracy"] == pytest.approx(float((want[:b] > want[b:]).float().mean()))


def test_export_pad_id_is_the_tokenizers(tmp_path):
    """A tokenizer without a pad token: the export clears the model config's pad id (here 0, a real token), so
    HF reads the last token even when it is token 0; haf-score batches such an export by the attention mask."""
    from reward_contract_helpers import gpt2_style_tokenizer, hh_rows, write_rows

    tok = gpt2_style_tokenizer()
    cfg = tiny_config("llama")
    cfg.vocab_size = len(tok)  # cfg.pad_token_id == 0, a byte-level token
    torch.manual_seed(0)
    model = HafRewardModel(transformers.AutoModelForCausalLM.from_config(cfg)).eval()
    rows = hh_rows(6, seed=2)
    data = write_rows(tmp_path / "d.jsonl", rows)
    ds = load_preferences(data, tok, max_length=256, max_prompt_length=128)
    ends_in_0 = [ex for ex in ds if ex.chosen_ids[-1] == 0 or ex.rejected_ids[-1] == 0]
    assert ends_in_0  # "!" is token 0
    batch = collate_pairs(list(ds), 0)
    with torch.no_grad():
        want = model(batch.input_ids, batch.attention_mask).rewards
    out = export_pretrained(model, tok, tmp_path / "export", max_length=256, max_prompt_length=128)
    seq = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert seq.config.pad_token_id is None
    b = batch.n_pairs
    for k, row in enumerate(rows):
        for key, w in (("chosen", want[k]), ("rejected", want[b + k])):
            with torch.no_grad():
                got = seq(**tok(row[key], return_tensors="pt")).logits[0, 0]
            torch.testing.assert_close(got, w, rtol=1e-4, atol=1e-5)
    res = score_pairs(str(out), str(data), batch_size=4)
    assert [r["reward_chosen"] for r in res["rows"]] == pytest.approx(want[:b].tolist(), rel=1e-4, abs=1e-5)
