"""Argument checks shared by every backend: shapes, dtypes, devices, label range.

Every failure raises ``ValueError`` / ``TypeError`` naming the argument, what was expected and what was
received, so bad input never reaches a kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from . import objectives

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
T = TypeVar("T")


class NonFiniteInputError(ValueError):
    """A ``check_finite=True`` call met NaN/Inf in an input; the message names the argument(s)."""


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got dtype {t.dtype}")


def check_same_device(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; move them to one device")


def check_labels(name: str, labels: torch.Tensor, vocab: int | None, ignore_index: int) -> None:
    """``labels`` must be integer, each in ``[0, vocab)`` or equal to ``ignore_index``.

    ``vocab=None`` checks the dtype only (a vocab-parallel call checks the range against the global vocab size in
    ``check_vocab_shard``, once the ranks have agreed on it).
    """
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"{name} must be an integer tensor (int64/int32), got dtype {labels.dtype}")
    if labels.numel() == 0 or vocab is None:
        return
    valid = labels != ignore_index
    if bool(valid.any()):
        vals = labels[valid]
        lo, hi = int(vals.min()), int(vals.max())
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"{name} must be in [0, {vocab}) (the vocab size of weight) or equal ignore_index={ignore_index}; "
                f"found {bad}"
            )


def check_logprob_args(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    logit_scale: float,
    softcap: float | None,
    *,
    hidden_name: str = "hidden",
    labels_name: str = "labels",
    vocab_shard: bool = False,
) -> None:
    """Checks for ``linear_logprobs``: hidden [N, D], weight [V, D], labels [N], bias [V].

    ``vocab_shard``: ``weight`` is one rank's rows of a vocab-parallel LM head, which may be empty (``V = 0``).
    """
    check_tensor(hidden_name, hidden)
    check_tensor("weight", weight)
    check_tensor(labels_name, labels)
    check_float(hidden_name, hidden)
    check_float("weight", weight)
    if hidden.dim() != 2:
        raise ValueError(f"{hidden_name} must be [N, D], got shape {_shape(hidden)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, D], got shape {_shape(weight)}")
    if weight.shape[0] < 1 and not vocab_shard:
        raise ValueError(f"weight must have at least one row (vocab V >= 1), got shape {_shape(weight)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{hidden_name} [N, D] and weight [V, D] must share D: got {_shape(hidden)} and {_shape(weight)}"
        )
    if labels.dim() != 1 or labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"{labels_name} must be [N] = [{hidden.shape[0]}], got shape {_shape(labels)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{hidden_name} and weight must have one dtype, got {hidden.dtype} and {weight.dtype}")
    if bias is not None:
        check_tensor("bias", bias)
        check_float("bias", bias)
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got shape {_shape(bias)}")
    check_same_device(hidden_name, hidden, weight=weight, **{labels_name: labels}, bias=bias)
    if not isinstance(logit_scale, (int, float)) or not math.isfinite(logit_scale) or logit_scale == 0:
        raise ValueError(f"logit_scale must be a finite non-zero number, got {logit_scale!r}")
    if softcap is not None and (not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or softcap <= 0):
        raise ValueError(f"softcap must be None or a positive finite number, got {softcap!r}")


def check_haf_args(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    rewards: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    *,
    beta: float,
    alpha: float,
    reward_weight: float,
    policy_loss: str | Sequence[str],
    simpo_gamma: float,
    reward_margin: torch.Tensor | float | None,
    label_smoothing: float,
    pair_weights: torch.Tensor | None,
    center_rewards_coefficient: float = 0.0,
    policy_loss_weights: Sequence[float] | None = None,
    discopop_tau: float = 0.05,
    bias: torch.Tensor | None,
    logit_scale: float,
    softcap: float | None,
    ignore_index: int,
    vocab_shard: bool = False,
) -> int:
    """Checks for ``fused_haf_loss``; returns the number of pairs B.

    ``vocab_shard``: ``weight`` is one rank's rows of a vocab-parallel LM head (may be empty); the labels' range is
    then checked against the global vocab size by ``check_vocab_shard``.
    """
    check_tensor("hidden", hidden)
    check_tensor("labels", labels)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [2B, T, D] (chosen rows then rejected rows), got shape {_shape(hidden)}")
    if hidden.shape[0] == 0 or hidden.shape[0] % 2 != 0:
        raise ValueError(
            f"hidden must have an even, non-zero number of rows 2B (B chosen then B rejected), got {hidden.shape[0]}"
        )
    if labels.dim() != 2 or tuple(labels.shape) != tuple(hidden.shape[:2]):
        raise ValueError(
            f"labels must be [2B, T] = [{hidden.shape[0]}, {hidden.shape[1]}] like hidden, got shape {_shape(labels)}"
        )
    check_logprob_args(
        hidden.reshape(-1, hidden.shape[-1]) if hidden.numel() else hidden.new_empty(0, hidden.shape[-1]),
        weight,
        labels.reshape(-1),
        bias,
        logit_scale,
        softcap,
        vocab_shard=vocab_shard,
    )
    check_labels("labels", labels, None if vocab_shard else weight.shape[0], ignore_index)
    n_pairs = hidden.shape[0] // 2
    for name, t in (("rewards", rewards), ("ref_logps", ref_logps)):
        if t is None:
            continue
        check_tensor(name, t)
        check_float(name, t)
        if t.dim() != 1 or t.shape[0] != 2 * n_pairs:
            raise ValueError(f"{name} must be [2B] = [{2 * n_pairs}] (chosen then rejected), got shape {_shape(t)}")
        check_same_device("hidden", hidden, **{name: t})
    # ValueError naming the registered objectives, or the weights' problem
    plan = objectives.combination(policy_loss, policy_loss_weights)
    for objective, _ in plan:
        if objective.reference_free and ref_logps is not None:
            raise ValueError(f"policy_loss={objective.name!r} is reference-free: pass ref_logps=None")
        if objective.needs_label_smoothing and label_smoothing == 0:
            raise ValueError(
                f"policy_loss={objective.name!r} needs label_smoothing > 0 (its ε; log ε diverges at 0), got "
                f"{label_smoothing!r}; the EXO paper suggests 1e-3"
            )
        if objective.batch_coupled and pair_weights is not None:
            raise ValueError(
                f"policy_loss={objective.name!r} sorts over the batch, so its terms belong to no pair: pass "
                "pair_weights=None"
            )
    if not isinstance(discopop_tau, (int, float)) or not math.isfinite(discopop_tau) or discopop_tau <= 0:
        raise ValueError(f"discopop_tau must be a positive finite number, got {discopop_tau!r}")
    if not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a positive finite number, got {beta!r}")
    for name, value in (("alpha", alpha), ("reward_weight", reward_weight)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if not isinstance(simpo_gamma, (int, float)) or not math.isfinite(simpo_gamma):
        raise ValueError(f"simpo_gamma must be a finite number, got {simpo_gamma!r}")
    c = center_rewards_coefficient
    if not isinstance(c, (int, float)) or not math.isfinite(c) or c < 0:
        raise ValueError(f"center_rewards_coefficient must be a finite number >= 0, got {c!r}")
    if c > 0 and rewards is None:
        raise ValueError("center_rewards_coefficient > 0 centres the reward-head scores: pass rewards")
    if not isinstance(label_smoothing, (int, float)) or not (0.0 <= label_smoothing < 0.5):
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    if reward_margin is not None and isinstance(reward_margin, torch.Tensor):
        check_float("reward_margin", reward_margin)
        if reward_margin.dim() > 1 or (reward_margin.dim() == 1 and reward_margin.shape[0] != n_pairs):
            raise ValueError(f"reward_margin must be a scalar or [B] = [{n_pairs}], got shape {_shape(reward_margin)}")
        check_same_device("hidden", hidden, reward_margin=reward_margin)
    elif reward_margin is not None and not isinstance(reward_margin, (int, float)):
        raise TypeError(f"reward_margin must be None, a number or a tensor, got {type(reward_margin).__name__}")
    if pair_weights is not None:
        check_tensor("pair_weights", pair_weights)
        check_float("pair_weights", pair_weights)
        if pair_weights.dim() != 1 or pair_weights.shape[0] != n_pairs:
            raise ValueError(f"pair_weights must be [B] = [{n_pairs}], got shape {_shape(pair_weights)}")
        check_same_device("hidden", hidden, pair_weights=pair_weights)
        if bool((pair_weights < 0).any()) or not bool(torch.isfinite(pair_weights).all()):
            raise ValueError("pair_weights must be finite and >= 0 (0 drops a pair)")
    return n_pairs


def check_finite(**named: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | float | None) -> None:
    """``NonFiniteInputError`` naming every argument that holds NaN or ±Inf (``None`` and ints pass).

    An argument may be ``(tensor, rows)`` with a boolean ``rows`` mask over its leading dimensions: only those
    rows count (hidden states of ignored tokens, e.g. padding, do not reach the loss and may be anything).
    Cost: one read of each tensor (``aminmax``) and one host sync for all of them; NaN propagates through
    min/max, so finite extremes mean every element is finite.
    """
    tensors: list[tuple[str, torch.Tensor, torch.Tensor | None]] = []
    bad = [n for n, v in named.items() if isinstance(v, float) and not math.isfinite(v)]
    for n, v in named.items():
        t, rows = v if isinstance(v, tuple) else (v, None)
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
            tensors.append((n, t, rows))
    if tensors:
        dev = tensors[0][1].device
        ext = []
        for _, t, rows in tensors:
            x = t.detach() if rows is None else t.detach()[rows]
            ext.append(torch.stack(torch.aminmax(x.reshape(-1))).float() if x.numel() else torch.zeros(2, device=dev))
        ok = torch.isfinite(torch.stack(ext)).all(dim=1).tolist()
        bad += [n for (n, _, _), good in zip(tensors, ok) if not good]
    if not bad:
        return
    parts = []
    for n in bad:
        v = named[n]
        t, rows = v if isinstance(v, tuple) else (v, None)
        if isinstance(t, torch.Tensor):
            nonfinite = ~t.detach().isfinite()
            if rows is not None:
                nonfinite &= rows.reshape(rows.shape + (1,) * (t.dim() - rows.dim()))
            nan = int((t.detach().isnan() & nonfinite).sum())
            first = nonfinite.nonzero()[0].tolist()
            where = first[0] if t.dim() == 1 else tuple(first)
            scope = " (in rows that reach the loss)" if rows is not None else ""
            parts.append(
                f"{n} {_shape(t)} has {nan} NaN and {int(nonfinite.sum()) - nan} Inf values{scope} "
                f"(first at index {where})"
            )
        else:
            parts.append(f"{n} is {v!r}")
    raise NonFiniteInputError(
        "; ".join(parts) + " (check_finite=True): the loss would be NaN; check the model's weights and the "
        "batch (e.g. an overflow in fp16 upstream)"
    )


def check_vocab_shard(
    process_group: object,
    vocab_start: int | None,
    weight: torch.Tensor,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    local_checks: Callable[[], T],
    *,
    weight_name: str = "weight",
) -> tuple[T, list[int], list[int], int]:
    """Collective checks of a vocab-parallel call; returns ``(local_checks(), starts, rows, rank)``.

    Every rank of ``process_group`` must call it with the same arguments except ``weight`` (its vocab shard
    ``[V_local, D]``, ``V_local`` may differ and may be 0) and ``vocab_start``. It runs ``local_checks`` (the usual
    argument checks, which must not look at the labels' range), then one all-gather of 9 int64 per rank: whether
    the local checks passed, the shard's rows and ``vocab_start``, ``hidden``'s rows, ``D`` and dtype, a hash of the
    labels and their range. So a bad argument on one rank raises on every rank (that rank: its own error; the others:
    a ``ValueError`` naming it) instead of leaving the others waiting in a collective.

    ``vocab_start=None`` on every rank: the shards lie in rank order (rank r holds rows
    ``Σ_{q<r} V_q ... + V_r``, as ``DTensor``'s ``Shard(0)`` and Megatron lay them out). Given on every rank: the
    shards must tile ``[0, V)`` without gaps or overlaps, in any order. ``starts``/``rows``: per rank of the group.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("vocab_parallel needs torch.distributed initialised (torch.distributed.init_process_group)")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"vocab_parallel.process_group must be a torch.distributed.ProcessGroup, got {type(process_group).__name__}"
        )
    error: Exception | None = None
    result = None
    try:
        result = local_checks()
        if vocab_start is not None and (
            isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0
        ):
            raise ValueError(f"vocab_parallel.vocab_start must be None or an int >= 0, got {vocab_start!r}")
    except (ValueError, TypeError) as exc:
        error = exc
    backend = str(dist.get_backend(process_group))
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    i64 = torch.iinfo(torch.int64)
    info = torch.zeros(9, dtype=torch.int64, device=device)
    if error is None:
        y = labels.detach().reshape(-1).to(device=device, dtype=torch.int64)
        valid = y != ignore_index
        # position-weighted sum (wraps around in int64): equal labels give equal hashes on every rank
        digest = (y * torch.arange(1, 2 * y.numel() + 1, 2, device=device)).sum()
        sentinel_lo = torch.tensor([i64.max], device=device)
        sentinel_hi = torch.tensor([i64.min], device=device)
        lo = torch.cat([torch.where(valid, y, i64.max), sentinel_lo]).min()
        hi = torch.cat([torch.where(valid, y, i64.min), sentinel_hi]).max()
        head = [1, weight.shape[0], -1 if vocab_start is None else vocab_start, y.numel(), hidden.shape[-1]]
        head.append(FLOAT_DTYPES.index(hidden.dtype))
        info = torch.cat([torch.tensor(head, dtype=torch.int64, device=device), torch.stack([digest, lo, hi])])
    world = dist.get_world_size(process_group)
    gathered = [torch.empty_like(info) for _ in range(world)]
    dist.all_gather(gathered, info, group=process_group)
    table = [t.tolist() for t in gathered]
    rank = dist.get_rank(process_group)

    failed = [r for r in range(world) if table[r][0] != 1]
    if error is not None:
        raise error
    if failed:
        raise ValueError(
            f"vocab_parallel: rank(s) {failed} of the process group rejected their arguments (their own error says "
            f"why); this rank's ({rank}) were valid"
        )
    _, rows, starts, tokens, dims, dtypes, digests, lows, highs = (list(col) for col in zip(*table))
    if len(set(tokens)) > 1 or len(set(dims)) > 1 or len(set(dtypes)) > 1:
        per_rank = ", ".join(
            f"rank {r}: {tokens[r]} tokens × D={dims[r]} {str(FLOAT_DTYPES[dtypes[r]]).removeprefix('torch.')}"
            for r in range(world)
        )
        raise ValueError(
            "vocab_parallel: hidden must have one shape and dtype on every rank of the process group (a vocab-parallel "
            f"LM head sees the same tokens on each rank); got {per_rank}"
        )
    if len(set(digests)) > 1:
        raise ValueError(
            "vocab_parallel: labels differ across the ranks of the process group; every rank of a vocab-parallel LM "
            "head must pass the same hidden rows and labels"
        )
    given = [s >= 0 for s in starts]
    if any(given) and not all(given):
        raise ValueError(
            "vocab_parallel.vocab_start must be given on every rank or on none; ranks "
            f"{[r for r in range(world) if not given[r]]} gave None"
        )
    if not any(given):
        starts = [sum(rows[:r]) for r in range(world)]
    layout = ", ".join(f"rank {r}: [{starts[r]}, {starts[r] + rows[r]})" for r in range(world))
    end = 0
    for r in sorted(range(world), key=lambda q: (starts[q], rows[q])):
        if starts[r] != end:
            raise ValueError(
                f"vocab_parallel: the {weight_name} shards must tile [0, V) without gaps or overlaps; rank {r} "
                f"starts at vocab_start={starts[r]} but the shards before it end at {end} ({layout})"
            )
        end += rows[r]
    if end < 1:
        raise ValueError(f"vocab_parallel: every {weight_name} shard is empty (V = 0)")
    if lows[rank] <= highs[rank] and (lows[rank] < 0 or highs[rank] >= end):
        bad = lows[rank] if lows[rank] < 0 else highs[rank]
        raise ValueError(
            f"labels must be in [0, {end}) (the global vocab size: the sum of the {weight_name} shards' rows, "
            f"{layout}) or equal ignore_index={ignore_index}; found {bad}"
        )
    return result, starts, rows, rank
