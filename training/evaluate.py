"""Held-out evaluation: reward-head and implicit-reward accuracy, mean margins, calibration (ECE), per subset."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch

from haf_kernels import objectives

from .data import PreferenceDataset, collate_pairs
from .distributed import DistInfo, gather_objects
from .model import HafRewardModel, RewardModelOutput


def expected_calibration_error(margins: list[float], n_bins: int = 10) -> float:
    """ECE of ``p = σ(r_c − r_r)`` as the probability that the labelled ``chosen`` wins.

    Symmetrised: each pair contributes ``(p, 1)`` and ``(1 − p, 0)``, so an always-right but overconfident
    model and a well calibrated one are told apart; equal-width bins over [0, 1].
    """
    if not margins:
        return float("nan")
    probs = [1.0 / (1.0 + math.exp(-max(min(m, 50.0), -50.0))) for m in margins]
    points = [(p, 1.0) for p in probs] + [(1.0 - p, 0.0) for p in probs]
    bins: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for p, y in points:
        bins[min(int(p * n_bins), n_bins - 1)].append((p, y))
    total = len(points)
    return sum(
        len(b) / total * abs(sum(p for p, _ in b) / len(b) - sum(y for _, y in b) / len(b)) for b in bins.values()
    )


def pair_metrics(rows: list[dict[str, Any]], prefix: str = "") -> dict[str, float]:
    """Metrics of per-pair records (``reward_margin``, ``implicit_margin``, optional ``true_margin``)."""
    n = len(rows)
    out = {f"{prefix}n_pairs": float(n)}
    if n == 0:
        return out
    rm = [r["reward_margin"] for r in rows]
    im = [r["implicit_margin"] for r in rows]
    out[f"{prefix}reward_accuracy"] = sum(m > 0 for m in rm) / n
    out[f"{prefix}implicit_accuracy"] = sum(m > 0 for m in im) / n
    out[f"{prefix}reward_margin"] = sum(rm) / n
    out[f"{prefix}implicit_margin"] = sum(im) / n
    out[f"{prefix}reward_ece"] = expected_calibration_error(rm)
    scores = [r[k] for r in rows for k in ("reward_chosen", "reward_rejected") if r.get(k) is not None]
    if scores:  # where the rewards sit (reward centering keeps the mean near 0)
        mean = sum(scores) / len(scores)
        out[f"{prefix}reward_mean"] = mean
        out[f"{prefix}reward_std"] = math.sqrt(sum((x - mean) ** 2 for x in scores) / max(len(scores) - 1, 1))
    out[f"{prefix}reward_bt_loss"] = sum(math.log1p(math.exp(-m)) if m > -30 else -m for m in rm) / n
    true = [r for r in rows if r.get("true_margin") is not None and not math.isnan(r["true_margin"])]
    if true:  # synthetic data: agreement with the true order, whatever the (possibly noisy) label says
        out[f"{prefix}reward_true_accuracy"] = sum(
            (r["reward_margin"] > 0) == (r["true_margin"] > 0) for r in true
        ) / len(true)
        out[f"{prefix}implicit_true_accuracy"] = sum(
            (r["implicit_margin"] > 0) == (r["true_margin"] > 0) for r in true
        ) / len(true)
    return out


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    raw: HafRewardModel,
    dataset: PreferenceDataset,
    *,
    reference: Any,
    split: str,
    pad_token_id: int,
    batch_size: int,
    beta: float,
    averaged: bool,
    info: DistInfo,
    autocast: Any,
    backend: str = "auto",
    amp_dtype: torch.dtype | None = None,
    rows_out: list[dict[str, Any]] | None = None,
) -> dict[str, float]:
    """Metrics over ``dataset`` (sharded over ranks, gathered): overall and per ``subset``.

    ``model`` is the (possibly DDP/FSDP-wrapped) training model; ``reference`` a ``ReferenceLogps``.
    Returns an empty dict on ranks other than 0. ``rows_out`` (rank 0): extended with one record per pair,
    ``{"row", "reward_chosen", "reward_rejected", "reward_margin", "implicit_margin", ...}`` (``row``: the pair's
    1-based row in its source file), the rewards read under the reward contract like ``haf-score``.
    """
    from .reference import seq_logprobs_fn

    was_training = raw.training
    raw.eval()
    records: list[dict[str, Any]] = []
    idx_all = list(range(info.rank, len(dataset), info.world_size))
    n_batches = math.ceil(len(dataset) / (batch_size * info.world_size))  # same count on every rank (FSDP)
    for bi in range(n_batches):
        idx = idx_all[bi * batch_size : (bi + 1) * batch_size] or [idx_all[0] if idx_all else 0]
        real = bi * batch_size < len(idx_all)
        batch = collate_pairs([dataset[i] for i in idx], pad_token_id).to(info.device)
        b = batch.n_pairs
        base = seq_logprobs_fn(batch.labels, backend, amp_dtype)

        def compute(out: RewardModelOutput, m: HafRewardModel):
            return out.rewards.float(), base(out, m)

        with autocast():
            rewards, (sums, counts) = model(batch.input_ids, batch.attention_mask, compute=compute)
            ref = reference(batch, split, model=model, raw=raw)
        pol = objectives.sequence_logps(sums, counts, averaged)
        ref_c = ref_r = None
        if ref is not None:
            ref_lp = objectives.sequence_logps(*ref, averaged)
            ref_c, ref_r = ref_lp[:b], ref_lp[b:]
        d = objectives.log_ratio(pol[:b], pol[b:], ref_c, ref_r).float().cpu()
        rewards = rewards.float().cpu()
        rmargin = rewards[:b] - rewards[b:]
        if not real:
            continue
        tc, tr = batch.columns.get("true_reward_chosen"), batch.columns.get("true_reward_rejected")
        for k in range(b):
            records.append(
                {
                    "row": batch.source_rows[k] if batch.source_rows else None,
                    "reward_chosen": float(rewards[k]),
                    "reward_rejected": float(rewards[b + k]),
                    "reward_margin": float(rmargin[k]),
                    "implicit_margin": float(beta * d[k]),  # objectives.implicit_margin, per pair
                    "subset": batch.subsets[k],
                    "true_margin": None if tc is None else float(tc[k] - tr[k]),
                }
            )
    raw.train(was_training)
    gathered = gather_objects(records, info)
    if not info.is_main:
        return {}
    rows = [r for part in gathered for r in part]
    if rows_out is not None:
        rows_out.extend(rows)
    metrics = pair_metrics(rows)
    subsets = sorted({r["subset"] for r in rows if r["subset"] is not None})
    for s in subsets:
        metrics.update(pair_metrics([r for r in rows if r["subset"] == s], prefix=f"subset/{s}/"))
    return metrics
