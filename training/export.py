"""Export a trained ``HafRewardModel`` as ``AutoModelForSequenceClassification`` (num_labels=1) + the policy LM.

Layout of ``out_dir``: the sequence classifier and tokenizer at the top (``from_pretrained(out_dir)``, as
TRL / RewardBench-style scorers expect), ``haf_reward.json`` (the reward contract: lengths, truncation, template
use, the policy's EOS target; ``training.data.reward_contract``) next to ``config.json``, and the policy causal
LM under ``out_dir/policy``. The classifier's ``score`` is the reward head; ``pad_token_id`` is the tokenizer's
(``None`` without a pad token), so HF reads the last real token: the trainer's reward position, since the trainer
never feeds an appended EOS or pad as input. Scoring the export the standard way,
``model(**tokenizer(prompt + response, return_tensors="pt")).logits[0, 0]``, gives the trainer's reward.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from .data import DEFAULT_MAX_LENGTH, DEFAULT_MAX_PROMPT_LENGTH, encode_for_reward, reward_contract, save_tokenizer
from .model import HafRewardModel

CONTRACT_FILE = "haf_reward.json"
_KEEP = object()


def merged_causal_lm(model: HafRewardModel) -> torch.nn.Module:
    """The causal LM with any LoRA adapter merged (a copy; the training model is untouched)."""
    lm = model.causal_lm
    if hasattr(lm, "merge_and_unload"):
        return copy.deepcopy(lm).merge_and_unload()
    return lm


def to_sequence_classifier(model: HafRewardModel, pad_token_id: Any = _KEEP) -> torch.nn.Module:
    """Build the ``AutoModelForSequenceClassification`` carrying the decoder body and the reward head.

    ``pad_token_id``: the tokenizer's (``None`` clears a pad id the model config may carry, which HF would
    otherwise skip at the end of a sequence); omitted: the model config's."""
    from transformers import AutoModelForSequenceClassification

    lm = merged_causal_lm(model)
    config = copy.deepcopy(lm.config)
    config.num_labels = 1
    config.architectures = None
    if pad_token_id is not _KEEP:
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


def export_pretrained(
    model: HafRewardModel,
    tokenizer: Any,
    out_dir: str | Path,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    max_prompt_length: int = DEFAULT_MAX_PROMPT_LENGTH,
) -> Path:
    """``save_pretrained`` the sequence classifier (+ tokenizer, + ``haf_reward.json``) at ``out_dir``, the policy
    LM at ``out_dir/policy``. ``max_length`` / ``max_prompt_length``: the training lengths (haf-score reads them)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else _KEEP
    seq = to_sequence_classifier(model, pad)
    seq.save_pretrained(out)
    contract = reward_contract(tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        info = save_tokenizer(tokenizer, out)  # after config.json: AutoTokenizer reads the model type from it
        contract["tokenizer_class"] = info["class"]
        contract["auto_tokenizer_matches"] = info["auto_tokenizer_matches"]
        if not info["auto_tokenizer_matches"]:
            warnings.warn(
                f"{out}: AutoTokenizer.from_pretrained loads the exported tokenizer as "
                f"{info['auto_tokenizer_class']}, which tokenizes differently from the {info['class']} training "
                f"used (transformers picks the class from the model type): tools that load the export with "
                f"AutoTokenizer read other rewards. Load it with transformers.{info['class']}.from_pretrained "
                f"(haf-score does), or train with the model type's own tokenizer",
                stacklevel=2,
            )
    (out / CONTRACT_FILE).write_text(json.dumps(contract, indent=2) + "\n", encoding="utf-8")
    if tokenizer is not None and pad is not None:
        ends = encode_for_reward(tokenizer, "a")
        if ends and ends[-1] == pad:  # the tokenizer appends its pad id (e.g. EOS == pad): HF would skip it
            warnings.warn(
                f"the tokenizer ends every sequence with its pad token (id {pad}): AutoModelForSequenceClassification "
                "reads the reward before it, haf-score at it; give the tokenizer a distinct pad token",
                stacklevel=2,
            )
    policy = merged_causal_lm(model)
    policy.save_pretrained(out / "policy")
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        save_tokenizer(tokenizer, out / "policy")
    return out
