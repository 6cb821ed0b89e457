"""Noisy-pair handling from preference strength (Secrets of RLHF II, §3.2).

Pairs are selected by their ensemble ``strength_mean`` (see ``strength.py``), either every pair with mean below
a ``threshold`` or the lowest ``fraction`` of pairs; then one of

- ``flip``: swap chosen and rejected (and every ``*chosen*``/``*rejected*`` column pair) and negate the strength,
  as the paper does for the lowest 10–20%;
- ``drop``: keep the pair but give it ``weight = 0`` (``fused_haf_loss(pair_weights=...)`` skips it);
- ``soft``: either down-weight the pair (``soft_mode="weight"``: ``weight = soft_weight``), or apply a
  per-pair label smoothing ε (``soft_mode="smooth"``). ``fused_haf_loss`` takes one scalar ε for the whole
  batch; a per-pair ε is exact through pair weights because
  ``−(1−ε)·logσ(m) − ε·logσ(−m)`` is the (1−ε, ε)-weighted sum of the pair's loss in its two orientations:
  the pair keeps ``weight = 1−ε`` and a flipped copy with ``weight = ε`` is appended. Both BT and
  the sigmoid policy term are smoothed this way, as the scalar ``label_smoothing`` does.

Everything is expressed as data columns (``weight``, swapped texts, ``strength_mean``) that a trainer turns
into ``pair_weights=[B]`` / ``reward_margin=[B]``, plus tensor helpers for batches laid out as ``fused_haf_loss``
wants them (rows ``0..B-1`` chosen, ``B..2B-1`` rejected).

Choices the paper leaves open, exposed here: selection by threshold or by fraction; ties at the fraction
boundary (broken by row index, stable); the flipped copy's weight in soft mode; the soft weight.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

MODES = ("flip", "drop", "soft")


def select_noisy_pairs(
    strength_mean: torch.Tensor | Sequence[float], *, threshold: float | None = None, fraction: float | None = None
) -> torch.Tensor:
    """Boolean mask ``[B]`` of the pairs to treat as noisy.

    Exactly one of ``threshold`` (select ``strength_mean < threshold``) and ``fraction`` (select the
    ``round(fraction·B)`` lowest, ties broken by index) must be given.
    """
    s = torch.as_tensor(strength_mean, dtype=torch.float64).reshape(-1)
    if (threshold is None) == (fraction is None):
        raise ValueError("give exactly one of threshold and fraction")
    if threshold is not None:
        return s < float(threshold)
    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    k = int(math.floor(float(fraction) * s.numel() + 0.5))
    mask = torch.zeros(s.numel(), dtype=torch.bool)
    if k > 0:
        order = torch.sort(s, stable=True).indices
        mask[order[:k]] = True
    return mask


def _pair_keys(row: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [
        (k, k.replace("chosen", "rejected")) for k in row if "chosen" in k and k.replace("chosen", "rejected") in row
    ]


def flip_row(row: Mapping[str, Any], *, strength_key: str = "strength_mean", flag_key: str = "noisy_flipped") -> dict:
    """A copy of one pair with chosen/rejected swapped (every ``*chosen*``/``*rejected*`` column pair, e.g.
    ``chosen``/``rejected``, ``true_reward_chosen``/``true_reward_rejected``), strength negated, flag toggled."""
    out = dict(row)
    for kc, kr in _pair_keys(row):
        out[kc], out[kr] = row[kr], row[kc]
    if strength_key in row and row[strength_key] is not None:
        out[strength_key] = -float(row[strength_key])
    out[flag_key] = not bool(row.get(flag_key, False))
    return out


def apply_noisy_mode(
    rows: Sequence[Mapping[str, Any]],
    mode: str,
    *,
    threshold: float | None = None,
    fraction: float | None = None,
    soft_mode: str = "smooth",
    soft_epsilon: float = 0.3,
    soft_weight: float = 0.5,
    strength_key: str = "strength_mean",
    weight_key: str = "weight",
) -> list[dict[str, Any]]:
    """Rows (dicts with a ``strength_mean`` column) rewritten by ``mode`` for the selected pairs.

    - ``flip``: selected rows are replaced by ``flip_row``.
    - ``drop``: selected rows get ``weight = 0``.
    - ``soft`` + ``soft_mode="weight"``: selected rows get ``weight = soft_weight``.
    - ``soft`` + ``soft_mode="smooth"``: selected rows get ``weight = 1 − soft_epsilon`` and a flipped copy
      with ``weight = soft_epsilon`` is appended at the end (exact per-pair label smoothing).
    Unselected rows get ``weight`` 1 unless they already carry one.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if any(strength_key not in r for r in rows):
        raise ValueError(f"every row needs a {strength_key!r} column (run haf-strength first)")
    mask = select_noisy_pairs([float(r[strength_key]) for r in rows], threshold=threshold, fraction=fraction)
    out: list[dict[str, Any]] = []
    extra: list[dict[str, Any]] = []
    for row, sel in zip(rows, mask.tolist()):
        row = {weight_key: 1.0, **row}
        if not sel:
            out.append(row)
        elif mode == "flip":
            out.append(flip_row(row, strength_key=strength_key))
        elif mode == "drop":
            out.append({**row, weight_key: 0.0})
        elif soft_mode == "weight":
            out.append({**row, weight_key: float(soft_weight)})
        elif soft_mode == "smooth":
            if not 0.0 <= soft_epsilon <= 0.5:
                raise ValueError(f"soft_epsilon must be in [0, 0.5], got {soft_epsilon!r}")
            w = float(row[weight_key])
            out.append({**row, weight_key: w * (1.0 - soft_epsilon)})
            extra.append({**flip_row(row, strength_key=strength_key), weight_key: w * soft_epsilon})
        else:
            raise ValueError(f"soft_mode must be 'smooth' or 'weight', got {soft_mode!r}")
    return out + extra


# ---- tensor helpers for a concatenated batch (rows 0..B-1 chosen, B..2B-1 rejected) ----


def flip_concat(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Swap rows ``i`` and ``i + B`` of ``x [2B, ...]`` where ``mask [B]`` is set (e.g. input_ids, labels,
    rewards, ref_logps). Differentiable; returns a new tensor."""
    b = mask.shape[0]
    if x.shape[0] != 2 * b:
        raise ValueError(f"x must have 2B = {2 * b} rows, got {x.shape[0]}")
    idx = torch.arange(2 * b, device=x.device)
    m = mask.to(x.device, torch.bool)
    idx[:b] = torch.where(m, idx[:b] + b, idx[:b])
    idx[b:] = torch.where(m, idx[b:] - b, idx[b:])
    return x.index_select(0, idx)


def drop_weights(mask: torch.Tensor, pair_weights: torch.Tensor | None = None) -> torch.Tensor:
    """``pair_weights [B]`` with the selected pairs set to 0 (others 1, or their given weight)."""
    w = torch.ones(mask.shape[0], dtype=torch.float32, device=mask.device) if pair_weights is None else pair_weights
    return torch.where(mask.to(w.device, torch.bool), torch.zeros_like(w), w)


def soft_weights(mask: torch.Tensor, weight: float, pair_weights: torch.Tensor | None = None) -> torch.Tensor:
    """``pair_weights [B]`` with the selected pairs multiplied by ``weight`` (down-weighting)."""
    w = torch.ones(mask.shape[0], dtype=torch.float32, device=mask.device) if pair_weights is None else pair_weights
    return torch.where(mask.to(w.device, torch.bool), w * float(weight), w)
