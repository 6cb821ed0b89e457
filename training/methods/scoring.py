"""Score preference pairs with a trained ``HafRewardModel``: reward-head and implicit (DPO) margins per pair.

``score_pairs(model, dataset) -> PairScores`` with ``reward_chosen/reward_rejected [B]`` and, when a reference
model is given, ``implicit_margin [B] = β·((logπ_c − logπref_c) − (logπ_r − logπref_r))`` (sums, or per-token
means with ``averaged``). Used by the ensemble (strength) and by the experiment's held-out evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from haf_kernels import objectives

from ..data import PreferenceDataset, collate_pairs
from ..reference import seq_logprobs_fn


@dataclass
class PairScores:
    """Per-pair scores, all ``[B]`` float64 on CPU, in dataset order."""

    reward_chosen: torch.Tensor
    reward_rejected: torch.Tensor
    logp_chosen: torch.Tensor
    logp_rejected: torch.Tensor
    implicit_margin: torch.Tensor | None

    @property
    def reward_margin(self) -> torch.Tensor:
        return self.reward_chosen - self.reward_rejected


@torch.no_grad()
def _pass(model, dataset: PreferenceDataset, pad_id: int, batch_size: int, averaged: bool, backend: str):
    was = model.training
    model.eval()
    rc, rr, lc, lr_ = [], [], [], []
    for i in range(0, len(dataset), batch_size):
        batch = collate_pairs([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))], pad_id)
        batch = batch.to(model.lm_head_weight.device)
        base = seq_logprobs_fn(batch.labels, backend)
        rewards, (sums, counts) = model(
            batch.input_ids, batch.attention_mask, compute=lambda out, m: (out.rewards.float(), base(out, m))
        )
        lp = objectives.sequence_logps(sums, counts, averaged)
        b = batch.n_pairs
        rc.append(rewards[:b]), rr.append(rewards[b:]), lc.append(lp[:b]), lr_.append(lp[b:])
    model.train(was)
    cat = lambda xs: torch.cat(xs).double().cpu()  # noqa: E731
    return cat(rc), cat(rr), cat(lc), cat(lr_)


def score_pairs(
    model,
    dataset: PreferenceDataset,
    *,
    pad_token_id: int,
    reference=None,
    beta: float = 0.1,
    averaged: bool = False,
    batch_size: int = 128,
    backend: str = "auto",
) -> PairScores:
    """Rewards and sequence log-probs of every pair of ``dataset`` (``reference``: the initial model, or None)."""
    rc, rr, lc, lr_ = _pass(model, dataset, pad_token_id, batch_size, averaged, backend)
    implicit = None
    if reference is not None:
        _, _, ref_c, ref_r = _pass(reference, dataset, pad_token_id, batch_size, averaged, backend)
        implicit = objectives.implicit_margin(beta, lc, lr_, ref_c, ref_r)
    return PairScores(rc, rr, lc, lr_, implicit)
