"""The RM-quality experiment's policy prior: built once, cached by config and code, loadable by the trainer."""

from __future__ import annotations

import json

import pytest
import torch

from training.experiments import prior as P

TINY = dict(
    hidden_size=8,
    intermediate_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


def tiny_config(**changes) -> P.PriorConfig:
    base = dict(model_config=TINY, pretrain_sequences=128, pretrain_steps=30, sft_pairs=32, sft_steps=3, batch_size=16)
    return P.PriorConfig(**dict(base, **changes))


def test_prior_is_built_once_and_rebuilt_when_its_config_changes(tmp_path):
    cfg = tiny_config()
    before = P.BUILDS["count"]
    folder, rec = P.build_prior(cfg, tmp_path, log=None)
    assert P.BUILDS["count"] == before + 1
    assert folder == tmp_path / f"prior-{P.prior_key(cfg)}" and P.is_built(folder)
    assert rec["key"] == P.prior_key(cfg) and rec["config"] == cfg.to_dict()
    assert json.loads((folder / P.PRIOR_FILE).read_text()) == rec
    assert not list(tmp_path.glob("*.tmp-*"))  # built in a temporary folder, renamed when complete
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))  # safetensors, nothing pickled
    # pretraining learned something: the loss fell from about log(vocab)
    assert rec["pretrain"]["last_loss"] < rec["pretrain"]["first_loss"], rec
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    folder2, rec2 = P.build_prior(cfg, tmp_path, log=None)
    assert (folder2, rec2) == (folder, rec)
    assert P.BUILDS["count"] == before + 1  # not retrained
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
    # a changed config is another prior
    cfg3 = cfg.replace(sft_steps=4)
    assert P.prior_key(cfg3) != P.prior_key(cfg)
    folder3, rec3 = P.build_prior(cfg3, tmp_path, log=None)
    assert folder3 != folder and P.BUILDS["count"] == before + 2 and rec3["sft"]["steps"] == 4
    assert P.is_built(folder)  # the old one is left as it was


def test_prior_key_follows_code_version(monkeypatch):
    cfg = tiny_config()
    key = P.prior_key(cfg)
    monkeypatch.setattr(P, "PRIOR_VERSION", P.PRIOR_VERSION + "-next")
    assert P.prior_key(cfg) != key


def test_trainer_starts_from_the_prior(tmp_path):
    """The prior folder works as ``TrainConfig.model``: same tokenizer ids, and the run's initial LM is the prior."""
    from transformers import AutoModelForCausalLM

    from training.config import TrainConfig
    from training.data import load_tokenizer
    from training.synthetic import SyntheticTask
    from training.trainer import build_model

    folder, _ = P.build_prior(tiny_config(pretrain_steps=2), tmp_path, log=None)
    cfg = TrainConfig.from_dict(dict(model=str(folder), train_data=str(folder / P.PRIOR_FILE), run_dir=str(tmp_path)))
    tok = load_tokenizer(cfg)
    ref = SyntheticTask().tokenizer()
    text = "w01 w02 w47 [EOS]"
    assert tok(text)["input_ids"] == ref(text)["input_ids"] and tok.pad_token_id == ref.pad_token_id
    model = build_model(cfg, tok)
    lm = AutoModelForCausalLM.from_pretrained(str(folder))
    for (name, a), (_, b) in zip(model.base_lm.state_dict().items(), lm.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    ("field", "value"),
    [("pretrain_steps", 0), ("sft_best_of", 1), ("batch_size", 1.5), ("pretrain_shift_fraction", 1.5), ("lr", -1.0)],
)
def test_prior_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        tiny_config(**{field: value})
