"""Keep-logits path of the Triton backend: vendor GEMMs on one kept chunk of logits plus two Triton row kernels.

Three GEMMs per chunk of ``n`` tokens (``torch.mm`` / ``torch.addmm``: cuBLAS on a GPU), nothing recomputed::

    z  = h · Wᵀ (+ b)                      [n, V]  kept, in place for the rest
    dH = g ⊙_rows (s · W)                  [n, D]
    dW += sᵀ · (g ⊙_rows h)                [V, D]  fp32 accumulator

and two memory-bound Triton passes over ``z``:

1. ``keep_lse_kernel`` — grid row blocks × vocab splits, reads ``z`` only: applies ``logit_scale`` / ``softcap`` in
   fp32 (a bias is added by the GEMM's epilogue), keeps a running (max, sum-exp) per row and picks the target logit.
   Splits are combined by a few torch ops (``[splits, n]``).
2. ``keep_grad_kernel`` — grid vocab tiles × row splits: applies scale / softcap again in fp32 (recomputing a tanh
   costs less than a pass over ``z``, and the derivative ``1 − tanh²`` comes from the unrounded tanh), turns ``z``
   into ``s = (onehot − p)·chain`` in place, *unscaled* by the upstream gradient ``g`` (``chain`` =
   ``(1 − tanh²(u/c))·logit_scale``), and writes fp32 column sums of ``g·s`` for ``dbias``.

Why ``s`` is stored unscaled: at the HaF loss's real upstream gradient (α·β·σ/B ≈ 1e-4) ``g·p`` of a softmax entry
of ~1/V falls below fp16's smallest subnormal; ``s`` does not. ``g`` enters in fp32: ``dH``'s rows are scaled after
the GEMM (its output is fp32 on CUDA, or upcast), and the dW GEMM gets ``H`` rows scaled by ``g`` — by ``g/gmax``
for fp16 (then ``gmax`` scales the product), since ``g·h`` itself may underflow fp16; bf16 has fp32's exponent
range and fp32/fp64 need no rescaling.

Kept dtype: fp32 for fp32 inputs, fp64 for fp64, the input dtype for fp16/bf16 (half the memory and traffic of
fp32; the logits are rounded once to the input dtype, as an eager ``lm_head`` in that dtype rounds them, before
the fp32 softmax). What that costs, measured in the interpreter on fp16 inputs against float64 (n = 64, V = 2048,
logits up to |22|): log-probs 1.1e-4 relative error (the recompute kernels, which never round the logits: 5e-8),
dH / dW 5.4e-4 (recompute: 2–3e-4) — the same as plain PyTorch in fp16. bf16 rounds 8× coarser.

Gradient filtering (``HAF_GRAD_FILTER``) applies to the recompute backward only: the vendor GEMMs here always do
the full work. Chunks come from ``logprobs.pair_chunks`` (``HAF_KEEP_CHUNK_MB``); on a GPU they must hold thousands
of tokens or the fp32 dW read-modify-write per chunk dominates (``benchmarks/roofline_triton.md``).

Plain PyTorch equivalent::

    z = (hidden @ weight.T + bias) * logit_scale; z = softcap * tanh(z / softcap)
    lse = z.float().logsumexp(-1); logp = z.gather(-1, labels[:, None])[:, 0] - lse
    s = (onehot(labels) - (z - lse[:, None]).exp()) * (1 - (z / softcap) ** 2) * logit_scale
    dhidden, dweight, dbias = (g[:, None] * s) @ weight, (g[:, None] * s).T @ hidden, (g[:, None] * s).sum(0)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ...options import LogprobOptions, compute_dtype
from ._common import (
    _head_transform,
    _online_lse_step,
    _store_split_partials,
    combine_partials,
    device_guard,
    interpreting,
    lse_hi_lo,
    num_sms,
)


@dataclass(frozen=True)
class RowTiles:
    """Tiles of the two row kernels: ``block_r`` rows × ``block_v`` columns, ``num_warps``."""

    block_r: int
    block_v: int
    num_warps: int


_GPU_ROW_TILES = RowTiles(8, 512, 4)  # 4096 elements per tile: 8 rows of 1 KiB (bf16) per load, coalesced
_INTERPRETER_ROW_TILES = RowTiles(4, 32, 1)  # tiny: several tiles and masked edges even on test shapes


def row_tiles(device: torch.device) -> RowTiles:
    """Row-kernel tiles for ``device`` (tiny ones in the interpreter)."""
    return _INTERPRETER_ROW_TILES if interpreting() or device.type != "cuda" else _GPU_ROW_TILES


@triton.jit
def keep_lse_kernel(
    z_ptr,  # [n, V] kept raw logits h·Wᵀ (+ b), contiguous; read only
    y_ptr,  # [n] labels
    max_ptr,  # [S, n] out: running max of each split
    sum_ptr,  # [S, n] out: sum of exp(z - max) of each split
    tgt_ptr,  # [S, n] out: target logit if it lies in the split, else 0
    n,
    V,
    v_per_split,
    ignore_index,
    logit_scale,
    softcap,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    IS_FP64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n
    y = tl.load(y_ptr + rows, mask=row_ok, other=ignore_index)
    acc_ty = tl.float64 if IS_FP64 else tl.float32
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=acc_ty)
    s_i = tl.zeros([BLOCK_R], dtype=acc_ty)
    t_i = tl.zeros([BLOCK_R], dtype=acc_ty)
    v_lo = pid_s * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)
    row_off = rows.to(tl.int64)[:, None] * V
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_hi
        mask = row_ok[:, None] & col_ok[None, :]
        ptrs = z_ptr + row_off + cols[None, :]
        z, _ = _head_transform(
            tl.load(ptrs, mask=mask, other=0.0).to(acc_ty), logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP
        )
        m_i, s_i, t_i = _online_lse_step(m_i, s_i, t_i, z, cols, col_ok, y)
    # a split with no columns (or a masked row) reports (max 0, sumexp 0): neutral for the combine
    _store_split_partials(max_ptr, sum_ptr, tgt_ptr, pid_s * n + rows, row_ok, m_i, s_i, t_i, 0.0)


@triton.jit
def keep_grad_kernel(
    z_ptr,  # [n, V] kept raw logits, overwritten with s = (onehot - p)·chain
    y_ptr,  # [n] labels
    lse_ptr,  # [2, n] log-sum-exp as hi (row 0) + lo (row 1), fp32 / fp64 (lse_hi_lo)
    g_ptr,  # [n] upstream gradient (HAS_BIAS only: column sums of g·s)
    dbp_ptr,  # [R, V] out: fp32 column sums of g·s per row split (HAS_BIAS only)
    n,
    V,
    n_row_splits,
    ignore_index,
    logit_scale,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    IS_FP64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    pid_v = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    acc_ty = tl.float64 if IS_FP64 else tl.float32
    col_sum = tl.zeros([BLOCK_V], dtype=acc_ty)
    for r0 in range(pid_s * BLOCK_R, n, n_row_splits * BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < n
        y = tl.load(y_ptr + rows, mask=row_ok, other=ignore_index)
        live = row_ok & (y != ignore_index)
        hi = tl.load(lse_ptr + rows, mask=row_ok, other=0.0).to(acc_ty)
        lo = tl.load(lse_ptr + n + rows, mask=row_ok, other=0.0).to(acc_ty)
        mask = row_ok[:, None] & col_ok[None, :]
        ptrs = z_ptr + rows.to(tl.int64)[:, None] * V + cols[None, :]
        z, zc = _head_transform(
            tl.load(ptrs, mask=mask, other=0.0).to(acc_ty), logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP
        )
        s = (cols[None, :] == y[:, None]).to(acc_ty) - tl.exp((z - hi[:, None]) - lo[:, None])
        if HAS_SOFTCAP:
            s = s * (1.0 - zc * zc)  # d(c·tanh(u/c))/du from the unrounded tanh, in fp32
        if HAS_SCALE:
            s = s * logit_scale
        s = tl.where(live[:, None], s, 0.0)
        tl.store(ptrs, s.to(z_ptr.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            g = tl.load(g_ptr + rows, mask=live, other=0.0).to(acc_ty)
            col_sum += tl.sum(g[:, None] * s, axis=0)
    if HAS_BIAS:
        tl.store(dbp_ptr + pid_s * V + cols, col_sum, mask=col_ok)


def keep_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the kept logits: the input dtype for fp16/bf16, fp32 for fp32, fp64 for fp64."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else compute_dtype(dtype)


def _out_dtype_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(..., out_dtype=torch.float32)`` applies: half inputs on CUDA (cuBLAS, fp32 output)."""
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and not _NO_OUT_DTYPE


_NO_OUT_DTYPE: list[bool] = []  # set once when this torch's CUDA mm rejects out_dtype (then: upcast after)


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a · b`` with an fp32 (fp64 for fp64) result: cuBLAS's fp32 output for half inputs on CUDA, else upcast."""
    if _out_dtype_ok(a.device, a.dtype):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):
            _NO_OUT_DTYPE.append(True)
    return torch.mm(a, b).to(compute_dtype(a.dtype))


_SLICE_BYTES = 256 << 20  # temporary of the fallback dW accumulation (half output, then added in fp32)


def _addmm_acc_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``acc += alpha · a · b`` in place, ``acc`` fp32/fp64 and ``a``, ``b`` possibly half: one GEMM.

    Same dtype: ``addmm_``. Half inputs on CUDA: ``torch.addmm(..., out_dtype=float32, out=acc)`` (cuBLAS reads and
    writes the fp32 accumulator in its epilogue). Otherwise the product is made in the inputs' dtype over row slices
    of at most ``_SLICE_BYTES`` and added (the same GEMM work, split)."""
    if a.dtype == acc.dtype:
        return acc.addmm_(a, b, alpha=alpha)
    if _out_dtype_ok(acc.device, a.dtype):
        try:
            return torch.addmm(acc, a, b, out_dtype=acc.dtype, alpha=alpha, out=acc)
        except (RuntimeError, TypeError, NotImplementedError):
            _NO_OUT_DTYPE.append(True)
    rows = max(1, _SLICE_BYTES // max(1, b.shape[1] * a.element_size()))
    for r0 in range(0, a.shape[0], rows):
        acc[r0 : r0 + rows].add_(torch.mm(a[r0 : r0 + rows], b), alpha=alpha)
    return acc


def _lse_splits(n_row_blocks: int, n_vtiles: int, device: torch.device) -> int:
    """Vocab splits of ``keep_lse_kernel`` so that row blocks × splits covers the GPU ~4× (1 off CUDA)."""
    if device.type != "cuda" or interpreting():
        return 1
    return max(1, min(n_vtiles, triton.cdiv(4 * num_sms(device), n_row_blocks)))


def _row_splits(n_row_blocks: int, n_vtiles: int, device: torch.device) -> int:
    """Row splits of ``keep_grad_kernel`` so that vocab tiles × splits covers the GPU ~4× (2 in the interpreter,
    so the split combine is exercised)."""
    if device.type != "cuda" or interpreting():
        return min(2, n_row_blocks)
    return max(1, min(n_row_blocks, triton.cdiv(4 * num_sms(device), n_vtiles)))


def keep_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    opts: LogprobOptions,
    *,
    tiles: RowTiles | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logp [n], lse [n], z [n, V])``: one GEMM makes the logits, ``keep_lse_kernel`` the rest.

    ``hidden [n, D]``, ``weight [V, D]`` (same dtype), ``labels [n]``, ``bias [V]``. ``logp`` fp32 (fp64 for fp64),
    0 where ``labels == ignore_index``; ``lse`` float64 (see :func:`combine_partials`); ``z`` holds the raw logits
    ``h·Wᵀ + b`` (before scale and softcap) in :func:`keep_dtype` for :func:`keep_backward` (which overwrites it).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [N, D] and weight [V, D]; got {list(hidden.shape)} and {list(weight.shape)}")
    if labels.shape != (hidden.shape[0],):
        raise ValueError(f"labels must be [N] = [{hidden.shape[0]}], got {list(labels.shape)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden and weight must share a dtype, got {hidden.dtype} and {weight.dtype}")
    n, vocab = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    acc = compute_dtype(hidden.dtype)
    kd = keep_dtype(hidden.dtype)  # == hidden.dtype for every supported dtype: no copy of hidden or weight
    h, w = hidden.to(kd), weight.to(kd)
    z = torch.mm(h, w.T) if bias is None else torch.addmm(bias.to(kd), h, w.T)  # bias in the GEMM epilogue
    if n == 0:
        return torch.zeros(0, dtype=acc, device=dev), torch.zeros(0, dtype=torch.float64, device=dev), z
    t = tiles or row_tiles(dev)
    labels = labels.contiguous()
    n_rb = triton.cdiv(n, t.block_r)
    splits = _lse_splits(n_rb, triton.cdiv(vocab, t.block_v), dev)
    v_per_split = triton.cdiv(triton.cdiv(vocab, splits), t.block_v) * t.block_v
    splits = triton.cdiv(vocab, v_per_split)
    part = torch.empty(3, splits, n, dtype=acc, device=dev)
    with device_guard(dev):
        keep_lse_kernel[(n_rb, splits)](
            z,
            labels,
            part[0],
            part[1],
            part[2],
            n,
            vocab,
            v_per_split,
            opts.ignore_index,
            float(opts.logit_scale),
            1.0 if opts.softcap is None else float(opts.softcap),
            HAS_SCALE=opts.logit_scale != 1.0,
            HAS_SOFTCAP=opts.softcap is not None,
            IS_FP64=acc == torch.float64,
            BLOCK_R=t.block_r,
            BLOCK_V=t.block_v,
            num_warps=t.num_warps,
        )
    logp, lse = combine_partials(part, labels, opts.ignore_index, acc)
    return logp, lse, z


def keep_backward(
    z: torch.Tensor,
    grad_logp: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    opts: LogprobOptions,
    needs: tuple[bool, bool, bool] = (True, True, True),
    dw_acc: torch.Tensor | None = None,
    db_acc: torch.Tensor | None = None,
    *,
    tiles: RowTiles | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients from the logits ``z [n, V]`` kept by :func:`keep_forward` (overwritten): ``keep_grad_kernel`` then
    two GEMMs.

    Returns ``dhidden [n, D]`` in ``hidden``'s dtype, ``dweight [V, D]`` and ``dbias [V]`` in the accumulation dtype
    (fp32; fp64 for fp64), ``None`` where ``needs`` says so. With ``dw_acc`` / ``db_acc`` (contiguous
    accumulation-dtype buffers) the chunk's dW / db are added into them in place and they are returned.
    """
    n, d = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    acc = compute_dtype(hidden.dtype)
    need_h, need_w, need_b = needs
    need_b = need_b and bias is not None
    if need_w and dw_acc is None:
        dw_acc = torch.zeros(vocab, d, dtype=acc, device=dev)
    if need_b and db_acc is None:
        db_acc = torch.zeros(vocab, dtype=acc, device=dev)
    if n == 0 or not (need_h or need_w or need_b):
        dh = torch.zeros(n, d, dtype=hidden.dtype, device=dev) if need_h else None
        return dh, dw_acc if need_w else None, db_acc if need_b else None
    t = tiles or row_tiles(dev)
    labels = labels.contiguous()
    valid = labels != opts.ignore_index
    g = torch.where(valid, grad_logp.to(acc), torch.zeros((), dtype=acc, device=dev)).contiguous()
    n_rb = triton.cdiv(n, t.block_r)
    n_vt = triton.cdiv(vocab, t.block_v)
    row_splits = _row_splits(n_rb, n_vt, dev)
    dbp = torch.empty(row_splits, vocab, dtype=acc, device=dev) if need_b else g
    with device_guard(dev):
        keep_grad_kernel[(n_vt, row_splits)](
            z,
            labels,
            lse_hi_lo(lse, acc),
            g,
            dbp,
            n,
            vocab,
            row_splits,
            opts.ignore_index,
            float(opts.logit_scale),
            1.0 if opts.softcap is None else float(opts.softcap),
            HAS_BIAS=need_b,
            HAS_SCALE=opts.logit_scale != 1.0,
            HAS_SOFTCAP=opts.softcap is not None,
            IS_FP64=acc == torch.float64,
            BLOCK_R=t.block_r,
            BLOCK_V=t.block_v,
            num_warps=t.num_warps,
        )
    s = z  # now (onehot − p)·chain, unscaled by g
    if need_b:
        db_acc.add_(dbp.sum(dim=0))
    kd = z.dtype
    dh = None
    if need_h:
        dh = _mm_f32(s, weight.to(kd)).mul_(g[:, None]).to(hidden.dtype)
    if need_w:
        if kd == torch.float16:
            # g·h may underflow fp16 (g ~ 1e-4 and below): scale the rows by g / gmax ≤ 1 instead, gmax after.
            gmax = float(g.abs().max().clamp_min(torch.finfo(acc).tiny))
            hs = (hidden.to(acc) * (g / gmax)[:, None]).to(kd)
            _addmm_acc_(dw_acc, s.T, hs, alpha=gmax)
        else:
            _addmm_acc_(dw_acc, s.T, (hidden.to(acc) * g[:, None]).to(kd))
    return dh, dw_acc if need_w else None, db_acc if need_b else None
