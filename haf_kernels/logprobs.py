"""Token log-probabilities from hidden states and an LM head, never materialising ``[N, V]`` logits.

Holds the ``autograd.Function``s and the backend dispatch; kernels live in ``backends/``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch._C import _functions as _autograd_functions

from . import backends, memory
from .options import LogprobOptions, compute_dtype
from .tuning import Tuning, current
from .validate import check_finite as check_finite_inputs
from .validate import check_labels, check_logprob_args
from .vocab_parallel import ShardedBackend, VocabParallel, agree, as_vocab_parallel


def first_order_only(op: str) -> Callable:
    """Decorator of an ``autograd.Function.backward`` whose gradients are not differentiable themselves.

    Differentiating them again (``create_graph=True`` then a second ``backward``/``grad``) raises a
    ``RuntimeError`` that says so, instead of an obscure "does not require grad" or a silently missing
    second-order term. Without ``create_graph`` nothing changes.
    """
    message = (
        f"haf_kernels: double backward through {op} is not supported (its backward is a fused kernel, not "
        "differentiable); for gradients of gradients use backend='reference', which materialises the logits"
    ).encode()

    def decorate(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def wrapper(ctx: Any, *grads: Any) -> Any:
            with torch.no_grad():
                outputs = backward(ctx, *grads)
            if not torch.is_grad_enabled():  # the usual first-order backward
                return outputs
            tensors = [o for o in outputs if isinstance(o, torch.Tensor)]
            if not tensors:
                return outputs
            # create_graph=True: every gradient gets a grad_fn that raises the message if it is differentiated.
            # A zero anchor ties it to the differentiable inputs (O(1) work), so torch.autograd.grad(..., inputs)
            # reaches the error instead of reporting the inputs as unused.
            anchors = [t.reshape(-1)[:1].sum() for t in ctx.saved_tensors if t is not None and t.requires_grad]
            anchor = torch.stack(anchors).sum() * 0 if anchors else None
            fake = [
                t.detach().requires_grad_(True) if anchor is None else t.detach() + anchor.to(t.dtype) for t in tensors
            ]
            guarded = iter(_autograd_functions.DelayedError(message, len(tensors))(*fake))
            return tuple(next(guarded) if isinstance(o, torch.Tensor) else o for o in outputs)

        return wrapper

    return decorate


def backend_module(backend: str | ShardedBackend) -> Any:
    """The backend module of ``backend``: a registered name, or a ``ShardedBackend`` (vocab-parallel) as is."""
    return backends.get(backend) if isinstance(backend, str) else backend


def _compact(labels: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """Indices of non-ignored tokens, or ``None`` when every token counts (no copy needed)."""
    valid = labels != ignore_index
    if bool(valid.all()):
        return None
    return valid.nonzero().squeeze(1)


class LinearLogprobsFunction(torch.autograd.Function):
    """``logp[N] = log_softmax(cap(scale·(hidden·weightᵀ + bias)))[labels]`` with a tiled backward.

    Only non-ignored tokens reach the backend; ``lse[N]`` is all that is saved besides the inputs.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        opts: LogprobOptions,
        backend: str | ShardedBackend,
    ) -> torch.Tensor:
        mod = backend_module(backend)
        idx = _compact(labels, opts.ignore_index)
        h, y = (hidden, labels) if idx is None else (hidden.index_select(0, idx), labels.index_select(0, idx))
        out = torch.zeros(hidden.shape[0], dtype=compute_dtype(hidden.dtype), device=hidden.device)
        if h.shape[0] > 0:
            logp, lse = mod.forward(h, weight, y, bias, opts)
        else:
            logp = lse = torch.zeros(0, dtype=out.dtype, device=hidden.device)
        if idx is None:
            out = logp
        else:
            out.index_copy_(0, idx, logp)
        ctx.save_for_backward(h, weight, bias, y, lse, idx, hidden)  # hidden: only for first_order_only
        ctx.opts, ctx.backend, ctx.n = opts, backend, hidden.shape[0]
        ctx.hidden_dtype = hidden.dtype
        return out

    @staticmethod
    @first_order_only("linear_logprobs")
    def backward(ctx: Any, grad_out: torch.Tensor):  # type: ignore[override]
        h, weight, bias, y, lse, idx, _ = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        if h.shape[0] == 0 or not any(needs):
            dh = torch.zeros(ctx.n, weight.shape[1], dtype=ctx.hidden_dtype, device=weight.device) if needs[0] else None
            return (
                dh,
                torch.zeros_like(weight) if needs[1] else None,
                torch.zeros_like(bias) if needs[2] else None,
                None,
                None,
                None,
            )
        g = grad_out if idx is None else grad_out.index_select(0, idx)
        mod = backend_module(ctx.backend)
        dh, dw, db = mod.backward(g.contiguous(), h, weight, y, bias, lse, ctx.opts, needs)
        if dh is not None and idx is not None:
            full = torch.zeros(ctx.n, h.shape[1], dtype=dh.dtype, device=dh.device)
            dh = full.index_copy_(0, idx, dh)
        return dh, dw, db, None, None, None


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    backend: str = "auto",
    chunk_tokens: int | None = None,
    chunk_vocab: int | None = None,
    check_finite: bool = False,
    vocab_parallel: VocabParallel | Any | None = None,
) -> torch.Tensor:
    """Per-token log-probabilities of ``labels`` under the LM head, without ``[N, V]`` logits.

    Args:
        hidden: ``[N, D]`` (fp16/bf16/fp32/fp64) final hidden states.
        weight: ``[V, D]`` LM-head weight, same dtype as ``hidden``.
        labels: ``[N]`` int64 next-token targets; ``ignore_index`` marks tokens to skip.
        bias: optional ``[V]`` LM-head bias.
        logit_scale: multiplies the logits (Cohere ``logit_scale``, Granite ``1/logits_scaling``).
        softcap: ``logits = softcap·tanh(logits/softcap)`` (Gemma-2/3 ``final_logit_softcapping``).
        backend: ``"auto"`` | ``"triton"`` | ``"cpp"`` | ``"torch"`` | ``"reference"``.
        chunk_tokens / chunk_vocab: tile sizes of the chunked backends (``None``: a ~64 MiB fp32 tile).
        check_finite: raise ``NonFiniteInputError`` (a ``ValueError`` naming the argument) when ``hidden``,
            ``weight`` or ``bias`` holds NaN/Inf (``hidden``: rows of non-ignored tokens only), instead of
            returning NaN. Costs one extra read of the inputs and one host sync; off by default.
        vocab_parallel: ``weight`` (and ``bias``) is this rank's vocab shard ``[V_local, D]`` of a tensor-parallel LM
            head: a ``torch.distributed.ProcessGroup`` (shards in rank order) or a
            ``haf_kernels.vocab_parallel.VocabParallel`` (group, ``vocab_start``, ``reduce_grad_hidden``). Every
            rank passes the same ``hidden`` and ``labels`` (global ids) and gets the same ``logp``; ``weight.grad``
            is the shard's, ``hidden.grad`` the sum over shards. Communication: ``3·N`` float64 in two all-reduces
            forward, one ``[N, D]`` all-reduce backward, plus one all-gather of 9 int64 per rank to check the
            layout. Not with ``backend="reference"``.

    Returns:
        ``[N]`` float32 (float64 for float64 inputs), 0 where ``labels == ignore_index``. Differentiable
        with respect to ``hidden``, ``weight`` and ``bias`` for any upstream gradient.

    Plain PyTorch equivalent::

        z = (hidden.float() @ weight.float().T + bias) * logit_scale
        logp = z.log_softmax(-1).gather(-1, labels[:, None])[:, 0].masked_fill(labels == ignore_index, 0)
    """
    vp = as_vocab_parallel(vocab_parallel)

    def checks() -> str:
        check_logprob_args(hidden, weight, labels, bias, logit_scale, softcap, vocab_shard=vp is not None)
        check_labels("labels", labels, None if vp is not None else weight.shape[0], ignore_index)
        if check_finite:
            check_finite_inputs(hidden=(hidden, labels != ignore_index), weight=weight, bias=bias)
        name = backends.resolve(backend, hidden.device, hidden.dtype)
        if vp is not None and name == "reference":
            raise ValueError(
                "backend='reference' has no vocab-parallel form (vocab_parallel=...): use 'torch' or 'auto'"
            )
        return name

    opts = LogprobOptions(
        ignore_index, float(logit_scale), None if softcap is None else float(softcap), chunk_tokens, chunk_vocab
    )
    if vp is None:
        return token_logprobs(hidden, weight, labels, bias, opts, checks())
    name, shard = agree(vp, checks, weight, hidden, labels, ignore_index)
    return token_logprobs(hidden, weight, labels, bias, opts, ShardedBackend(name, shard))


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    opts: LogprobOptions,
    backend: str | ShardedBackend,
) -> torch.Tensor:
    """``linear_logprobs`` on arguments already checked and a backend already resolved (no re-validation)."""
    if backend == "reference":
        return backends.get("reference").linear_logprobs(hidden, weight, labels, bias, opts)
    return LinearLogprobsFunction.apply(hidden, weight, bias, labels, opts, backend)


@torch.no_grad()
def sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    backend: str = "auto",
    vocab_parallel: VocabParallel | Any | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of token log-probs and token counts, forward only (reference models).

    Args:
        hidden: ``[S, T, D]`` hidden states; labels: ``[S, T]`` targets (``ignore_index`` skipped).

    Returns:
        ``(sums [S] float32, counts [S] int64)``; divide for length-averaged log-probs. Nothing is saved
        for backward (runs under ``torch.no_grad()``). ``vocab_parallel``: ``weight`` is a vocab shard, as in
        ``linear_logprobs``.
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        got = list(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"hidden must be [S, T, D], got {got}")
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(hidden.shape[:2]):
        got = list(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be [S, T] = {list(hidden.shape[:2])}, got {got}")
    s, t, d = hidden.shape
    logp = linear_logprobs(
        hidden.reshape(s * t, d),
        weight,
        labels.reshape(s * t),
        bias=bias,
        ignore_index=ignore_index,
        logit_scale=logit_scale,
        softcap=softcap,
        backend=backend,
        vocab_parallel=vocab_parallel,
    )
    counts = (labels != ignore_index).sum(dim=1)
    return logp.view(s, t).sum(dim=1).float(), counts


def _keep_fns(mod: Any) -> tuple[Callable, Callable]:
    """The backend's keep-logits pair (``CAPABILITIES.keeps_logits``), or a generic one that recomputes."""
    if mod.CAPABILITIES.keeps_logits:
        return mod.forward_keep, mod.backward_saved

    def forward_keep(h, w, y, b, opts):
        logp, lse = mod.forward(h, w, y, b, opts)
        return logp, lse, None

    def backward_saved(saved, g, h, w, y, b, lse, opts, needs):
        dh, dw, db = mod.backward(g, h, w, y, b, lse, opts, needs)
        dt = compute_dtype(h.dtype)
        return dh, None if dw is None else dw.to(dt), None if db is None else db.to(dt)

    return forward_keep, backward_saved


def _fits(buf: torch.Tensor | None, numel: int) -> bool:
    """Whether ``buf`` can hold ``numel`` kept logits."""
    return buf is not None and buf.numel() >= numel


def pair_chunks(
    labels: torch.Tensor,
    vocab: int,
    ignore_index: int,
    tuning: Tuning | None = None,
    *,
    logit_bytes: int = 4,
    free_bytes: int | None = None,
) -> list[tuple[int, int]] | None:
    """Split the B pairs into runs ``[p0, p1)`` whose kept logits fit the keep budget.

    Only non-ignored tokens are kept, so a pair costs ``(valid_c + valid_r)·V·logit_bytes`` bytes (the backend's
    kept dtype: 4 for fp32). The budget is ``tuning.keep_chunk_mb`` (``HAF_KEEP_CHUNK_MB``) when set, else
    ``haf_kernels.memory.budget_bytes(free_bytes)``: from the free CUDA memory (``free_bytes``), 64 MiB off CUDA
    (``None``). A single pair may exceed it (it is the least the 3-GEMM path can keep) up to ``keep_max_mb``
    (``HAF_KEEP_MAX_MB``; unset: 512 MiB, or the budget where that is larger); returns ``None`` when one does not fit
    even that (the caller then recomputes in backward instead). ``tuning``: default ``haf_kernels.tuning.current()``.
    """
    n_pairs = labels.shape[0] // 2
    counts = (labels != ignore_index).sum(dim=1).tolist()
    tuning = tuning or current()
    budget = memory.budget_bytes(free_bytes, tuning.keep_chunk_mb)
    cap = tuning.keep_max_mb << 20 if tuning.keep_max_mb is not None else max(512 << 20, budget)
    per_token = max(1, logit_bytes * max(vocab, 1))
    budget_tokens, cap_tokens = budget // per_token, cap // per_token
    chunks: list[tuple[int, int]] = []
    start, used = 0, 0
    for i in range(n_pairs):
        cost = counts[i] + counts[n_pairs + i]
        if cost > cap_tokens:
            return None
        if used > 0 and used + cost > budget_tokens:
            chunks.append((start, i))
            start, used = i, 0
        used += cost
    chunks.append((start, n_pairs))
    return chunks


class FusedPairLossFunction(torch.autograd.Function):
    """Whole policy loss with gradients finished inside the forward (3 GEMMs, O(chunk·V) memory).

    Every policy loss is a weighted mean of per-pair terms with a denominator known up front, so a chunk
    holding whole pairs can compute its logits once, its sequence log-probs, the pair losses, and at once
    the gradients ``dH``, ``dW``, ``db``. ``backward`` only scales them by the upstream scalar. The
    sequence log-probs it returns are detached (use ``linear_logprobs`` to differentiate through them).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        ref_logps: torch.Tensor | None,
        labels: torch.Tensor,
        pair_loss: Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor],
        opts: LogprobOptions,
        backend: str | ShardedBackend,
        chunks: list[tuple[int, int]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mod = backend_module(backend)
        forward_keep, backward_saved = _keep_fns(mod)
        accumulates = "dw_acc" in inspect.signature(backward_saved).parameters
        # a backend whose forward_keep takes ``out`` gets the previous chunk's consumed buffer (no fresh page faults)
        reuses = "out" in inspect.signature(forward_keep).parameters
        spare = None
        two_b, t, d = hidden.shape
        n_pairs = two_b // 2
        dt = compute_dtype(hidden.dtype)
        dev = hidden.device
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        need_ref = ref_logps is not None and ctx.needs_input_grad[3]
        dh = torch.zeros_like(hidden) if needs[0] else None
        dw = db = None  # the first chunk's gradients become the accumulators (no extra [V, D] buffer)
        # Sequence sums and the O(B) loss in float64: d is a small difference of two large sums (hundreds of
        # tokens), and its rounding would otherwise dominate the gradients' error.
        sdt = torch.float64
        dref = torch.zeros(two_b, dtype=sdt, device=dev) if need_ref else None
        seq = torch.zeros(two_b, dtype=sdt, device=dev)
        total = torch.zeros((), dtype=sdt, device=dev)
        for p0, p1 in chunks:
            rows = torch.cat([torch.arange(p0, p1, device=dev), torch.arange(n_pairs + p0, n_pairs + p1, device=dev)])
            y_rows = labels.index_select(0, rows)
            flat_y = y_rows.reshape(-1)
            valid = (flat_y != opts.ignore_index).nonzero().squeeze(1)
            h = hidden.index_select(0, rows).reshape(-1, d).index_select(0, valid)
            y = flat_y.index_select(0, valid)
            seq_of_token = valid // t
            if h.shape[0] > 0:
                kw = {"out": spare} if reuses and _fits(spare, h.shape[0] * weight.shape[0]) else {}
                logp, lse, saved = forward_keep(h, weight, y, bias, opts, **kw)
            else:
                logp = lse = torch.zeros(0, dtype=dt, device=dev)
                saved = None
            chunk_seq = torch.zeros(rows.shape[0], dtype=sdt, device=dev).index_add_(0, seq_of_token, logp.to(sdt))
            seq[rows] = chunk_seq
            with torch.enable_grad():
                leaf = chunk_seq.detach().requires_grad_(True)
                ref = None
                if ref_logps is not None:
                    ref = ref_logps.detach().index_select(0, rows).to(sdt).requires_grad_(need_ref)
                loss = pair_loss(leaf, ref, torch.arange(p0, p1, device=dev))
                grads = torch.autograd.grad(loss, [leaf] + ([ref] if need_ref else []))
            total += loss.detach()
            if need_ref:
                dref[rows] = grads[1]
            if h.shape[0] == 0 or not any(needs):
                continue
            g_tok = grads[0].index_select(0, seq_of_token).to(dt)
            if accumulates and dw is not None:
                c_dh, dw, db = backward_saved(saved, g_tok, h, weight, y, bias, lse, opts, needs, dw_acc=dw, db_acc=db)
                c_dw = c_db = None
            else:
                c_dh, c_dw, c_db = backward_saved(saved, g_tok, h, weight, y, bias, lse, opts, needs)
            if reuses and saved is not None and (spare is None or saved.numel() > spare.numel()):
                spare = saved  # consumed by backward_saved: the next chunk writes its logits here
            del saved
            if dh is not None:
                block = torch.zeros(rows.shape[0] * t, d, dtype=hidden.dtype, device=dev)
                block.index_copy_(0, valid, c_dh.to(hidden.dtype))
                dh.index_copy_(0, rows, block.view(rows.shape[0], t, d))
            if c_dw is not None:
                dw = c_dw if dw is None else dw.add_(c_dw)
            if c_db is not None:
                db = c_db if db is None else db.add_(c_db)
        if needs[1] and dw is None:
            dw = torch.zeros(weight.shape, dtype=dt, device=dev)
        if needs[2] and db is None:
            db = torch.zeros(weight.shape[0], dtype=dt, device=dev)
        # Held as a plain attribute, not saved tensors: backward hands them to autograd and drops its own
        # reference, so autograd adopts them as .grad without a copy.
        ctx.grads = [dh, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype), dref]
        ctx.ref_dtype = None if ref_logps is None else ref_logps.dtype
        ctx.mark_non_differentiable(seq)
        ctx.save_for_backward(hidden, weight, bias, ref_logps)  # no copies; read only by first_order_only
        return total.float() if dt != torch.float64 else total, seq

    @staticmethod
    @first_order_only("fused_haf_loss")
    def backward(ctx: Any, grad_loss: torch.Tensor, _grad_seq: torch.Tensor):  # type: ignore[override]
        if ctx.grads is None:
            raise RuntimeError(
                "fused_haf_loss finished its gradients in the forward pass and they were already used; to "
                "back-propagate twice (retain_graph=True) call it with grad_in_forward=False"
            )
        dh, dw, db, dref = ctx.grads
        ctx.grads = None

        # loss.backward() sends exactly 1: skip a pass over dW then (64 MiB at V = 32000, D = 512). A CUDA scalar
        # is not read back (that would synchronise), it is always multiplied.
        unit = grad_loss.device.type == "cpu" and bool(grad_loss == 1)

        def scale(x: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor | None:
            if x is None:
                return None
            if not unit:
                x = x.mul_(grad_loss.to(x.dtype))  # ours alone now: scale in place
            return x.to(dtype or x.dtype)

        return scale(dh), scale(dw), scale(db), scale(dref, ctx.ref_dtype), None, None, None, None, None
