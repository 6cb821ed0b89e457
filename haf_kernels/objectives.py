"""Preference objectives as data: every DPO-family policy loss is one small pure function of per-pair quantities,
registered by name with what it needs. ``fused_haf_loss``, the config checks, the training loop, evaluation,
scoring and the experiments all read this registry, so a new objective is one function here plus one test row.

Names shared with TRL's ``DPOTrainer`` (``loss_type``, TRL 1.16) mean what TRL means; ``tests/test_objectives_trl.py``
compares each with TRL's own loss code. Per-pair quantities (B = pairs), held in ``PairQuantities``:

- policy and reference sequence log-probs of chosen and rejected responses (sums, or per-token means for a
  length-averaged objective or with ``average_log_prob``) and the token counts;
- the log-ratios ``logπ_c − logπref_c`` and ``logπ_r − logπref_r`` (``chosen_logratios``, ``rejected_logratios``)
  and their difference ``d`` (``log_ratio``); without a reference the reference terms are 0;
- the implicit reward margin is ``β·d`` (``implicit_margin``).
- ``ObjectiveParams``: ``beta`` (β), ``label_smoothing`` (ε), ``gamma`` (SimPO's target margin, ``simpo_gamma``),
  ``discopop_tau`` (τ of DiscoPOP).

``policy_loss`` may name several objectives with weights (TRL's ``loss_type`` list and ``loss_weights``):
``combination`` resolves and checks them. The Bradley–Terry term on reward-head scores, ``bradley_terry``, is the
same family's base case.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ObjectiveParams:
    """Hyper-parameters an objective may read (each declares which in ``Objective.uses``)."""

    beta: float = 0.1
    label_smoothing: float = 0.0
    gamma: float = 0.0
    discopop_tau: float = 0.05


@dataclass(frozen=True)
class PairQuantities:
    """What an objective sees of B pairs (a whole batch, or a chunk of pairs in the fused path); ``[B]`` each.

    ``chosen_logps``/``rejected_logps``: policy sequence log-probs, sums or per-token means (``averaged``);
    ``ref_*``: the reference's, in the same units, or ``None`` (reference-free: taken as 0). ``chosen_tokens``/
    ``rejected_tokens``: response token counts (float). ``mean_chosen_tokens``: 0-d, the mean chosen count over the
    whole batch (the same for every chunk), for token-mean objectives such as ``sft``.
    """

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor | None
    ref_rejected_logps: torch.Tensor | None
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    mean_chosen_tokens: torch.Tensor
    averaged: bool = False

    @classmethod
    def build(
        cls,
        chosen: torch.Tensor,
        rejected: torch.Tensor,
        ref_chosen: torch.Tensor | None = None,
        ref_rejected: torch.Tensor | None = None,
        *,
        chosen_tokens: torch.Tensor | None = None,
        rejected_tokens: torch.Tensor | None = None,
        mean_chosen_tokens: torch.Tensor | None = None,
        averaged: bool = False,
    ) -> PairQuantities:
        """Quantities of one whole batch: counts default to 1 token per response, the batch mean from them."""
        ones = torch.ones_like(chosen)
        ct = ones if chosen_tokens is None else chosen_tokens.to(chosen.dtype)
        rt = ones if rejected_tokens is None else rejected_tokens.to(chosen.dtype)
        mean = ct.mean() if mean_chosen_tokens is None else mean_chosen_tokens
        return cls(chosen, rejected, ref_chosen, ref_rejected, ct, rt, mean, averaged)

    @property
    def chosen_logratios(self) -> torch.Tensor:
        """``logπ_c − logπref_c`` [B] (``logπ_c`` without a reference)."""
        return self.chosen_logps if self.ref_chosen_logps is None else self.chosen_logps - self.ref_chosen_logps

    @property
    def rejected_logratios(self) -> torch.Tensor:
        """``logπ_r − logπref_r`` [B] (``logπ_r`` without a reference)."""
        return self.rejected_logps if self.ref_rejected_logps is None else self.rejected_logps - self.ref_rejected_logps

    @property
    def d(self) -> torch.Tensor:
        """``d = (logπ_c − logπref_c) − (logπ_r − logπref_r)`` [B], as ``log_ratio``."""
        return log_ratio(self.chosen_logps, self.rejected_logps, self.ref_chosen_logps, self.ref_rejected_logps)


@dataclass(frozen=True)
class Objective:
    """A registered policy loss: ``loss(q: PairQuantities, params) -> [B]`` per-pair terms.

    Declared needs: ``reference_free``: refuses reference log-probs. ``length_averaged``: sees per-token means of
    policy and reference log-probs (always, not only with ``average_log_prob``). ``batch_coupled``: a pair's term
    depends on other pairs (``aot`` sorts across the batch), so it needs the whole batch at once and cannot take
    ``pair_weights``. ``needs_label_smoothing``: ε must be > 0. ``uses``: the ``ObjectiveParams`` fields it reads.
    ``needs``: the parts of ``PairQuantities`` it reads (``d``; ``logratios``: chosen and rejected separately;
    ``logps``: the policy's own log-probs; ``tokens``: counts). ``trl``: a TRL trainer has this name with this
    meaning (``DPOTrainer``'s ``loss_type``; ``CPOTrainer``'s for ``simpo``).
    """

    name: str
    loss: Callable[[PairQuantities, ObjectiveParams], torch.Tensor]
    reference_free: bool = False
    length_averaged: bool = False
    batch_coupled: bool = False
    needs_label_smoothing: bool = False
    uses: frozenset[str] = frozenset({"beta"})
    needs: frozenset[str] = frozenset({"d"})
    summary: str = ""
    trl: bool = True


_REGISTRY: dict[str, Objective] = {}
_ALIASES: dict[str, str] = {}
_NEEDS = frozenset({"d", "logratios", "logps", "tokens"})


def register(
    name: str,
    *,
    reference_free: bool = False,
    length_averaged: bool = False,
    batch_coupled: bool = False,
    needs_label_smoothing: bool = False,
    uses: tuple[str, ...] = ("beta",),
    needs: tuple[str, ...] = ("d",),
    trl: bool = True,
    aliases: tuple[str, ...] = (),
) -> Callable:
    """Decorator that registers ``fn(q: PairQuantities, params) -> [B]`` as the objective ``name`` (its docstring's
    first line is the summary); ``aliases`` are other names ``get`` accepts for it."""

    def decorate(fn: Callable[[PairQuantities, ObjectiveParams], torch.Tensor]) -> Callable:
        for n in (name, *aliases):
            if n in _REGISTRY or n in _ALIASES:
                raise ValueError(f"objective {n!r} is already registered")
        unknown = set(uses) - set(ObjectiveParams.__dataclass_fields__)
        if unknown:
            raise ValueError(f"objective {name!r} uses unknown parameters {sorted(unknown)}")
        if set(needs) - _NEEDS:
            raise ValueError(f"objective {name!r} needs unknown quantities {sorted(set(needs) - _NEEDS)}")
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        _REGISTRY[name] = Objective(
            name,
            fn,
            reference_free,
            length_averaged,
            batch_coupled,
            needs_label_smoothing,
            frozenset(uses),
            frozenset(needs),
            summary,
            trl,
        )
        _ALIASES.update({a: name for a in aliases})
        return fn

    return decorate


def names() -> tuple[str, ...]:
    """Registered objective names, in registration order (aliases such as ``rdpo`` not included)."""
    return tuple(_REGISTRY)


def aliases() -> dict[str, str]:
    """Alias → registered name (``rdpo`` → ``robust``)."""
    return dict(_ALIASES)


def get(name: str) -> Objective:
    """The objective ``name`` (or an alias of it); ``ValueError`` listing the registered names otherwise."""
    try:
        return _REGISTRY[_ALIASES.get(name, name)]
    except (KeyError, TypeError):
        raise ValueError(f"policy_loss must be one of {names()}, got {name!r}") from None


def split_names(policy_loss: str | Sequence[str]) -> list[str]:
    """The names of ``policy_loss``: one name, a comma-separated string, or a list/tuple of names."""
    if isinstance(policy_loss, str):
        parts = [p.strip() for p in policy_loss.split(",")]
    elif isinstance(policy_loss, (list, tuple)) and all(isinstance(p, str) for p in policy_loss):
        parts = [p.strip() for p in policy_loss]
    else:
        raise TypeError(f"policy_loss must be a name, a comma-separated string or a list of names, got {policy_loss!r}")
    if not parts or any(not p for p in parts):
        raise ValueError(f"policy_loss must name at least one objective, with no empty names, got {policy_loss!r}")
    return parts


def combination(
    policy_loss: str | Sequence[str], weights: Sequence[float] | None = None
) -> tuple[tuple[Objective, float], ...]:
    """``(objective, weight)`` pairs of ``policy_loss`` (TRL's ``loss_type`` list) and ``weights`` (its
    ``loss_weights``; ``None``: 1 each). The policy loss is ``Σₖ weightₖ · mean(objectiveₖ)``.

    ``ValueError`` for an unknown name (listing the registered ones), a weight count that differs from the name
    count, a negative or non-finite weight, or weights that are all 0.
    """
    parts = split_names(policy_loss)
    unknown = [p for p in parts if p not in _REGISTRY and p not in _ALIASES]
    if unknown and len(parts) == 1:
        get(parts[0])  # the single-name message
    if unknown:
        raise ValueError(f"policy_loss must name registered objectives {names()}, got unknown {unknown} in {parts}")
    if weights is None:
        ws = [1.0] * len(parts)
    else:
        if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
            raise TypeError(f"policy_loss_weights must be a list of numbers, got {weights!r}")
        if len(weights) != len(parts):
            raise ValueError(
                f"policy_loss_weights must have one weight per objective of policy_loss: got {len(weights)} weights "
                f"for {len(parts)} objectives {parts}"
            )
        ws = []
        for w in weights:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ValueError(f"policy_loss_weights must be finite numbers >= 0, got {list(weights)!r}")
            ws.append(float(w))
        if not any(ws):
            raise ValueError(
                f"policy_loss_weights are all 0, got {list(weights)!r}: the policy term would be 0 (alpha=0 does that)"
            )
    return tuple((get(p), w) for p, w in zip(parts, ws))


def uses_means(policy_loss: str | Sequence[str], average_log_prob: bool = False) -> bool:
    """Whether the loss works on per-token means: ``average_log_prob`` or any length-averaged objective named. Then
    ``ref_logps`` are means too (``sequence_logps``), and so are the reported log-probs and implicit margins."""
    return bool(average_log_prob) or any(o.length_averaged for o, _ in combination(policy_loss))


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
# In the formulas: z = βd, c = chosen log-ratio, r = rejected log-ratio, σ the logistic function, ε label_smoothing.
@register("sigmoid", uses=("beta", "label_smoothing"))
def sigmoid(q: PairQuantities, p: ObjectiveParams) -> torch.Tensor:
    """DPO: ``−logσ(z)``; with ε > 0 conservative DPO ``−(1−ε)·logσ(z) − ε·logσ(−z)`` (TRL 1.16 ignores ε here)."""
    return bradley_terry(p.beta * q.d, p.label_smoothing)


@register("hinge")
def hinge(q: PairQuantities, p: ObjectiveParams) -> torch.Tensor:
    """SLiC hinge: ``relu(1 − z)``."""
    return torch.relu(1.0 - p.beta * q.d)


@register("ipo", length_averaged=True)
def ipo(q: PairQuantities, p: ObjectiveParams) -> torch.Tensor:
    """IPO: ``(d − 1/(2β))²`` on per-token means of the log-ratios (TRL; the IPO authors' normalisation)."""
    return (q.d - 1.0 / (2.0 * p.beta)) ** 2


@register("exo_pair", needs_label_smoothing=True, uses=("beta", "label_smoothing"))
def exo_pair(q: PairQuantities, p: ObjectiveParams) -> torch.Tensor:
    """EXO-pref: ``KL([σ(z), σ(−z)] ‖ [1−ε, ε])``; needs ε > 0 (the paper suggests 1e-3)."""
    z = p.beta * q.d
    eps = p.label_smoothing
    return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )


@register("nca_pair", needs=("logratios",))
def nca_pair(q: PairQuantities, p: ObjectiveParams) -> torch.Tensor:
    """NCA: ``−logσ(βc) − ½·logσ(−βc) − ½·logσ(−βr)``."""
    bc, br = p.beta * q.chosen_logratios, p.beta * q.rejected_logratios
    return -F.logsigmoid(bc) - 0.5 * F.logsigmoid(-bc) - 0.5 * F.logsigmoid(-br)


@register("robust", uses=("beta", "label_smoothing"), aliases=("rdpo",))
def robust(q: PairQuantities, p: ObjectiveParams) -> torch.Tensor:
    """Robust DPO (rDPO): ``((1−ε)·ℓ(z) − ε·ℓ(−z)) / (1 − 2ε)``, ``ℓ = −logσ``: unbiased under labels flipped
    with probability ε."""
    eps = p.label_smoothing
    z = p.beta * q.d
    return ((1.0 - eps) * -F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


@register("bco_pair", needs=("logratios",))
def bco_pair(q: PairQuantities, p: ObjectiveParams) -> torch.Tensor:
    """BCO on pairs: ``−logσ(βc) − logσ(−βr)`` (as TRL 1.16: no running reward mean)."""
    return -F.logsigmoid(p.beta * q.chosen_logratios) - F.logsigmoid(-p.beta * q.rejected_logratios)


@register("sppo_hard", needs=("logratios",))
def sppo_hard(q: PairQuantities, p: ObjectiveParams) -> torch.Tensor:
    """SPPO with hard labels: ``(c − 1/(2β))² + (r + 1/(2β))²``."""
    half = 0.5 / p.beta
    return (q.chosen_logratios - half) ** 2 + (q.rejected_logratios + half) ** 2


@register("aot", batch_coupled=True, uses=("beta", "label_smoothing"), needs=("logps",))
def aot(q: PairQuantities, p: ObjectiveParams) -> torch.Tensor:
    """AOT: sigmoid (with ε) on ``β·(sort(logπ_c − logπ_r) − sort(logπref_c − logπref_r))`` over the batch."""
    policy = torch.sort(q.chosen_logps - q.rejected_logps).values
    ref = 0.0
    if q.ref_chosen_logps is not None:
        ref = torch.sort(q.ref_chosen_logps - q.ref_rejected_logps).values
    return bradley_terry(p.beta * (policy - ref), p.label_smoothing)


@register("aot_unpaired", batch_coupled=True, uses=("beta", "label_smoothing"), needs=("logratios",))
def aot_unpaired(q: PairQuantities, p: ObjectiveParams) -> torch.Tensor:
    """AOT unpaired: sigmoid (with ε) on ``β·(sort(c) − sort(r))`` over the batch."""
    delta = torch.sort(q.chosen_logratios).values - torch.sort(q.rejected_logratios).values
    return bradley_terry(p.beta * delta, p.label_smoothing)


@register("apo_zero", needs=("logratios",))
def apo_zero(q: PairQuantities, p: ObjectiveParams) -> torch.Tensor:
    """APO-zero: ``1 − σ(βc) + σ(βr)`` (chosen better than the model's own outputs)."""
    return 1.0 - torch.sigmoid(p.beta * q.chosen_logratios) + torch.sigmoid(p.beta * q.rejected_logratios)


@register("apo_down", needs=("logratios",))
def apo_down(q: PairQuantities, p: ObjectiveParams) -> torch.Tensor:
    """APO-down: ``σ(βc) + 1 − σ(z)`` (chosen worse than the model's own outputs)."""
    return torch.sigmoid(p.beta * q.chosen_logratios) + 1.0 - torch.sigmoid(p.beta * q.d)


@register("discopop", uses=("beta", "discopop_tau"))
def discopop(q: PairQuantities, p: ObjectiveParams) -> torch.Tensor:
    """DiscoPOP: ``−logσ(z)·(1 − σ(z/τ)) + exp(−z)·σ(z/τ)``, τ = ``discopop_tau``."""
    z = p.beta * q.d
    # exp(−z)·σ(z/τ) as one exponent: finite where exp(−z) alone overflows and σ(z/τ) is 0
    return -F.logsigmoid(z) * torch.sigmoid(-z / p.discopop_tau) + torch.exp(F.logsigmoid(z / p.discopop_tau) - z)


@register("sft", uses=(), needs=("logps", "tokens"))
def sft(q: PairQuantities, p: ObjectiveParams) -> torch.Tensor:
    """SFT on the chosen responses: their token-mean NLL over the batch (``−logπ_c / mean chosen tokens``)."""
    sums = q.chosen_logps * q.chosen_tokens.clamp_min(1) if q.averaged else q.chosen_logps
    return -sums / q.mean_chosen_tokens.clamp_min(1)


@register("sigmoid_norm", length_averaged=True, uses=("beta", "label_smoothing"))
def sigmoid_norm(q: PairQuantities, p: ObjectiveParams) -> torch.Tensor:
    """DPO on per-token means of the log-ratios: ``−logσ(z)`` (ε as ``sigmoid``)."""
    return bradley_terry(p.beta * q.d, p.label_smoothing)


@register("simpo", reference_free=True, length_averaged=True, uses=("beta", "label_smoothing", "gamma"))
def simpo(q: PairQuantities, p: ObjectiveParams) -> torch.Tensor:
    """SimPO: ``−(1−ε)·logσ(z − γ) − ε·logσ(−(z − γ))`` on per-token means, reference-free (TRL's CPO trainer)."""
    return bradley_terry(p.beta * q.d - p.gamma, p.label_smoothing)
