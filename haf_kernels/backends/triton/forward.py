"""Forward of ``linear_logprobs`` in Triton: tiled ``hidden·weightᵀ``, online log-sum-exp, target capture.

Plain PyTorch equivalent (never materialised here; ``[N, V]`` logits exist one tile at a time)::

    z = hidden.float() @ weight.float().T                     # + bias, · logit_scale, softcap·tanh(z/softcap)
    lse = z.logsumexp(-1)
    logp = torch.where(labels != ignore_index, z.gather(-1, labels[:, None])[:, 0] - lse, 0)

Grid: ``token tiles × vocab splits`` programs, in grouped order (a GPU-full of programs shares a few
token tiles and a few vocab tiles, so both stay in L2). Each program walks its share of the vocabulary in
``BLOCK_V`` steps, forms the logits tile with ``tl.dot`` over ``D`` in ``BLOCK_D`` steps (fp32
accumulation; fp64 for fp64 inputs), keeps a running (max, sum-exp) per token, picks the target logit
when its column passes, and writes one partial ``(max, sumexp, target)`` per token and split. A few
torch ops combine the splits (a ``[splits, N]`` reduction). The number of splits is chosen so
``token tiles × splits`` fills the GPU once: the compiled kernel's resident CTAs per SM (from its registers,
shared memory and warps, ``_common.resident_ctas``; 2 when unknown, e.g. in the interpreter) × the SM count —
1 for large N, many for reference scoring with small N. Tiles whose tokens are all ignored skip the vocabulary loop.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ...options import LogprobOptions, compute_dtype
from ._common import (
    ASSUMED_CTAS_PER_SM,
    Tiles,
    _grouped_pid,
    _logits_tile,
    _online_lse_step,
    _store_split_partials,
    autotune_requested,
    combine_partials,
    device_guard,
    dot_precision,
    group_rows,
    interpreting,
    num_sms,
    require_dot_dtype,
    resident_ctas,
    tiles_for,
)


@triton.jit
def linear_logprobs_fwd_kernel(
    h_ptr,  # [N, D] hidden (strided)
    w_ptr,  # [V, D] weight (strided)
    b_ptr,  # [V] bias (contiguous; unused unless HAS_BIAS)
    y_ptr,  # [N] labels (contiguous, int32/int64)
    max_ptr,  # [S, N] out: running max of each split (fp32 / fp64)
    sum_ptr,  # [S, N] out: sum of exp(z - max) of each split
    tgt_ptr,  # [S, N] out: target logit if it lies in the split, else 0
    N,
    V,
    D,
    v_per_split,
    n_splits,
    group,
    stride_hn,
    stride_hd,
    stride_wv,
    stride_wd,
    ignore_index,
    logit_scale,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    IS_FP64: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n, pid_s = _grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_N), n_splits, group)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    y = tl.load(y_ptr + rows, mask=row_ok, other=ignore_index)
    live = row_ok & (y != ignore_index)
    n_live = tl.sum(live.to(tl.int32), axis=0)

    v_lo = pid_s * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)
    v_hi = tl.where(n_live > 0, v_hi, v_lo)  # a tile of ignored tokens does no work
    offs_v = tl.arange(0, BLOCK_V)

    acc_ty = tl.float64 if IS_FP64 else tl.float32
    m_i = tl.full([BLOCK_N], float("-inf"), dtype=acc_ty)
    s_i = tl.zeros([BLOCK_N], dtype=acc_ty)
    t_i = tl.zeros([BLOCK_N], dtype=acc_ty)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + offs_v
        col_ok = cols < v_hi
        z = _logits_tile(
            h_ptr,
            w_ptr,
            b_ptr,
            rows,
            cols,
            row_ok,
            col_ok,
            D,
            stride_hn,
            stride_hd,
            stride_wv,
            stride_wd,
            logit_scale,
            softcap,
            HAS_BIAS,
            HAS_SCALE,
            HAS_SOFTCAP,
            IS_FP64,
            DOT_PRECISION,
            BLOCK_N,
            BLOCK_V,
            BLOCK_D,
        )
        m_i, s_i, t_i = _online_lse_step(m_i, s_i, t_i, z, cols, col_ok, y)

    # tiles with no work report (max 0, sumexp 1): finite (lse = 0 with one split), and neutral enough for the combine
    _store_split_partials(max_ptr, sum_ptr, tgt_ptr, pid_s * N + rows, row_ok, m_i, s_i, t_i, 1.0)


@functools.cache
def _autotuned_fwd_kernel():
    """``linear_logprobs_fwd_kernel`` wrapped in ``triton.autotune`` (built on first use, ``HAF_AUTOTUNE=1``)."""
    configs = [
        triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd}, num_warps=w, num_stages=s)
        for bn, bv, bd, w, s in [
            (128, 128, 64, 8, 3),
            (128, 128, 32, 8, 4),
            (64, 128, 64, 4, 3),
            (128, 64, 64, 4, 3),
            (64, 64, 64, 4, 2),
            (64, 256, 32, 8, 3),
        ]
    ]
    return triton.autotune(configs=configs, key=["V", "D", "HAS_BIAS", "HAS_SOFTCAP", "IS_FP64"])(
        linear_logprobs_fwd_kernel
    )


def _choose_splits(
    n_token_tiles: int, n_vocab_tiles: int, device: torch.device, ctas_per_sm: int = ASSUMED_CTAS_PER_SM
) -> int:
    """Vocab splits so that ``token tiles × splits`` fills the GPU once: ``ctas_per_sm`` (resident CTAs of the
    compiled kernel, :func:`~._common.resident_ctas`) × the SM count (1 in the interpreter)."""
    if interpreting() or device.type != "cuda":
        return 1
    target = max(1, ctas_per_sm) * num_sms(device)
    return max(1, min(n_vocab_tiles, triton.cdiv(target, n_token_tiles)))


def linear_logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    opts: LogprobOptions,
    *,
    vocab_splits: int | None = None,
    tiles: Tiles | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token log-probs and log-sum-exp: ``hidden [N, D]``, ``weight [V, D]``, ``labels [N]``, ``bias [V]``.

    Returns ``(logp [N], lse [N])``: ``logp`` fp32 (fp64 for fp64 inputs), 0 where ``labels == ignore_index``;
    ``lse`` float64 (then finite but meaningless). ``hidden``/``weight`` may be
    strided; ``vocab_splits`` forces the number of vocab splits (default: fill the GPU); ``tiles``
    overrides the tile table.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [N, D] and weight [V, D]; got {list(hidden.shape)} and {list(weight.shape)}")
    if labels.shape != (hidden.shape[0],):
        raise ValueError(f"labels must be [N] = [{hidden.shape[0]}], got {list(labels.shape)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden and weight must share a dtype, got {hidden.dtype} and {weight.dtype}")
    require_dot_dtype(hidden.dtype)
    n, d = hidden.shape
    vocab = weight.shape[0]
    acc_dtype = compute_dtype(hidden.dtype)
    dev = hidden.device
    if n == 0:
        return torch.zeros(0, dtype=acc_dtype, device=dev), torch.zeros(0, dtype=torch.float64, device=dev)
    labels = labels.contiguous()
    bias_c = None if bias is None else bias.contiguous()
    flags = dict(
        HAS_BIAS=bias is not None,
        HAS_SCALE=opts.logit_scale != 1.0,
        HAS_SOFTCAP=opts.softcap is not None,
        IS_FP64=hidden.dtype == torch.float64,
        DOT_PRECISION=dot_precision(hidden.dtype, opts.tuning),
    )
    softcap = 1.0 if opts.softcap is None else float(opts.softcap)
    autotune = autotune_requested(opts.tuning) and tiles is None
    t = tiles or tiles_for(hidden.dtype, dev, opts.tuning)
    block_n = 64 if autotune else t.block_n  # split bookkeeping only; the tuned BLOCK_N sets the grid
    block_v = 256 if autotune else t.block_v
    n_vt = triton.cdiv(vocab, block_v)

    def layout(splits: int) -> tuple[int, torch.Tensor, tuple]:
        """(splits, partials [3, splits, N], kernel arguments) for a requested number of vocab splits."""
        splits = max(1, min(int(splits), vocab))
        v_per_split = triton.cdiv(vocab, splits)
        if not autotune:  # keep split boundaries on tile boundaries (fewer partial tiles)
            v_per_split = triton.cdiv(v_per_split, block_v) * block_v
        splits = triton.cdiv(vocab, v_per_split)
        part = torch.empty(3, splits, n, dtype=acc_dtype, device=dev)
        args = (
            hidden,
            weight,
            bias_c if bias_c is not None else hidden,  # dummy pointer when HAS_BIAS is False
            labels,
            part[0],
            part[1],
            part[2],
            n,
            vocab,
            d,
            v_per_split,
            splits,
            group_rows(triton.cdiv(n, block_n), splits, dev, opts.tuning),
            hidden.stride(0),
            hidden.stride(1),
            weight.stride(0),
            weight.stride(1),
            opts.ignore_index,
            float(opts.logit_scale),
            softcap,
        )
        return splits, part, args

    launch = dict(
        flags,
        BLOCK_N=t.block_n,
        BLOCK_V=t.block_v,
        BLOCK_D=t.block_d,
        num_warps=t.num_warps,
        num_stages=t.num_stages,
    )
    if vocab_splits:
        splits = vocab_splits
    else:
        ctas = ASSUMED_CTAS_PER_SM
        if not autotune:  # resident CTAs of the compiled kernel (its registers / shared memory), cached
            key = ("fwd", hidden.dtype, bias is not None, tuple(sorted(launch.items())))
            ctas = resident_ctas(linear_logprobs_fwd_kernel, lambda: layout(2)[2], launch, dev, key)
        splits = _choose_splits(triton.cdiv(n, block_n), n_vt, dev, ctas)
    splits, part, args = layout(splits)
    with device_guard(dev):
        if autotune:
            grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * splits,)
            _autotuned_fwd_kernel()[grid](*args, **flags)
        else:
            grid = (triton.cdiv(n, t.block_n) * splits,)
            linear_logprobs_fwd_kernel[grid](*args, **launch)
    return combine_partials(part, labels, opts.ignore_index, acc_dtype)
