"""Vocab-parallel (tensor-parallel) LM head: token log-probs from one vocab shard of the weight per rank.

Each rank of a process group holds rows ``[vocab_start, vocab_start + V_local)`` of the LM head (and of its bias)
and the same hidden states and labels. Nothing vocab-sized or weight-sized is communicated:

- forward: the backend's forward on the local shard gives ``lse_local[N]``; the token's target logit is computed
  where its target lies in the shard (``h·W[y]``, an O(N·D) gather); then one all-reduce MAX of ``lse_local`` and
  one all-reduce SUM of ``[exp(lse_local − max), target]`` (``3·N`` float64 in all) give the global
  ``lse = max + log Σ exp(lse_r − max)`` and ``logp = target − lse`` on every rank.
- backward: the backend's backward with the GLOBAL ``lse`` gives each rank's ``g·(onehot_local − exp(z − lse))``
  through ``dH``, ``dW_local``, ``db_local``. A token whose target lies on another rank is given a stand-in local
  label ``c = t mod V_local``, and that wrong onehot term is subtracted again (O(N·D): ``g·∂z_c/∂(h, W_c, b_c)``).
  Spreading the stand-ins over the columns keeps each row's sum small (all of them on one row would pile up
  ``Σ g`` there before the subtraction, and its rounding with it); a stand-in then costs what a target costs the
  unsharded kernel: one rounding of ``g·(1 − p)`` on a row whose true value is ``−g·p``. ``dW``/``db`` stay
  local; ``dH`` is a sum over shards: one all-reduce of ``[N, D]`` (as Megatron's vocab-parallel cross-entropy), or,
  with ``reduce_grad_hidden=False``, this rank's partial for a caller whose tensor-parallel layer reduces it.

Softcap and ``logit_scale`` act per logit, so they are shard-local. The backends (``torch``, ``cpp``, ``triton``) run
unchanged; ``ShardedBackend`` wraps one in the same protocol (``forward``/``backward``, and ``forward_keep``/
``backward_saved`` where the backend keeps logits, so the 3-GEMM whole loss runs sharded too).

Plain PyTorch equivalent (what it computes, with ``W = cat(shards)``)::

    logp = (hidden @ W.T + b).mul(logit_scale).log_softmax(-1).gather(-1, labels[:, None])[:, 0]
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from . import backends
from .options import LogprobOptions, compute_dtype
from .validate import check_vocab_shard


@dataclass(frozen=True)
class VocabParallel:
    """How this rank's LM-head weight is a vocab shard: pass as ``vocab_parallel=`` (or pass the group alone).

    ``process_group``: the tensor-parallel group over which the vocabulary is split (every rank holds the same
    tokens). ``vocab_start``: the global id of this shard's first row; ``None`` (on every rank): shards in rank
    order of the group, as ``DTensor``'s ``Shard(0)`` and Megatron lay them out. ``reduce_grad_hidden``: all-reduce
    ``dH`` over the group (``True``: ``hidden.grad`` is the full gradient); ``False`` leaves this rank's partial, for
    a caller whose tensor-parallel layer reduces it (e.g. Megatron's ``copy_to_tensor_model_parallel_region``).
    """

    process_group: Any
    vocab_start: int | None = None
    reduce_grad_hidden: bool = True


@dataclass(frozen=True)
class VocabShard:
    """A checked vocab shard: rows ``[start, start + rows)`` of a ``vocab``-row head; ``max_rows`` over ranks."""

    group: Any
    start: int
    rows: int
    vocab: int
    max_rows: int
    reduce_grad_hidden: bool


def as_vocab_parallel(value: object) -> VocabParallel | None:
    """``vocab_parallel=`` argument as a ``VocabParallel`` (a bare ``ProcessGroup`` is taken as its group)."""
    if value is None or isinstance(value, VocabParallel):
        return value
    if dist.is_available() and isinstance(value, dist.ProcessGroup):
        return VocabParallel(value)
    raise TypeError(
        f"vocab_parallel must be None, a torch.distributed.ProcessGroup or a haf_kernels.vocab_parallel.VocabParallel, "
        f"got {type(value).__name__}"
    )


def agree(
    vp: VocabParallel,
    local_checks: Any,
    weight: torch.Tensor,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    *,
    weight_name: str = "weight",
) -> tuple[Any, VocabShard]:
    """Run ``local_checks`` on every rank, then agree on the layout (one small all-gather); see ``check_vocab_shard``.

    Returns ``(local_checks(), shard)``; raises on every rank when any rank's arguments are bad.
    """
    if not isinstance(vp.reduce_grad_hidden, bool):
        raise TypeError(f"vocab_parallel.reduce_grad_hidden must be a bool, got {type(vp.reduce_grad_hidden).__name__}")
    result, starts, rows, rank = check_vocab_shard(
        vp.process_group, vp.vocab_start, weight, hidden, labels, ignore_index, local_checks, weight_name=weight_name
    )
    shard = VocabShard(vp.process_group, starts[rank], rows[rank], sum(rows), max(rows), vp.reduce_grad_hidden)
    return result, shard


def group_min(value: int, shard: VocabShard, device: torch.device) -> int:
    """The smallest ``value`` over the shard's process group (one all-reduce of one int64), so that every rank
    derives the same pair chunking from its own free memory."""
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=shard.group)
    return int(t.item())


def _accepts_accumulators(fn: Any) -> bool:
    return "dw_acc" in inspect.signature(fn).parameters


class ShardedBackend:
    """A backend module's protocol over one vocab shard (see the module docstring), collectives included.

    ``labels`` are GLOBAL ids (the callers pass non-ignored tokens only; ignored ones get ``logp = 0`` and no
    gradient). ``lse`` is the global log-sum-exp (float64), which the backward needs on every rank.
    """

    def __init__(self, base: str, shard: VocabShard) -> None:
        self.base = backends.get(base)
        if not callable(getattr(self.base, "forward", None)):
            raise ValueError(
                f"backend={base!r} has no vocab-parallel form (it materialises the logits): use 'torch' or 'auto'"
            )
        self.NAME = f"{base} (vocab-parallel)"
        self.shard = shard
        # the base's declarations hold (kept logits: forward_keep / backward_saved below wrap the base's)
        self.CAPABILITIES = self.base.CAPABILITIES

    # ------------------------------------------------------------------ helpers
    def _local(self, labels: torch.Tensor, opts: LogprobOptions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(local label, inside, valid)``: label in ``[0, rows)``, ``t mod rows`` where the target is elsewhere."""
        valid = labels != opts.ignore_index
        local = labels.long() - self.shard.start
        inside = valid & (local >= 0) & (local < self.shard.rows)
        stand_in = torch.arange(labels.shape[0], device=labels.device) % max(self.shard.rows, 1)
        return torch.where(inside, local, stand_in), inside, valid

    @staticmethod
    def _column_logits(
        h: torch.Tensor, w_rows: torch.Tensor, b_rows: torch.Tensor | None, opts: LogprobOptions, dt: torch.dtype
    ) -> torch.Tensor:
        """``z[t] = cap(scale·(h_t·w_rows[t] + b_rows[t]))`` in ``dt``: one logit per token, O(N·D)."""
        return opts.head(torch.einsum("nd,nd->n", h.to(dt), w_rows.to(dt)), b_rows)

    def _combine(
        self, h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, b: torch.Tensor | None, opts: LogprobOptions, fn
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Local ``fn`` (``forward`` or ``forward_keep``), then the global statistics: ``(logp, lse, saved)``."""
        n, dt, f64 = h.shape[0], compute_dtype(h.dtype), torch.float64
        local, inside, valid = self._local(labels, opts)
        saved = None
        if self.shard.rows > 0:
            out = fn(h, w, local, b, opts)
            lse_local = out[1].to(f64)
            saved = out[2] if len(out) > 2 else None
            target = self._column_logits(
                h, w.index_select(0, local), None if b is None else b.index_select(0, local), opts, dt
            )
            target = torch.where(inside, target.to(f64), torch.zeros((), dtype=f64, device=h.device))
        else:  # an empty shard (e.g. DTensor's Shard(0) of a small vocab over many ranks)
            lse_local = torch.full((n,), float("-inf"), dtype=f64, device=h.device)
            target = torch.zeros(n, dtype=f64, device=h.device)
        top = lse_local.clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=self.shard.group)
        stats = torch.stack([torch.exp(lse_local - top), target])
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=self.shard.group)
        lse = top + stats[0].log()
        logp = torch.where(valid, stats[1] - lse, torch.zeros((), dtype=f64, device=h.device)).to(dt)
        return logp, lse, saved

    def _finish(
        self,
        grads: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
        g: torch.Tensor,
        h: torch.Tensor,
        w: torch.Tensor,
        b: torch.Tensor | None,
        local: torch.Tensor,
        inside: torch.Tensor,
        opts: LogprobOptions,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Remove the onehot terms the backend put at the stand-in labels of targets on other ranks; reduce ``dH``."""
        dh, dw, db = grads
        dt = compute_dtype(h.dtype)
        if self.shard.rows > 0:
            # the backend's onehot term of a token labelled c is g·∂z_c/∂u (u = h·W_c + b_c): g·scale·(1 − (z_c/cap)²)
            coef = torch.where(inside, torch.zeros((), dtype=dt, device=h.device), g.to(dt))
            coef = coef * opts.logit_scale
            w_c = w.index_select(0, local)
            if opts.softcap is not None:
                z_c = self._column_logits(h, w_c, None if b is None else b.index_select(0, local), opts, dt)
                coef = coef * (1.0 - (z_c / opts.softcap) ** 2)
            if dh is not None:
                dh = (dh.to(dt) - coef[:, None] * w_c.to(dt)).to(dh.dtype)
            # in place, in the gradient's own dtype (no [V_local, D] temporary): fp32/fp64 from the kept-logits path,
            # the weight's dtype from the recompute path (bf16: one more rounding of the touched rows)
            if dw is not None:
                dw.index_add_(0, local, (coef[:, None] * h.to(dt)).neg_().to(dw.dtype))
            if db is not None:
                db.index_add_(0, local, (-coef).to(db.dtype))
        if dh is not None and self.shard.reduce_grad_hidden:
            dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=self.shard.group)
        return dh, dw, db

    def _empty_grads(
        self, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, needs: tuple[bool, bool, bool], acc: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        dt = compute_dtype(h.dtype)
        return (
            torch.zeros_like(h) if needs[0] else None,
            torch.zeros(w.shape, dtype=dt if acc else w.dtype, device=w.device) if needs[1] else None,
            torch.zeros(w.shape[0], dtype=dt if acc else b.dtype, device=w.device)
            if needs[2] and b is not None
            else None,
        )

    # ------------------------------------------------------------------ the backend protocol
    def forward(
        self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None, opts
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logp [N], lse [N] float64)``, both global (identical on every rank)."""
        logp, lse, _ = self._combine(hidden, weight, labels, bias, opts, self.base.forward)
        return logp, lse

    def backward(
        self,
        grad_logp: torch.Tensor,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        bias: torch.Tensor | None,
        lse: torch.Tensor,
        opts: LogprobOptions,
        needs: tuple[bool, bool, bool],
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """``(dhidden [N, D] summed over ranks, dweight [V_local, D], dbias [V_local])`` in the inputs' dtypes."""
        local, inside, valid = self._local(labels, opts)
        g = torch.where(valid, grad_logp, torch.zeros_like(grad_logp))
        if self.shard.rows > 0:
            grads = self.base.backward(g, hidden, weight, local, bias, lse, opts, needs)
        else:
            grads = self._empty_grads(hidden, weight, bias, needs, acc=False)
        return self._finish(grads, g, hidden, weight, bias, local, inside, opts)

    def forward_keep(
        self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None, opts
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Like ``forward``, keeping the local ``[N, V_local]`` logits for ``backward_saved`` (base keeps logits)."""
        return self._combine(hidden, weight, labels, bias, opts, self.base.forward_keep)

    def backward_saved(
        self,
        saved: Any,
        grad_logp: torch.Tensor,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        bias: torch.Tensor | None,
        lse: torch.Tensor,
        opts: LogprobOptions,
        needs: tuple[bool, bool, bool],
        dw_acc: torch.Tensor | None = None,
        db_acc: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Gradients from the kept local logits; dW/db in the accumulation dtype, added into ``dw_acc``/``db_acc``."""
        local, inside, valid = self._local(labels, opts)
        g = torch.where(valid, grad_logp, torch.zeros_like(grad_logp))
        if self.shard.rows > 0:
            if _accepts_accumulators(self.base.backward_saved):
                grads = self.base.backward_saved(
                    saved, g, hidden, weight, local, bias, lse, opts, needs, dw_acc=dw_acc, db_acc=db_acc
                )
                dw_acc = db_acc = None
            else:
                grads = self.base.backward_saved(saved, g, hidden, weight, local, bias, lse, opts, needs)
        else:
            grads = self._empty_grads(hidden, weight, bias, needs, acc=True)
        dh, dw, db = self._finish(grads, g, hidden, weight, bias, local, inside, opts)
        if dw_acc is not None and dw is not None:
            dw = dw_acc.add_(dw)
        if db_acc is not None and db is not None:
            db = db_acc.add_(db)
        return dh, dw, db


def from_dtensor(
    weight: torch.Tensor, bias: torch.Tensor | None = None, *, reduce_grad_hidden: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, VocabParallel]:
    """``(weight_local [V_local, D], bias_local [V_local] | None, VocabParallel)`` of a ``DTensor`` LM head.

    ``weight`` (and ``bias``) must be sharded ``Shard(0)`` on exactly one mesh dimension and ``Replicate()`` on any
    other; the group is that mesh dimension's. ``to_local()`` keeps autograd: the local shards' gradients arrive
    in ``weight.grad`` as a ``Shard(0)`` DTensor. Equivalent by hand::

        w_local = weight.to_local(); group = weight.device_mesh.get_group(mesh_dim)  # vocab_start: rank order
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard

    def mesh_dim_of(name: str, t: object) -> int:
        if not isinstance(t, DTensor):
            raise TypeError(f"{name} must be a torch.distributed.tensor.DTensor, got {type(t).__name__}")
        sharded = [i for i, p in enumerate(t.placements) if p == Shard(0)]
        others = [p for i, p in enumerate(t.placements) if i not in sharded and p != Replicate()]
        if len(sharded) != 1 or others:
            raise ValueError(
                f"{name} must be Shard(0) on one mesh dimension and Replicate() on the others, got placements "
                f"{tuple(t.placements)}"
            )
        return sharded[0]

    dim = mesh_dim_of("weight", weight)
    if bias is not None and (mesh_dim_of("bias", bias) != dim or bias.device_mesh != weight.device_mesh):
        raise ValueError("bias must be sharded Shard(0) on the same device mesh dimension as weight")
    group = weight.device_mesh.get_group(dim)
    local_bias = None if bias is None else bias.to_local()
    return weight.to_local(), local_bias, VocabParallel(group, None, reduce_grad_hidden)


def checked(
    vp: VocabParallel | None,
    checks: Any,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *args: Any,
    weight_name: str = "lm_head_weight",
    **kwargs: Any,
) -> tuple[Any, VocabShard | None]:
    """``(checks(hidden, weight, labels, *args, **kwargs), shard)``; with ``vp`` the checks run as ``agree``'s local
    checks (so a bad argument on one rank raises on every rank), else ``shard`` is ``None``."""
    if vp is None:
        return checks(hidden, weight, labels, *args, **kwargs), None
    ignore_index = kwargs.get("ignore_index", -100)
    return agree(
        vp,
        lambda: checks(hidden, weight, labels, *args, **kwargs),
        weight,
        hidden,
        labels,
        ignore_index,
        weight_name=weight_name,
    )
