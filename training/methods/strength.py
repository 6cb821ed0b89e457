"""Preference strength by ensemble voting (Secrets of RLHF II, §3.1).

M reward models, trained on the same data with different seeds / orderings / bootstrap splits, score every
pair. For pair i and member m the vote is ``d_{i,m} = r_m(x_i, y_c) − r_m(x_i, y_r)``; the strength of the
pair is ``strength_mean_i = mean_m d_{i,m}`` and its uncertainty ``strength_std_i = std_m d_{i,m}``. The paper
reports that about the lowest 20% by mean (mean < 0) behave as wrong labels and the next 20% (mean ≈ 0) as
ambiguous ones.

Choices the paper leaves open, exposed here:
- ``ddof`` of the standard deviation (default 0, numpy's default; the paper writes plain "std").
- ``standardize``: divide each member's differences by that member's std over pairs before averaging, so
  members with different reward scales vote equally (default off, as in the paper).
- How the ensemble is made (seeds, orderings or bootstrap splits) is the trainer's business (``haf-strength``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray | Sequence[Sequence[float]]


def _as_2d_float64(x: ArrayLike) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach().to(torch.float64).cpu()
    if t.dim() != 2:
        raise ValueError(f"reward differences must be [M, B] (members × pairs), got shape {tuple(t.shape)}")
    return t


def reward_differences(chosen_rewards: ArrayLike, rejected_rewards: ArrayLike) -> torch.Tensor:
    """Votes ``d[m, i] = r_m(c_i) − r_m(r_i)``.

    Args:
        chosen_rewards: ``[M, B]`` rewards of the chosen responses by each of M members.
        rejected_rewards: ``[M, B]`` rewards of the rejected responses.
    Returns:
        ``[M, B]`` float64.
    """
    c, r = _as_2d_float64(chosen_rewards), _as_2d_float64(rejected_rewards)
    if c.shape != r.shape:
        raise ValueError(f"chosen_rewards {tuple(c.shape)} and rejected_rewards {tuple(r.shape)} must match")
    return c - r


def preference_strength(
    diffs: ArrayLike, *, ddof: int = 0, standardize: bool = False, mask: ArrayLike | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(strength_mean [B], strength_std [B])`` from votes ``diffs [M, B]``.

    Equivalent numpy: ``d.mean(0), d.std(0, ddof=ddof)``. With ``standardize`` each row ``d[m]`` is first
    divided by its std over pairs (a scale-free vote). ``mask [M, B]`` (bool) keeps only some votes, e.g. the
    out-of-bag members of a bootstrap ensemble (those that did not train on the pair); a pair with no vote
    (or ≤ ddof votes) gets NaN.
    """
    d = _as_2d_float64(diffs)
    if d.shape[0] - ddof <= 0:
        raise ValueError(f"need more than ddof={ddof} ensemble members, got M={d.shape[0]}")
    if standardize:
        d = d / d.std(dim=1, correction=0, keepdim=True).clamp_min(1e-12)
    if mask is None:
        return d.mean(dim=0), d.std(dim=0, correction=ddof)
    w = _as_2d_float64(mask).bool()
    if w.shape != d.shape:
        raise ValueError(f"mask {tuple(w.shape)} must match diffs {tuple(d.shape)}")
    n = w.sum(0).to(torch.float64)
    mean = torch.where(w, d, 0.0).sum(0) / n
    var = torch.where(w, (d - mean) ** 2, 0.0).sum(0) / (n - ddof)
    nan = torch.full_like(mean, float("nan"))
    return torch.where(n > 0, mean, nan), torch.where(n > ddof, var.sqrt(), nan)


def member_indices(
    n: int, members: int, *, mode: str = "seed", seed: int = 0, fraction: float = 0.5
) -> list[list[int]]:
    """Training-row indices of each ensemble member over a dataset of ``n`` pairs.

    ``mode``: ``"seed"`` every member sees all rows (members differ by seed/ordering, as in the paper);
    ``"bootstrap"`` n rows drawn with replacement; ``"subsample"`` a random ``fraction`` without replacement.
    Deterministic in ``seed``. Use ``in_bag_mask`` for out-of-bag strengths.
    """
    g = torch.Generator().manual_seed(int(seed))
    out = []
    for _ in range(members):
        if mode == "seed":
            out.append(list(range(n)))
        elif mode == "bootstrap":
            out.append(torch.randint(0, n, (n,), generator=g).tolist())
        elif mode == "subsample":
            out.append(sorted(torch.randperm(n, generator=g)[: max(1, round(fraction * n))].tolist()))
        else:
            raise ValueError(f"mode must be seed|bootstrap|subsample, got {mode!r}")
    return out


def in_bag_mask(indices: Sequence[Sequence[int]], n: int) -> torch.Tensor:
    """``[M, B]`` bool: member m trained on pair i."""
    m = torch.zeros(len(indices), n, dtype=torch.bool)
    for j, idx in enumerate(indices):
        m[j, torch.as_tensor(list(idx), dtype=torch.long)] = True
    return m


def ensemble_strength(
    scorers: Iterable[Callable[[], tuple[torch.Tensor, torch.Tensor]]], *, ddof: int = 0, standardize: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score the same pairs with every member and return ``(strength_mean [B], strength_std [B], diffs [M, B])``.

    Each scorer is a zero-argument callable returning ``(rewards_chosen [B], rewards_rejected [B])`` for the
    same B pairs in the same order (e.g. ``lambda: score_pairs(model_m, dataset)``).
    """
    chosen, rejected = [], []
    for score in scorers:
        c, r = score()
        chosen.append(torch.as_tensor(c).detach().double().cpu().reshape(-1))
        rejected.append(torch.as_tensor(r).detach().double().cpu().reshape(-1))
    if not chosen:
        raise ValueError("scorers is empty; need at least one ensemble member")
    diffs = reward_differences(torch.stack(chosen), torch.stack(rejected))
    mean, std = preference_strength(diffs, ddof=ddof, standardize=standardize)
    return mean, std, diffs


def add_strength_columns(
    rows: Sequence[Mapping[str, Any]],
    strength_mean: ArrayLike,
    strength_std: ArrayLike,
    *,
    mean_key: str = "strength_mean",
    std_key: str = "strength_std",
) -> list[dict[str, Any]]:
    """Copies of ``rows`` (one dict per pair, same order as the strengths) with the two strength columns added."""
    mean = np.asarray(torch.as_tensor(strength_mean).double().cpu()).reshape(-1)
    std = np.asarray(torch.as_tensor(strength_std).double().cpu()).reshape(-1)
    if not (len(rows) == mean.shape[0] == std.shape[0]):
        raise ValueError(
            f"rows ({len(rows)}), strength_mean ({mean.shape[0]}) and strength_std ({std.shape[0]}) differ"
        )
    return [{**row, mean_key: float(m), std_key: float(s)} for row, m, s in zip(rows, mean, std)]


def write_jsonl(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """One JSON object per line (the data-file format the trainer reads)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve of ``scores [B]`` for binary ``labels [B]`` (ties count one half).

    For noisy-label detection pass ``scores = −strength_mean`` and ``labels = flipped``. Returns NaN when only
    one class is present.
    """
    s = np.asarray(
        torch.as_tensor(np.asarray(scores, dtype=np.float64) if not isinstance(scores, torch.Tensor) else scores)
        .double()
        .cpu()
    ).reshape(-1)
    y = np.asarray(labels).astype(bool).reshape(-1)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty_like(s)
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def plot_strength_histogram(
    strength_mean: ArrayLike,
    path: str | os.PathLike,
    *,
    flipped: ArrayLike | None = None,
    bins: int = 40,
    title: str = "Preference strength (ensemble mean of r_c − r_r)",
) -> None:
    """Histogram PNG of ``strength_mean [B]``; with ``flipped [B]`` (bool) the two groups are stacked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = np.asarray(torch.as_tensor(strength_mean).double().cpu()).reshape(-1)
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    if flipped is None:
        ax.hist(mean, bins=bins, color="tab:blue")
    else:
        fl = np.asarray(flipped).astype(bool).reshape(-1)
        ax.hist(
            [mean[~fl], mean[fl]],
            bins=bins,
            stacked=True,
            color=["tab:blue", "tab:red"],
            label=["label kept", "label flipped by annotator"],
        )
        ax.legend(fontsize=8)
    ax.axvline(0.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("strength_mean")
    ax.set_ylabel("pairs")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
