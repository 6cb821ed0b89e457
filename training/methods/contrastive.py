"""Contrastive auxiliary losses on reward-model features (Secrets of RLHF II, §4.1).

The reward model's feature ``f(x, y) ∈ R^D`` is the reward head's input (last-token hidden state). Two views of
each feature come from dropout (p = 0.05). What is contrasted (``on``):

- ``"pair"``: the 2B features ``{f_c, f_r}`` of a batch;
- ``"diff"``: the 2B differences ``{f_c − f_r, f_r − f_c}``.

SimCSE: positives are the two views of the same item, negatives every other item in the batch; similarity is
cosine / temperature, loss is InfoNCE (cross-entropy over the batch). Paper weight 1.

SwAV: K learnable prototypes (K = 50 on pairs, 20 on differences); each view's prototype scores are turned into
balanced soft assignments by Sinkhorn–Knopp (every prototype receives 1/K of the batch's mass), and each view
predicts the *other* view's assignment (swapped prediction). Paper weight 0.1 (0.5 on differences).

Total auxiliary term added to the HaF loss: ``weight · L_contrastive``.

Choices the paper leaves open, exposed here: temperature (SimCSE default 0.05, SimCSE paper; SwAV default 0.1,
SwAV paper); whether SimCSE is symmetric (default no, as in SimCSE); Sinkhorn ε (0.05) and iterations (3);
where the dropout views come from (default: dropout on the features; pass ``views=`` for two model passes);
whether differences are formed from dropped-out features (yes: views are taken first, then differenced, so
each difference view has independent noise on both sides).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

METHODS = ("simcse", "swav")
TARGETS = ("pair", "diff")


def contrast_items(features: torch.Tensor, on: str = "pair") -> torch.Tensor:
    """Items to contrast from ``features [2B, D]`` (rows 0..B-1 chosen): ``[2B, D]``.

    ``pair`` → the features themselves; ``diff`` → ``cat(f_c − f_r, f_r − f_c)``.
    """
    if features.dim() != 2 or features.shape[0] % 2:
        raise ValueError(f"features must be [2B, D], got shape {tuple(features.shape)}")
    if on == "pair":
        return features
    if on == "diff":
        b = features.shape[0] // 2
        d = features[:b] - features[b:]
        return torch.cat([d, -d], dim=0)
    raise ValueError(f"on must be one of {TARGETS}, got {on!r}")


def dropout_views(features: torch.Tensor, p: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent dropout views ``([N, D], [N, D])`` of ``features [N, D]`` (always in training mode)."""
    return F.dropout(features, p, training=True), F.dropout(features, p, training=True)


def simcse_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.05, symmetric: bool = False) -> torch.Tensor:
    """InfoNCE over in-batch negatives: ``mean_i −log softmax_j(cos(z1_i, z2_j)/τ)[i]``.

    ``z1, z2: [N, D]`` two views, row i of each is the same item. Equivalent PyTorch::

        sim = F.normalize(z1, dim=-1) @ F.normalize(z2, dim=-1).T / τ
        F.cross_entropy(sim, torch.arange(N))
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be [N, D], got {tuple(z1.shape)} and {tuple(z2.shape)}")
    sim = F.normalize(z1.float(), dim=-1) @ F.normalize(z2.float(), dim=-1).T / temperature
    target = torch.arange(z1.shape[0], device=z1.device)
    loss = F.cross_entropy(sim, target)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(sim.T, target))
    return loss


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, n_iters: int = 3) -> torch.Tensor:
    """Balanced soft assignments ``Q [N, K]`` (rows sum to 1) of N items to K prototypes (SwAV's Sinkhorn–Knopp).

    ``P = exp(scores/ε)``, then alternately rescale so every prototype (column) gets total mass N/K and every
    item (row) mass 1; the last rescale is over items, so row sums are exact and column sums approach N/K.
    """
    q = (scores.float() / epsilon).T  # [K, N]
    q = torch.exp(q - q.max())
    q = q / q.sum()
    k, n = q.shape
    for _ in range(n_iters):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / n
    return (q * n).T


def swav_swapped_loss(
    s1: torch.Tensor, s2: torch.Tensor, q1: torch.Tensor, q2: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``−½·mean_i[Σ_k q2_ik·log softmax(s1_i/τ)_k + Σ_k q1_ik·log softmax(s2_i/τ)_k]`` (scores ``[N, K]``)."""
    l1 = -(q2 * F.log_softmax(s1 / temperature, dim=-1)).sum(-1)
    l2 = -(q1 * F.log_softmax(s2 / temperature, dim=-1)).sum(-1)
    return 0.5 * (l1 + l2).mean()


class SwAVLoss(nn.Module):
    """SwAV swapped prediction with K learnable prototypes ``[K, D]`` (L2-normalised on use)."""

    def __init__(
        self,
        dim: int,
        num_prototypes: int = 50,
        temperature: float = 0.1,
        epsilon: float = 0.05,
        sinkhorn_iters: int = 3,
    ) -> None:
        super().__init__()
        self.prototypes = nn.Parameter(torch.randn(num_prototypes, dim) / dim**0.5)
        self.temperature, self.epsilon, self.sinkhorn_iters = temperature, epsilon, sinkhorn_iters

    def scores(self, z: torch.Tensor) -> torch.Tensor:
        """Cosine scores ``[N, K]`` of items ``z [N, D]`` against the prototypes."""
        return F.normalize(z.float(), dim=-1) @ F.normalize(self.prototypes.float(), dim=-1).T

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        s1, s2 = self.scores(z1), self.scores(z2)
        q1 = sinkhorn(s1.detach(), self.epsilon, self.sinkhorn_iters)
        q2 = sinkhorn(s2.detach(), self.epsilon, self.sinkhorn_iters)
        return swav_swapped_loss(s1, s2, q1, q2, self.temperature)


class ContrastiveLoss(nn.Module):
    """``weight · L`` for ``method ∈ {simcse, swav}`` on ``on ∈ {pair, diff}`` of reward features ``[2B, D]``.

    Defaults follow the paper where it fixes them: dropout 0.05; SimCSE weight 1; SwAV K = 50 / weight 0.1 on
    pairs and K = 20 / weight 0.5 on differences. ``weight=None``/``num_prototypes=None``/``temperature=None``
    pick those defaults. SwAV's prototypes are parameters: add ``self.parameters()`` to the optimizer.
    """

    def __init__(
        self,
        dim: int,
        method: str = "simcse",
        on: str = "pair",
        *,
        weight: float | None = None,
        temperature: float | None = None,
        dropout: float = 0.05,
        num_prototypes: int | None = None,
        symmetric: bool = False,
        sinkhorn_epsilon: float = 0.05,
        sinkhorn_iters: int = 3,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if on not in TARGETS:
            raise ValueError(f"on must be one of {TARGETS}, got {on!r}")
        self.method, self.on, self.dropout, self.symmetric = method, on, dropout, symmetric
        if method == "simcse":
            self.weight = 1.0 if weight is None else float(weight)
            self.temperature = 0.05 if temperature is None else float(temperature)
            self.swav = None
        else:
            self.weight = (0.1 if on == "pair" else 0.5) if weight is None else float(weight)
            self.temperature = 0.1 if temperature is None else float(temperature)
            k = (50 if on == "pair" else 20) if num_prototypes is None else int(num_prototypes)
            self.swav = SwAVLoss(dim, k, self.temperature, sinkhorn_epsilon, sinkhorn_iters)

    def forward(self, features: torch.Tensor, views: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Weighted auxiliary loss (scalar). ``features [2B, D]``; or ``views``: two ``[2B, D]`` model passes."""
        v1, v2 = views if views is not None else dropout_views(features, self.dropout)
        z1, z2 = contrast_items(v1, self.on), contrast_items(v2, self.on)
        if self.method == "simcse":
            loss = simcse_loss(z1, z2, self.temperature, self.symmetric)
        else:
            loss = self.swav(z1, z2)
        return self.weight * loss

    def extra_repr(self) -> str:
        return f"method={self.method}, on={self.on}, weight={self.weight}, temperature={self.temperature}"
