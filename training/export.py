"""Export a trained ``HafRewardModel`` as ``AutoModelForSequenceClassification`` (num_labels=1) + the policy LM.

Layout of ``out_dir``: the sequence classifier and tokenizer at the top (``from_pretrained(out_dir)``, as
TRL / RewardBench-style scorers expect), the policy causal LM under ``out_dir/policy``. The classifier's
``score`` is the reward head; ``pad_token_id`` is set so it reads the last non-pad token, like the trainer.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from .model import HafRewardModel


def merged_causal_lm(model: HafRewardModel) -> torch.nn.Module:
    """The causal LM with any LoRA adapter merged (a copy; the training model is untouched)."""
    lm = model.causal_lm
    if hasattr(lm, "merge_and_unload"):
        return copy.deepcopy(lm).merge_and_unload()
    return lm


def to_sequence_classifier(model: HafRewardModel, pad_token_id: int | None) -> torch.nn.Module:
    """Build the ``AutoModelForSequenceClassification`` carrying the decoder body and the reward head."""
    from transformers import AutoModelForSequenceClassification

    lm = merged_causal_lm(model)
    config = copy.deepcopy(lm.config)
    config.num_labels = 1
    config.architectures = None
    if pad_token_id is not None:
        config.pad_token_id = pad_token_id
        text_cfg = getattr(config, "text_config", None)
        if text_cfg is not None:
            text_cfg.pad_token_id = pad_token_id
    dtype = next(lm.parameters()).dtype
    seq = AutoModelForSequenceClassification.from_config(config).to(dtype)
    src = lm.get_decoder() if hasattr(lm, "get_decoder") and lm.get_decoder() is not None else lm.base_model
    dst = seq.base_model
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    missing = [k for k in missing if "rotary" not in k and "inv_freq" not in k]
    if missing or unexpected:
        raise RuntimeError(f"decoder weights do not match the classifier: missing={missing} unexpected={unexpected}")
    score = getattr(seq, "score", None)
    if score is None or tuple(score.weight.shape) != tuple(model.reward_head.weight.shape):
        raise RuntimeError(f"{type(seq).__name__} has no score layer of shape {tuple(model.reward_head.weight.shape)}")
    with torch.no_grad():
        score.weight.copy_(model.reward_head.weight.to(score.weight.dtype))
        if getattr(score, "bias", None) is not None:
            score.bias.zero_()
    return seq.eval()


def export_pretrained(model: HafRewardModel, tokenizer: Any, out_dir: str | Path) -> Path:
    """``save_pretrained`` the sequence classifier (+ tokenizer) at ``out_dir``, the policy LM at ``out_dir/policy``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seq = to_sequence_classifier(model, getattr(tokenizer, "pad_token_id", None))
    seq.save_pretrained(out)
    policy = merged_causal_lm(model)
    policy.save_pretrained(out / "policy")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
        tokenizer.save_pretrained(out / "policy")
    return out
