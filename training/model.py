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
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from haf_kernels.contract import head_transform, last_token_index

if TYPE_CHECKING:
    from .data import PackedLayout


@dataclass
class RewardModelOutput:
    """``hidden [S, T, D]`` final hidden states, ``rewards [S]`` reward-head scores of the last non-pad
    token, ``features [S, D]`` the reward head's input (that token's hidden state)."""

    hidden: torch.Tensor
    rewards: torch.Tensor
    features: torch.Tensor


# Attention implementations whose packed rows get an explicit 4D block-diagonal causal mask. transformers 5 returns a
# 4D mask as is (``masking_utils._preprocess_mask_arguments``) and sdpa / eager apply it; its own packed-sequence
# detection from ``position_ids`` is not used (it needs ``attention_mask=None``, and flash attention applies it
# only to batches of one row: several packed rows would attend across sequences).
PACKED_ATTENTION = ("sdpa", "eager")


def attention_implementation(config: Any) -> str:
    """The attention implementation a transformers config runs with (``config._attn_implementation``)."""
    cfg = getattr(config, "text_config", None) or config
    return str(getattr(cfg, "_attn_implementation", None) or "eager")


def packed_attention_mask(segment_ids: torch.Tensor, impl: str, dtype: torch.dtype) -> torch.Tensor:
    """``[R, 1, L, L]`` causal mask confined to each packed sequence: query ``q`` sees key ``k <= q`` of its own
    segment (``segment_ids [R, L]``, ``-1`` on padding; a padding token sees only itself, so no row is empty).

    ``impl "sdpa"``: bool, True where attended; ``"eager"``: additive, 0 there and ``finfo(dtype).min`` elsewhere.
    """
    seg = segment_ids
    n = seg.shape[1]
    pos = torch.arange(n, device=seg.device)
    causal = pos.view(1, n, 1) >= pos.view(1, 1, n)
    same = (seg.unsqueeze(2) == seg.unsqueeze(1)) & (seg >= 0).unsqueeze(2)
    allowed = (causal & same) | torch.eye(n, dtype=torch.bool, device=seg.device)
    allowed = allowed.unsqueeze(1)
    if impl == "sdpa":
        return allowed
    zero = torch.zeros((), dtype=dtype, device=seg.device)
    return torch.where(allowed, zero, torch.full((), torch.finfo(dtype).min, dtype=dtype, device=seg.device))


def packing_problem(config: Any, max_length: int) -> str | None:
    """Why packed rows of sequences of up to ``max_length`` tokens would not reproduce unpacked results for a model
    of ``config`` (``None``: no known reason; ``HafRewardModel.check_packing`` then tests it on the model itself).

    Refused: attention implementations other than ``PACKED_ATTENTION`` (flash / flex attention: not verified
    here) and sliding-window attention whose window is shorter than ``max_length`` (the packed mask has no window;
    with ``sliding_window >= max_length`` the window never cuts inside a sequence, so the results are the same).
    """
    cfg = getattr(config, "text_config", None) or config
    impl = attention_implementation(cfg)
    if impl not in PACKED_ATTENTION:
        return (
            f"attention implementation {impl!r} is not supported with packing (supported: "
            f"{', '.join(PACKED_ATTENTION)}: they get an explicit block-diagonal mask)"
        )
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None) or []
    uses_window = getattr(cfg, "use_sliding_window", True) is not False and (
        not layer_types or any("sliding" in str(x) for x in layer_types)
    )
    if window and uses_window and int(window) < max_length:
        return (
            f"the model uses sliding-window attention (sliding_window={window}) shorter than max_length "
            f"({max_length}); the packed mask has no window"
        )
    return None


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖ / ‖b‖`` in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


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
        packing: PackedLayout | None = None,
    ) -> RewardModelOutput | Any:
        """Hidden states, rewards and reward features of ``input_ids [S, T]``.

        ``compute(out, self)``, when given, runs inside ``forward`` and its result is returned instead:
        under DDP/FSDP the loss must be computed there, where the LM-head parameters are gathered.
        ``packing`` (``data.collate_packed``): the body runs on the packed rows instead (per-sequence positions,
        a block-diagonal causal mask), and the hidden states are gathered back into the ``[S, T, D]`` layout of
        ``input_ids``; rewards are read at each sequence's last token. ``packing_problem`` says where it is
        unsupported.
        """
        if packing is not None:
            hidden, features = self._packed_hidden(input_ids, packing)
        else:
            out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            idx = last_token_index(attention_mask)
            features = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
        rewards = self.reward_head(features.to(self.reward_head.weight.dtype)).squeeze(-1)
        result = RewardModelOutput(hidden=hidden, rewards=rewards, features=features)
        return compute(result, self) if compute is not None else result

    def _packed_hidden(self, input_ids: torch.Tensor, packing: PackedLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden [S, T, D], features [S, D])`` from one body forward over the packed rows."""
        s, t = input_ids.shape
        if tuple(packing.gather_index.shape) != (s, t):
            raise ValueError(
                f"packing.gather_index must have the shape of input_ids {[s, t]}, "
                f"got {list(packing.gather_index.shape)}"
            )
        impl = attention_implementation(self.config)
        if impl not in PACKED_ATTENTION:
            raise ValueError(
                f"packing: attention implementation {impl!r} is not supported "
                f"(supported: {', '.join(PACKED_ATTENTION)})"
            )
        emb = self.decoder.get_input_embeddings().weight
        mask = packed_attention_mask(packing.segment_ids, impl, emb.dtype)
        out = self.decoder(
            input_ids=packing.input_ids, attention_mask=mask, position_ids=packing.position_ids, use_cache=False
        )
        packed = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        flat = packed.reshape(-1, packed.shape[-1])
        hidden = flat.index_select(0, packing.gather_index.reshape(-1)).view(s, t, flat.shape[-1])
        return hidden, flat.index_select(0, packing.last_index)

    @torch.no_grad()
    def check_packing(self, lengths: tuple[int, ...] = (7, 5, 3), seed: int = 0) -> float:
        """Run a few random sequences packed into one padded row and each alone; return the relative difference of
        their hidden states, or raise ``ValueError`` when it shows cross-sequence attention or positions that are
        not per sequence (relative difference above 1e-4 in fp32, 3e-2 in lower precision).

        Runs in eval mode (no dropout) in the parameters' dtype, without autocast; restores the training mode.
        """
        from .data import PairExample, collate_packed

        vocab = self.lm_head_weight.shape[0]
        g = torch.Generator().manual_seed(seed)
        seqs = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
        seqs += [seqs[0]] * (len(seqs) % 2)  # whole pairs: chosen rows, then rejected rows
        half = len(seqs) // 2
        examples = [PairExample([], seqs[i], seqs[half + i], i) for i in range(half)]
        batch = collate_packed(examples, 0, pack_length=sum(map(len, seqs)), pad_to_multiple_of=16)
        device = self.lm_head_weight.device
        batch = batch.to(device)
        was_training = self.training
        self.eval()
        try:
            with torch.autocast(device.type, enabled=False):
                packed = self(batch.input_ids, batch.attention_mask, packing=batch.packing)
                worst = 0.0
                solo_rewards = []
                for i, ids in enumerate(seqs):
                    x = torch.tensor([ids], device=device)
                    solo = self(x, torch.ones_like(x))
                    worst = max(worst, _rel(packed.hidden[i, : len(ids)], solo.hidden[0]))
                    solo_rewards.append(solo.rewards[0])
                worst = max(worst, _rel(packed.rewards, torch.stack(solo_rewards)))
        finally:
            self.train(was_training)
        tol = 1e-4 if self.lm_head_weight.dtype in (torch.float32, torch.float64) else 3e-2
        if not worst <= tol:  # also catches NaN
            raise ValueError(
                f"packed sequences do not reproduce unpacked ones (relative difference {worst:.3g} > {tol:g}, "
                f"attention {attention_implementation(self.config)!r}): the model attends across packed sequences or "
                "does not use per-sequence position_ids"
            )
        return worst

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
