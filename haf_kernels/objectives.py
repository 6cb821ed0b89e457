"""Preference objectives as data: every DPO-family policy loss is one small pure function of per-pair quantities,
registered by name with what it needs. ``fused_haf_loss``, the config checks, the training loop, evaluation,
scoring and the experiments all read this registry, so a new objective is one function here plus one test row.

Per-pair quantities (B = pairs):

- ``d [B]``: the log-ratio difference ``(logπ_c − logπref_c) − (logπ_r − logπref_r)`` (``log_ratio``), from
  sequence log-prob sums or per-token means (``sequence_logps``); without a reference, ``logπ_c − logπ_r``.
- the implicit reward margin is ``β·d`` (``implicit_margin``).
- ``ObjectiveParams``: ``beta`` (β), ``label_smoothing`` (ε, the assumed label-flip rate), ``gamma`` (a target
  margin, ``simpo_gamma``).

The Bradley–Terry term on reward-head scores, ``bradley_terry``, is the same family's base case.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ObjectiveParams:
    """Hyper-parameters an objective may read (each declares which in ``Objective.uses``)."""

    beta: float = 0.1
    label_smoothing: float = 0.0
    gamma: float = 0.0


@dataclass(frozen=True)
class Objective:
    """A registered policy loss: ``loss(d, params) -> [B]`` per-pair terms.

    ``reference_free``: refuses reference log-probs (``d`` is ``logπ_c − logπ_r``). ``length_averaged``: ``d``
    comes from per-token means instead of sums. ``uses``: the ``ObjectiveParams`` fields it reads.
    """

    name: str
    loss: Callable[[torch.Tensor, ObjectiveParams], torch.Tensor]
    reference_free: bool = False
    length_averaged: bool = False
    uses: frozenset[str] = frozenset({"beta"})
    summary: str = ""


_REGISTRY: dict[str, Objective] = {}


def register(
    name: str, *, reference_free: bool = False, length_averaged: bool = False, uses: tuple[str, ...] = ("beta",)
) -> Callable:
    """Decorator that registers ``fn(d, params) -> [B]`` as the objective ``name`` (its docstring's first line
    is the summary)."""

    def decorate(fn: Callable[[torch.Tensor, ObjectiveParams], torch.Tensor]) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"objective {name!r} is already registered")
        unknown = set(uses) - set(ObjectiveParams.__dataclass_fields__)
        if unknown:
            raise ValueError(f"objective {name!r} uses unknown parameters {sorted(unknown)}")
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        _REGISTRY[name] = Objective(name, fn, reference_free, length_averaged, frozenset(uses), summary)
        return fn

    return decorate


def names() -> tuple[str, ...]:
    """Registered objective names, in registration order."""
    return tuple(_REGISTRY)


def get(name: str) -> Objective:
    """The objective ``name``; ``ValueError`` listing the registered names otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"policy_loss must be one of {names()}, got {name!r}") from None


# ---------------------------------------------------------------------------------------------- shared arithmetic
def bradley_terry(margin: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair Bradley–Terry loss with label smoothing ε: ``−(1−ε)·logσ(m) − ε·logσ(−m)``."""
    loss = -F.logsigmoid(margin)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-margin)
    return loss


def sequence_logps(sums: torch.Tensor, counts: torch.Tensor, averaged: bool) -> torch.Tensor:
    """Sequence log-probs from token sums and counts: the sums, or per-token means (``averaged``)."""
    return sums / counts.clamp_min(1).to(sums.dtype) if averaged else sums


def log_ratio(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None = None,
    ref_rejected: torch.Tensor | None = None,
) -> torch.Tensor:
    """``d = (logπ_c − logπref_c) − (logπ_r − logπref_r)`` [B] (``logπ_c − logπ_r`` without a reference)."""
    if ref_chosen is not None:
        chosen, rejected = chosen - ref_chosen, rejected - ref_rejected
    return chosen - rejected


def implicit_margin(beta: float, *args: torch.Tensor | None) -> torch.Tensor:
    """The implicit reward margin ``β·d`` (arguments as ``log_ratio``)."""
    return beta * log_ratio(*args)


# ---------------------------------------------------------------------------------------------- the objectives
@register("sigmoid", uses=("beta", "label_smoothing"))
def sigmoid(d: torch.Tensor, p: ObjectiveParams) -> torch.Tensor:
    """DPO: ``−(1−ε)·logσ(βd) − ε·logσ(−βd)`` (conservative DPO with ε > 0)."""
    return bradley_terry(p.beta * d, p.label_smoothing)


@register("hinge")
def hinge(d: torch.Tensor, p: ObjectiveParams) -> torch.Tensor:
    """SLiC-style hinge: ``relu(1 − βd)``."""
    return torch.relu(1.0 - p.beta * d)


@register("ipo")
def ipo(d: torch.Tensor, p: ObjectiveParams) -> torch.Tensor:
    """IPO: ``(d − 1/(2β))²``."""
    return (d - 1.0 / (2.0 * p.beta)) ** 2


@register("simpo", reference_free=True, length_averaged=True, uses=("beta", "label_smoothing", "gamma"))
def simpo(d: torch.Tensor, p: ObjectiveParams) -> torch.Tensor:
    """SimPO: ``−(1−ε)·logσ(βd − γ) − ε·logσ(−(βd − γ))`` on per-token means, reference-free."""
    return bradley_terry(p.beta * d - p.gamma, p.label_smoothing)


@register("rdpo", uses=("beta", "label_smoothing"))
def rdpo(d: torch.Tensor, p: ObjectiveParams) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024): ``((1−ε)·ℓ(βd) − ε·ℓ(−βd)) / (1 − 2ε)``, ``ℓ = −logσ``: unbiased
    under labels flipped with probability ε."""
    eps = p.label_smoothing
    z = p.beta * d
    return ((1.0 - eps) * -F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)
