"""Which modules of a causal LM get LoRA adapters (``TrainConfig.lora_target_modules``).

``lora_target_modules`` is a list of module names, matched as peft matches them (``q_proj`` is any module
whose dotted name ends in ``.q_proj``; ``mlp.c_proj`` only GPT-2's MLP output projection), or holds one of:

- ``auto`` (the default): peft's own per-architecture default
  (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``: ``q_proj``/``v_proj`` on Llama, Qwen2, Mistral,
  Gemma; ``c_attn`` on GPT-2; ``query_key_value`` on Falcon, GPT-NeoX, Bloom; ...); for a model type peft does
  not list, or whose listed names the model lacks, every linear / ``Conv1D`` layer of the decoder body;
- ``mlp``: the MLP (feed-forward) projections of any architecture: the linear layers inside the block's
  ``mlp`` / ``feed_forward`` / ``ffn`` / MoE container (Llama ``gate_proj``/``up_proj``/``down_proj``, GPT-2
  ``mlp.c_fc``/``mlp.c_proj``, Phi ``fc1``/``fc2``, Falcon / GPT-NeoX ``dense_h_to_4h``/``dense_4h_to_h``), or,
  without such a container, layers with those well-known MLP names (OPT ``fc1``/``fc2``);
- ``all-linear``: every linear / ``Conv1D`` layer of the decoder body.

The LM head (the output embeddings) and score / reward heads are never targeted by a keyword. An explicit name
that matches no module is a ``LoraTargetError`` (a ``ValueError``) naming the missing names and the model's
linear layers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from torch import nn

from .errors import LoraTargetError

KEYWORDS = ("auto", "mlp", "all-linear")
MLP_CONTAINERS = frozenset(
    {
        "mlp",
        "feed_forward",
        "feedforward",
        "ffn",
        "ff",
        "mlp_block",
        "block_sparse_moe",
        "moe",
        "experts",
        "shared_expert",
        "shared_experts",
        "dense_relu_dense",
    }
)
MLP_LEAVES = frozenset(
    {
        "gate_proj",
        "up_proj",
        "down_proj",
        "gate_up_proj",
        "c_fc",
        "fc1",
        "fc2",
        "fc_in",
        "fc_out",
        "dense_h_to_4h",
        "dense_4h_to_h",
        "w1",
        "w2",
        "w3",
    }
)
HEAD_NAMES = frozenset({"lm_head", "embed_out", "score", "reward_head", "v_head", "classifier", "output_layer"})


def _linear_classes() -> tuple[type, ...]:
    try:
        from transformers.pytorch_utils import Conv1D

        return (nn.Linear, Conv1D)
    except ImportError:  # pragma: no cover
        return (nn.Linear,)


def _keyword(name: str) -> str | None:
    low = name.strip().lower().replace("_", "-")
    return low if low in KEYWORDS else None


def _peft_default(model_type: str | None) -> list[str] | None:
    try:
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping
    except ImportError:  # older peft
        try:
            from peft.utils.other import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping
        except ImportError:
            return None
    names = mapping.get(model_type) if model_type else None
    return list(names) if names else None


def _matches(names: Sequence[str], pattern: str) -> set[str]:
    """Module names that peft's list matching selects for ``pattern`` (exact name or dotted suffix)."""
    return {n for n in names if n == pattern or n.endswith("." + pattern)}


def body_linear_layers(lm: nn.Module) -> dict[str, nn.Module]:
    """``{dotted name: module}`` of the linear / ``Conv1D`` layers of ``lm`` minus the LM head and any head."""
    classes = _linear_classes()
    out_emb = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    layers = {}
    for name, mod in lm.named_modules():
        if not name or not isinstance(mod, classes) or mod is out_emb:
            continue
        if name.rsplit(".", 1)[-1] in HEAD_NAMES:
            continue
        layers[name] = mod
    return layers


def _mlp_layers(linear: dict[str, nn.Module]) -> set[str]:
    inside = {n for n in linear if any(part in MLP_CONTAINERS for part in n.split(".")[:-1])}
    if inside:
        return inside
    return {n for n in linear if n.rsplit(".", 1)[-1] in MLP_LEAVES}


def _model_type(lm: nn.Module) -> str | None:
    cfg = getattr(lm, "config", None)
    mt = getattr(cfg, "model_type", None)
    text = getattr(cfg, "text_config", None)
    return mt or getattr(text, "model_type", None)


def _suffixes(selected: set[str], all_names: list[str]) -> list[str] | str:
    """Short peft target names selecting exactly ``selected``; a full-match regex when names cannot."""
    out: list[str] = []
    covered: set[str] = set()
    for name in all_names:
        if name not in selected or name in covered:
            continue
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            pat = ".".join(parts[-k:])
            hit = _matches(all_names, pat)
            if hit <= selected:
                if pat not in out:
                    out.append(pat)
                covered |= hit
                break
        else:
            return "^(" + "|".join(re.escape(n) for n in sorted(selected)) + ")$"
    return out


def resolve_lora_targets(lm: nn.Module, target_modules: Sequence[str] | str | None) -> list[str] | str:
    """peft ``target_modules`` for the transformers causal LM ``lm`` (see the module docstring).

    An explicit list (no keyword) is returned unchanged once every name matches a module; a plain string other
    than a keyword is a peft regex (full match) and must match a module too. ``None`` / empty means ``auto``.
    """
    all_names = [n for n, _ in lm.named_modules() if n]
    linear = body_linear_layers(lm)
    arch = f"{_model_type(lm) or '?'} ({type(lm).__name__})"
    if target_modules is None:
        target_modules = ["auto"]
    if isinstance(target_modules, str):
        if _keyword(target_modules) is None:
            if not any(re.fullmatch(target_modules, n) for n in all_names):
                raise LoraTargetError(
                    f"lora_target_modules: the pattern {target_modules!r} matches no module of {arch}; "
                    f"its linear layers are {_available(linear)} (or use {', '.join(KEYWORDS)})"
                )
            return target_modules
        target_modules = [target_modules]
    specs = [str(t) for t in target_modules if str(t).strip()] or ["auto"]
    missing = [t for t in specs if _keyword(t) is None and not _matches(all_names, t)]
    if missing:
        raise LoraTargetError(
            f"lora_target_modules: {', '.join(map(repr, missing))} not found in {arch}; its linear layers are "
            f"{_available(linear)} (or use {', '.join(KEYWORDS)}, resolved per architecture)"
        )
    if all(_keyword(t) is None for t in specs):
        return specs
    selected: set[str] = set()
    for spec in specs:
        kw = _keyword(spec)
        if kw is None:
            selected |= _matches(all_names, spec)
        elif kw == "all-linear":
            selected |= set(linear)
        elif kw == "mlp":
            mlp = _mlp_layers(linear)
            if not mlp:
                raise LoraTargetError(
                    f"lora_target_modules: no MLP projections recognised in {arch}; name them explicitly "
                    f"(its linear layers are {_available(linear)}) or use 'auto' / 'all-linear'"
                )
            selected |= mlp
        else:  # auto
            default = _peft_default(_model_type(lm))
            hits = [{n for n in _matches(all_names, t) if n in linear} for t in default or []]
            if default and all(hits):
                selected |= set().union(*hits)
            else:
                selected |= set(linear)
    if not selected:
        raise LoraTargetError(f"lora_target_modules: {specs} selects no linear layer of {arch}")
    return _suffixes(selected, all_names)


def _available(linear: dict[str, Any]) -> str:
    leaves = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in linear))
    return "[" + ", ".join(leaves) + "]" if leaves else "[] (no linear/Conv1D layers)"


def targets_are_conv1d(lm: nn.Module, targets: list[str] | str) -> bool:
    """Whether every layer ``targets`` selects is a GPT-2 style ``Conv1D`` (peft's ``fan_in_fan_out=True``)."""
    classes = _linear_classes()
    if len(classes) < 2:
        return False
    names = [n for n, _ in lm.named_modules() if n]
    mods = dict(lm.named_modules())
    if isinstance(targets, str):
        hit = {n for n in names if re.fullmatch(targets, n)}
    else:
        hit = set().union(*(_matches(names, t) for t in targets)) if targets else set()
    layers = [mods[n] for n in hit if isinstance(mods[n], classes)]
    return bool(layers) and all(isinstance(m, classes[1]) for m in layers)
