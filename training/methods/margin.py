"""Adaptive margin from preference strength (Secrets of RLHF II, §3.2).

The Bradley–Terry loss with a per-pair margin is ``−logσ(r_c − r_r − m_i)`` with ``m_i = λ · strength_mean_i``:
a confidently-labelled pair (large strength) must be separated by more, an ambiguous or likely-wrong pair
(strength ≤ 0) by less, or is even allowed to be ranked the other way. It goes through
``fused_haf_loss(reward_margin=m)``; the policy term is unchanged.

Choices the paper leaves open, exposed here: the scale ``λ`` (default 1, the paper's form); clipping the margin
to ``[clip_min, clip_max]`` (default no clip); centring/standardising the strengths first (``normalize``:
``"none"`` (default) | ``"standardize"``, useful when the ensemble's reward scale differs from the trained
model's).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F


def adaptive_margin(
    strength_mean: torch.Tensor | Sequence[float],
    scale: float = 1.0,
    *,
    normalize: str = "none",
    clip_min: float | None = None,
    clip_max: float | None = None,
) -> torch.Tensor:
    """Per-pair margin ``[B] = λ · strength_mean`` (optionally normalised / clipped), detached, float32."""
    s = torch.as_tensor(strength_mean).detach().to(torch.float32).reshape(-1)
    if normalize == "standardize":
        s = (s - s.mean()) / s.std(correction=0).clamp_min(1e-12)
    elif normalize != "none":
        raise ValueError(f"normalize must be 'none' or 'standardize', got {normalize!r}")
    m = float(scale) * s
    if clip_min is not None or clip_max is not None:
        m = m.clamp(min=clip_min, max=clip_max)
    return m


def margin_from_rows(
    rows: Sequence[Mapping[str, Any]], scale: float = 1.0, *, key: str = "strength_mean"
) -> torch.Tensor:
    """``reward_margin [B]`` for a batch of data rows carrying a ``strength_mean`` column (missing → 0)."""
    return adaptive_margin([float(r.get(key, 0.0) or 0.0) for r in rows], scale)


def bt_loss_with_margin(
    rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor, margin: torch.Tensor | float = 0.0
) -> torch.Tensor:
    """Reference ``mean(−logσ(r_c − r_r − m))`` for tests (the trainer uses ``fused_haf_loss``)."""
    return -F.logsigmoid(rewards_chosen - rewards_rejected - margin).mean()
