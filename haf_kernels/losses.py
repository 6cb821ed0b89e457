"""HaF-RM loss: Bradley–Terry on reward-head scores plus a DPO-family loss on fused token log-probs.

``loss = reward_weight · BT(r_c − r_r − margin) + alpha · policy(β · d)``, with
``d = (logπ_c − logπref_c) − (logπ_r − logπref_r)``. Everything O(B) here is plain PyTorch; the O(N·V)
part (token log-probs) goes through ``logprobs.py`` and never materialises full-vocab logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from . import backends, memory, objectives
from .logprobs import FusedPairLossFunction, pair_chunks, token_logprobs
from .options import LogprobOptions, compute_dtype
from .validate import check_finite as check_finite_inputs
from .validate import check_haf_args
from .vocab_parallel import ShardedBackend, VocabParallel, as_vocab_parallel, checked, group_min


@dataclass
class HafLossOutput:
    """Result of ``fused_haf_loss``. Shapes: scalars unless noted; B = number of pairs.

    ``reward_loss``, ``reward_margin`` and ``reward_accuracy`` are ``None`` when ``rewards`` is ``None``.
    ``reward_margin`` [B] here is the reward-head gap ``r_c − r_r`` (the counterpart of ``implicit_margin``), not
    the ``reward_margin`` argument of ``fused_haf_loss`` (the BT target margin it subtracts).
    ``chosen_logps``/``rejected_logps`` [B] are sequence sums (means with ``average_log_prob`` or a
    length-averaged objective: ``ipo``, ``sigmoid_norm``, ``simpo``); ``implicit_margin`` [B] is ``β·d`` in the
    same units; ``policy_loss`` is the weighted sum of the objectives' means. When gradients were finished inside
    the forward (the default while training) the log-probs and implicit margins are detached.
    """

    loss: torch.Tensor
    reward_loss: torch.Tensor | None
    policy_loss: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    reward_margin: torch.Tensor | None
    implicit_margin: torch.Tensor
    reward_accuracy: torch.Tensor | None
    implicit_accuracy: torch.Tensor
    center_loss: torch.Tensor | None = None  # mean((r_c + r_r)²) when center_rewards_coefficient > 0


def fused_haf_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    rewards: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    alpha: float = 0.2,
    reward_weight: float = 1.0,
    policy_loss: str | Sequence[str] = "sigmoid",
    policy_loss_weights: Sequence[float] | None = None,
    simpo_gamma: float = 0.0,
    discopop_tau: float = 0.05,
    average_log_prob: bool = False,
    reward_margin: torch.Tensor | float | None = None,
    label_smoothing: float = 0.0,
    pair_weights: torch.Tensor | None = None,
    center_rewards_coefficient: float = 0.0,
    lm_head_bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
    grad_in_forward: bool | None = None,
    check_finite: bool = False,
    vocab_parallel: VocabParallel | object | None = None,
) -> HafLossOutput:
    """HaF-RM hybrid loss of a concatenated chosen/rejected batch, without full-vocab logits.

    Args:
        hidden: ``[2B, T, D]`` final hidden states; rows ``0..B-1`` chosen, ``B..2B-1`` rejected.
        lm_head_weight: ``[V, D]`` LM head (the policy layer), same dtype as ``hidden``.
        labels: ``[2B, T]`` int64 next-token targets aligned with ``hidden``; ``ignore_index`` on
            prompt and padding.
        rewards: ``[2B]`` reward-head scores; ``None`` drops the BT term (plain DPO family).
        ref_logps: ``[2B]`` reference sequence log-probs; ``None`` is reference-free. Per-token means when the loss
            works on means (``average_log_prob``, or a length-averaged objective in ``policy_loss``:
            ``objectives.uses_means``), sums otherwise.
        beta, alpha, reward_weight: ``loss = reward_weight·BT + alpha·policy`` (HaF: 0.1, 0.2, 1).
        policy_loss: a registered objective (``haf_kernels.objectives.names()``; TRL's ``loss_type`` names and
            meanings: ``"sigmoid"`` (DPO), ``"hinge"``, ``"ipo"`` (on per-token means), ``"robust"`` (alias
            ``"rdpo"``), ``"exo_pair"``, ``"nca_pair"``, ``"bco_pair"``, ``"sppo_hard"``, ``"aot"``,
            ``"aot_unpaired"``, ``"apo_zero"``, ``"apo_down"``, ``"discopop"``, ``"sft"``, ``"sigmoid_norm"``, and
            ``"simpo"`` (length-averaged, reference-free)), or several as a list / comma-separated string.
        policy_loss_weights: one weight ≥ 0 per objective of ``policy_loss`` (TRL's ``loss_weights``); the policy
            term is ``Σₖ weightₖ · objectiveₖ``. ``None``: 1 each.
        simpo_gamma: SimPO target margin γ. discopop_tau: DiscoPOP's τ (TRL's default 0.05).
        average_log_prob: use per-token means instead of sums for every objective.
        reward_margin: ``[B]`` or scalar margin subtracted inside the BT term (adaptive margin).
        label_smoothing: ε in ``[0, 0.5)``: one value for the BT term and every objective that reads it (sigmoid,
            sigmoid_norm, simpo, robust, exo_pair (needs ε > 0), aot, aot_unpaired).
        pair_weights: ``[B]`` non-negative weights; each term is ``Σ wᵢ·lossᵢ / Σ wᵢ`` (0 if all are 0). Refused
            with a batch-coupled objective (``aot``, ``aot_unpaired``: sorting detaches terms from pairs).
        center_rewards_coefficient: c ≥ 0 adds reward centering ``c · Σ wᵢ·(r_cᵢ + r_rᵢ)² / Σ wᵢ`` (TRL's
            ``center_rewards_coefficient``; Eisenstein et al. 2023): keeps rewards near zero mean, which the BT
            term alone leaves free. Needs ``rewards``.
        lm_head_bias, logit_scale, softcap, ignore_index, backend: as in ``linear_logprobs``.
        grad_in_forward: finish the policy gradients inside the forward (3 GEMMs instead of 4; log-prob
            outputs detached). ``None``: on when gradients are needed, the backend keeps logits natively
            (``triton``, ``torch``, ``cpp``) and one pair's kept logits (non-ignored tokens × V) fit the keep budget
            (``HAF_KEEP_CHUNK_MB``; unset: 1/8 of free CUDA memory, 512 MiB to 4 GiB, 64 MiB off CUDA — see
            ``haf_kernels.memory``); ``HAF_GRAD_IN_FORWARD=0`` turns the default off. A batch-coupled objective
            (``aot``, ``aot_unpaired``) needs the whole batch in one chunk: ``None`` then recomputes in backward
            when the batch does not fit the keep budget, and ``True`` raises ``ValueError`` there.
        check_finite: raise ``NonFiniteInputError`` (a ``ValueError`` naming the argument) when ``hidden``,
            ``lm_head_weight``, ``lm_head_bias``, ``rewards``, ``ref_logps`` or ``reward_margin`` holds NaN/Inf
            (``hidden``: at non-ignored tokens only), instead of returning a NaN loss. One extra read of the
            inputs and one host sync; off by default (the training loop turns it on for its first steps).
        vocab_parallel: ``lm_head_weight`` (and ``lm_head_bias``) is this rank's vocab shard of a tensor-parallel LM
            head, as in ``linear_logprobs`` (a ``ProcessGroup`` or a ``haf_kernels.vocab_parallel.VocabParallel``).
            Every rank passes the same other arguments and gets the same loss; the 3-GEMM path runs sharded too.

    Plain PyTorch equivalent (materialising logits)::

        logp = (hidden @ W.T).float().log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
        seq = (logp * (labels != ignore_index)).sum(-1)
        d = (seq[:B] - ref[:B]) - (seq[B:] - ref[B:])
        loss = reward_weight * -logsigmoid(r[:B] - r[B:] - margin).mean() + alpha * -logsigmoid(beta * d).mean()
    """
    vp = as_vocab_parallel(vocab_parallel)
    n_pairs, shard = checked(
        vp,
        check_haf_args,
        hidden,
        lm_head_weight,
        labels,
        rewards,
        ref_logps,
        beta=beta,
        alpha=alpha,
        reward_weight=reward_weight,
        policy_loss=policy_loss,
        policy_loss_weights=policy_loss_weights,
        simpo_gamma=simpo_gamma,
        discopop_tau=discopop_tau,
        reward_margin=reward_margin,
        label_smoothing=label_smoothing,
        pair_weights=pair_weights,
        center_rewards_coefficient=center_rewards_coefficient,
        bias=lm_head_bias,
        logit_scale=logit_scale,
        softcap=softcap,
        ignore_index=ignore_index,
        vocab_shard=vp is not None,
    )
    if rewards is None and alpha == 0:
        raise ValueError("alpha must be > 0 when rewards is None (otherwise the loss has no term)")
    if check_finite:
        check_finite_inputs(
            hidden=(hidden, labels != ignore_index),
            lm_head_weight=lm_head_weight,
            lm_head_bias=lm_head_bias,
            rewards=rewards,
            ref_logps=ref_logps,
            reward_margin=float(reward_margin) if isinstance(reward_margin, (int, float)) else reward_margin,
        )
    dev = hidden.device
    dt = torch.float64  # the O(B) arithmetic: cheap, and d = (sum_c − sum_r) needs the precision
    two_b, seq_len, dim = hidden.shape
    opts = LogprobOptions(ignore_index, float(logit_scale), None if softcap is None else float(softcap))
    name = backends.resolve(backend, dev, hidden.dtype)
    kernel = name if shard is None else ShardedBackend(name, shard)  # vocab-parallel: the backend over the shard
    plan = objectives.combination(policy_loss, policy_loss_weights)
    params = objectives.ObjectiveParams(beta, label_smoothing, simpo_gamma, discopop_tau)
    averaged = average_log_prob or any(o.length_averaged for o, _ in plan)  # units of ref_logps and the outputs
    coupled = [o.name for o, _ in plan if o.batch_coupled]

    weights = torch.ones(n_pairs, dtype=dt, device=dev) if pair_weights is None else pair_weights.to(dt)
    norm_weights = weights / weights.sum().clamp_min(torch.finfo(dt).tiny)
    counts = (labels != ignore_index).sum(dim=1).to(dt)
    clamped = counts.clamp_min(1.0)
    denom = clamped if averaged else torch.ones_like(counts)
    mean_chosen_tokens = counts[:n_pairs].mean()  # the whole batch's, for every chunk (sft)

    def log_ratio(seq: torch.Tensor, ref: torch.Tensor | None, k: int) -> torch.Tensor:
        """``d`` for k pairs from sequence log-probs [2k] (already averaged if asked)."""
        return objectives.log_ratio(seq[:k], seq[k:], *((None, None) if ref is None else (ref[:k], ref[k:])))

    def quantities(
        seq_sums: torch.Tensor, ref: torch.Tensor | None, rows: torch.Tensor, means: bool
    ) -> objectives.PairQuantities:
        """The pairs of ``rows`` [2k] in sums or means; ``ref`` [2k] arrives in the units of ``averaged``."""
        k = rows.shape[0] // 2
        n = clamped[rows]
        seq = seq_sums / n if means else seq_sums
        if ref is not None and means != averaged:
            ref = ref / n if means else ref * n
        c = counts[rows]
        rc, rr = (None, None) if ref is None else (ref[:k], ref[k:])
        return objectives.PairQuantities(seq[:k], seq[k:], rc, rr, c[:k], c[k:], mean_chosen_tokens, means)

    def weighted_policy(seq_sums: torch.Tensor, ref: torch.Tensor | None, pair_idx: torch.Tensor) -> torch.Tensor:
        rows = torch.cat([pair_idx, pair_idx + n_pairs])
        views: dict[bool, objectives.PairQuantities] = {}
        # ref[:0].sum(): 0 that keeps ref in the graph when no objective reads it (sft alone): its gradient is 0
        total = torch.zeros((), dtype=dt, device=dev) if ref is None else ref[:0].sum().to(dt)
        for objective, weight in plan:
            if weight == 0:
                continue
            means = average_log_prob or objective.length_averaged
            if means not in views:
                views[means] = quantities(seq_sums, ref, rows, means)
            terms = objective.loss(views[means], params)
            total = total + weight * (terms * norm_weights[pair_idx]).sum()
        return total

    ref = None if ref_logps is None else ref_logps.to(dt)
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, lm_head_weight, lm_head_bias, ref_logps)
    )
    use_fused = need_grad and alpha > 0 and name != "reference"
    if grad_in_forward is None:
        # Default only where the backend keeps logits natively (3 GEMMs); otherwise one big recompute pass
        # over all tokens keeps the device fuller than many pair-sized chunks.
        keeps = backends.capabilities(name).keeps_logits
        use_fused = use_fused and keeps and opts.tuning.grad_in_forward
    else:
        use_fused = use_fused and grad_in_forward
    chunks = None
    if use_fused:
        vocab_rows = lm_head_weight.shape[0] if shard is None else shard.max_rows  # one chunking on every rank
        free = None if opts.tuning.keep_chunk_mb is not None else memory.free_device_bytes(dev)
        if free is not None and shard is not None:
            free = group_min(free, shard, dev)
        logit_bytes = backends.capabilities(name).kept_logit_bytes(hidden.dtype)
        chunks = pair_chunks(labels, vocab_rows, ignore_index, opts.tuning, logit_bytes=logit_bytes, free_bytes=free)
    if chunks is None and grad_in_forward is None:
        use_fused = False  # a single pair's logits exceed the budget: recompute in backward instead
    elif chunks is None:
        chunks = [(p, p + 1) for p in range(n_pairs)]  # forced on: one pair at a time, over budget
    if use_fused and coupled and len(chunks) > 1:
        # A batch-coupled objective (it sorts over all pairs) has no per-chunk gradient: one chunk or none.
        if grad_in_forward is None:
            use_fused = False  # the batch's kept logits exceed the budget: recompute in backward instead
        else:
            raise ValueError(
                f"policy_loss {coupled} couples pairs across the batch (it sorts over all pairs), so its gradients "
                f"cannot be finished per chunk of pairs, and grad_in_forward=True needs the whole batch in one chunk: "
                f"the keep budget (HAF_KEEP_CHUNK_MB={opts.tuning.keep_chunk_mb}) splits these {n_pairs} pairs into "
                f"{len(chunks)} chunks. Raise HAF_KEEP_CHUNK_MB, or pass grad_in_forward=None or False (recompute in "
                "backward)"
            )

    if use_fused:
        policy, seq_sums = FusedPairLossFunction.apply(
            hidden, lm_head_weight, lm_head_bias, ref, labels, weighted_policy, opts, kernel, chunks
        )
        seq_sums = seq_sums.to(dt)
    else:
        ctx = torch.enable_grad() if alpha > 0 else torch.no_grad()
        with ctx:
            # check_haf_args already validated these (labels included): no second check or device sync
            tok = token_logprobs(
                hidden.reshape(two_b * seq_len, dim),
                lm_head_weight,
                labels.reshape(two_b * seq_len),
                lm_head_bias,
                opts,
                kernel,
            )
            seq_sums = tok.view(two_b, seq_len).to(dt).sum(dim=1)
            policy = weighted_policy(seq_sums, ref, torch.arange(n_pairs, device=dev))

    seq_logps = seq_sums / denom
    d = log_ratio(seq_logps, ref, n_pairs)
    implicit_margin = beta * d
    loss = alpha * policy

    reward_loss = reward_diff = reward_acc = center_loss = None
    if rewards is not None:
        r = rewards.to(dt)
        reward_diff = r[:n_pairs] - r[n_pairs:]
        m = reward_diff
        if reward_margin is not None:
            m = m - (reward_margin.to(dt) if isinstance(reward_margin, torch.Tensor) else float(reward_margin))
        reward_loss = (objectives.bradley_terry(m, label_smoothing) * norm_weights).sum()
        loss = loss + reward_weight * reward_loss
        reward_acc = (reward_diff > 0).to(dt).mean()
        if center_rewards_coefficient > 0:
            center_loss = ((r[:n_pairs] + r[n_pairs:]) ** 2 * norm_weights).sum()
            loss = loss + center_rewards_coefficient * center_loss

    out_dt = compute_dtype(hidden.dtype)
    cast = lambda x: None if x is None else x.to(out_dt)  # noqa: E731
    return HafLossOutput(
        loss=cast(loss),
        reward_loss=cast(reward_loss),
        policy_loss=cast(policy),
        chosen_logps=cast(seq_logps[:n_pairs]),
        rejected_logps=cast(seq_logps[n_pairs:]),
        reward_margin=cast(reward_diff),
        implicit_margin=cast(implicit_margin),
        reward_accuracy=cast(reward_acc),
        implicit_accuracy=cast((d > 0).to(dt).mean()),
        center_loss=cast(center_loss),
    )


class HafLoss(nn.Module):
    """``nn.Module`` form of ``fused_haf_loss`` with the hyper-parameters stored at construction."""

    def __init__(
        self,
        *,
        beta: float = 0.1,
        alpha: float = 0.2,
        reward_weight: float = 1.0,
        policy_loss: str | Sequence[str] = "sigmoid",
        policy_loss_weights: Sequence[float] | None = None,
        simpo_gamma: float = 0.0,
        discopop_tau: float = 0.05,
        average_log_prob: bool = False,
        label_smoothing: float = 0.0,
        center_rewards_coefficient: float = 0.0,
        logit_scale: float = 1.0,
        softcap: float | None = None,
        ignore_index: int = -100,
        backend: str = "auto",
        grad_in_forward: bool | None = None,
        check_finite: bool = False,
        vocab_parallel: VocabParallel | object | None = None,
    ) -> None:
        super().__init__()
        self.kwargs = dict(
            beta=beta,
            alpha=alpha,
            reward_weight=reward_weight,
            policy_loss=policy_loss,
            policy_loss_weights=policy_loss_weights,
            simpo_gamma=simpo_gamma,
            discopop_tau=discopop_tau,
            average_log_prob=average_log_prob,
            label_smoothing=label_smoothing,
            center_rewards_coefficient=center_rewards_coefficient,
            logit_scale=logit_scale,
            softcap=softcap,
            ignore_index=ignore_index,
            backend=backend,
            grad_in_forward=grad_in_forward,
            check_finite=check_finite,
            vocab_parallel=vocab_parallel,
        )

    def forward(
        self,
        hidden: torch.Tensor,
        lm_head_weight: torch.Tensor,
        labels: torch.Tensor,
        rewards: torch.Tensor | None = None,
        ref_logps: torch.Tensor | None = None,
        *,
        reward_margin: torch.Tensor | float | None = None,
        pair_weights: torch.Tensor | None = None,
        lm_head_bias: torch.Tensor | None = None,
    ) -> HafLossOutput:
        return fused_haf_loss(
            hidden,
            lm_head_weight,
            labels,
            rewards,
            ref_logps,
            reward_margin=reward_margin,
            pair_weights=pair_weights,
            lm_head_bias=lm_head_bias,
            **self.kwargs,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
