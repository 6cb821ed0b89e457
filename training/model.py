"""``HafRewardModel``: a causal LM's decoder body + its LM head (policy layer) + a linear reward head.

The wrapper never computes full-vocab logits: ``forward`` returns the final hidden states ``[S, T, D]``,
and the loss (``haf_kernels.fused_haf_loss``) reads the LM head weight through ``lm_head_weight`` together
with the head's ``logit_scale`` / ``softcap`` taken from the model config, so the fused log-probs equal
``log_softmax(model(...).logits)`` of the wrapped model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class RewardModelOutput:
    """``hidden [S, T, D]`` final hidden states, ``rewards [S]`` reward-head scores of the last non-pad
    token, ``features [S, D]`` the reward head's input (that token's hidden state)."""

    hidden: torch.Tensor
    rewards: torch.Tensor
    features: torch.Tensor


def head_transform(config: Any) -> tuple[float, float | None]:
    """``(logit_scale, softcap)`` of a transformers config's LM head.

    Gemma-2/3 ``final_logit_softcapping`` → softcap; Cohere ``logit_scale`` multiplies; Granite
    ``logits_scaling`` divides. Multimodal configs are searched through ``text_config``.
    """
    cfg = getattr(config, "text_config", None) or config
    scale = 1.0
    if getattr(cfg, "logit_scale", None) is not None:
        scale *= float(cfg.logit_scale)
    if getattr(cfg, "logits_scaling", None) is not None:
        scale /= float(cfg.logits_scaling)
    softcap = getattr(cfg, "final_logit_softcapping", None)
    return scale, None if softcap is None else float(softcap)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index ``[S]`` of the last non-padding token of each row (right or left padding)."""
    t = attention_mask.shape[1]
    pos = torch.arange(t, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), pos, torch.full_like(pos, -1)).max(dim=1).values.clamp_min(0)


class HafRewardModel(nn.Module):
    """Causal LM wrapped as a HaF reward model.

    ``causal_lm`` is any transformers ``*ForCausalLM`` (optionally a peft ``PeftModel``). Its decoder body
    gives hidden states, its LM head (tied or untied) is the policy layer, and ``reward_head`` is a
    bias-free ``Linear(D, 1)`` on the last non-padding token's hidden state (bias-free like the ``score``
    layer of ``AutoModelForSequenceClassification``, so exports reproduce the rewards exactly; a bias would
    cancel in every Bradley–Terry difference anyway).
    """

    def __init__(self, causal_lm: nn.Module, reward_head: nn.Linear | None = None) -> None:
        super().__init__()
        self.causal_lm = causal_lm
        hidden_size = self.lm_head.weight.shape[1]
        self.reward_head = reward_head if reward_head is not None else nn.Linear(hidden_size, 1, bias=False)
        if reward_head is None:
            nn.init.normal_(self.reward_head.weight, std=1.0 / hidden_size**0.5)
        self._logit_scale, self._softcap = head_transform(self.config)

    # ------------------------------------------------------------------ structure
    @property
    def base_lm(self) -> nn.Module:
        """The transformers causal LM (unwrapping a peft model)."""
        lm = self.causal_lm
        return lm.get_base_model() if hasattr(lm, "get_base_model") else lm

    @property
    def config(self) -> Any:
        return self.base_lm.config

    @property
    def decoder(self) -> nn.Module:
        """The decoder body (``model.model`` / ``model.transformer``), returning final hidden states."""
        lm = self.base_lm
        if hasattr(lm, "get_decoder"):
            dec = lm.get_decoder()
            if dec is not None:
                return dec
        return lm.base_model

    @property
    def lm_head(self) -> nn.Module:
        return self.base_lm.get_output_embeddings()

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """``[V, D]`` LM-head weight (the tied input embedding when tied)."""
        head = self.lm_head
        return getattr(head, "base_layer", head).weight

    @property
    def lm_head_bias(self) -> torch.Tensor | None:
        head = self.lm_head
        return getattr(getattr(head, "base_layer", head), "bias", None)

    @property
    def logit_scale(self) -> float:
        return self._logit_scale

    @property
    def softcap(self) -> float | None:
        return self._softcap

    @property
    def is_peft(self) -> bool:
        return hasattr(self.causal_lm, "disable_adapter")

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        compute: Callable[[RewardModelOutput, HafRewardModel], Any] | None = None,
    ) -> RewardModelOutput | Any:
        """Hidden states, rewards and reward features of ``input_ids [S, T]``.

        ``compute(out, self)``, when given, runs inside ``forward`` and its result is returned instead:
        under DDP/FSDP the loss must be computed there, where the LM-head parameters are gathered.
        """
        out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        idx = last_token_index(attention_mask)
        features = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
        rewards = self.reward_head(features.to(self.reward_head.weight.dtype)).squeeze(-1)
        result = RewardModelOutput(hidden=hidden, rewards=rewards, features=features)
        return compute(result, self) if compute is not None else result

    @contextmanager
    def adapter_disabled(self):
        """Context in which a peft model runs with its adapters off (the LoRA reference model)."""
        ctx = self.causal_lm.disable_adapter() if self.is_peft else nullcontext()
        with ctx:
            yield

    def token_logprobs(self, hidden: torch.Tensor, labels: torch.Tensor, **kw: Any) -> torch.Tensor:
        """Per-token log-probs ``[S, T]`` of ``labels`` (next-token targets, -100 ignored), fused."""
        from haf_kernels import linear_logprobs

        s, t, d = hidden.shape
        w = self.lm_head_weight
        b = self.lm_head_bias
        logp = linear_logprobs(
            hidden.reshape(s * t, d).to(w.dtype),
            w,
            labels.reshape(s * t),
            bias=b,
            logit_scale=self.logit_scale,
            softcap=self.softcap,
            **kw,
        )
        return logp.view(s, t)


def build_causal_lm(
    *,
    pretrained: str | None = None,
    config: Any = None,
    model_type: str | None = None,
    config_overrides: dict | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """A causal LM from a pretrained path/name, a config object, or a ``model_type`` + overrides (tiny, local)."""
    import transformers

    if pretrained:
        kw = {} if dtype is None else {"dtype": dtype}
        return transformers.AutoModelForCausalLM.from_pretrained(pretrained, **kw)
    if config is None:
        if model_type is None:
            raise ValueError("build_causal_lm needs pretrained, config or model_type")
        config = transformers.AutoConfig.for_model(model_type, **(config_overrides or {}))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
    return model.to(dtype) if dtype is not None else model


def apply_lora(
    model: HafRewardModel, r: int, alpha: int, target_modules: list[str] | str | None = "auto", dropout: float = 0.0
):
    """Wrap the causal LM with a peft LoRA adapter; the reward head stays fully trainable, the LM head frozen.

    ``target_modules``: module names, or ``"auto"`` / ``"mlp"`` / ``"all-linear"`` resolved for the model's
    architecture (``training.lora``); the resolved names are kept as ``model.lora_target_modules``.
    """
    from peft import LoraConfig, get_peft_model

    from .lora import resolve_lora_targets, targets_are_conv1d

    targets = resolve_lora_targets(model.causal_lm, target_modules)
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=targets,
        lora_dropout=dropout,
        bias="none",
        fan_in_fan_out=targets_are_conv1d(model.causal_lm, targets),  # GPT-2 style Conv1D stores W transposed
    )
    model.causal_lm = get_peft_model(model.causal_lm, cfg)
    model.lora_target_modules = targets
    for p in model.reward_head.parameters():
        p.requires_grad_(True)
    return model


def frozen_copy(model: HafRewardModel) -> HafRewardModel:
    """A deep copy with every parameter frozen and in eval mode (the full fine-tuning reference)."""
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()
