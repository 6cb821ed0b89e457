"""Backward of ``linear_logprobs`` in Triton: recompute logits per tile, then dH and dW as two GEMMs.

Plain PyTorch equivalent (for ``dz [N, V]``, which is only ever held one vocab chunk at a time)::

    p = (z - lse[:, None]).exp()                           # z: the forward's (scaled, soft-capped) logits
    dz = g[:, None] * (onehot(labels) - p)                 # g = dL/dlogp, 0 on ignored tokens
    dz = dz * (1 - (z / softcap) ** 2) * logit_scale       # chain rule of softcap and scale
    dhidden, dweight, dbias = dz @ weight, dz.T @ hidden, dz.sum(0)

Three kernels per vocab chunk ``[v0, v0 + C)`` (``C`` chosen so the chunk of ``dz`` fits the chunk budget: on CUDA
1/8 of the free device memory, 512 MiB to 4 GiB; 64 MiB off CUDA; ``HAF_TRITON_DZ_MB`` sets it; at least 2048
columns; ``chunk_vocab`` overrides; see :func:`dz_vocab_chunk`):

1. ``linear_logprobs_bwd_dlogits_kernel`` — grid token tiles × vocab tiles of the chunk (grouped order):
   recomputes the logits tile (``tl.dot`` over D), forms ``s = (onehot − p)·chain`` in fp32 and writes it in the
   input dtype (fp32 for fp32 inputs), *unscaled* by ``g``: at the loss's real upstream gradient (α·β·σ/B ≈ 1e-4)
   ``g·p`` falls below fp16's smallest subnormal, while ``s`` does not. It writes per-tile column sums of ``g·s``
   for ``dbias`` (fp32, summed over token tiles by torch). With gradient filtering it also writes a flag per tile:
   0 when every ``|s|`` is at most the threshold (the tile is then not stored and the two GEMMs below skip it).
   Torch turns the flags into lists of kept tiles (``kept_tile_lists``: per token tile its kept vocab tiles, per
   vocab tile its kept token tiles), so each GEMM's K loop runs over exactly its kept tiles with no branch inside
   (Triton can pipeline it), as Cut Cross-Entropy's filtering skips tiles.
2. ``linear_logprobs_bwd_dh_kernel`` — grid token tiles × D tiles (grouped order), loop over the chunk's
   vocab: ``acc[rows, d] (+)= s[rows, chunk] · W[chunk, d]``; fp32 accumulator in registers, added to an fp32
   ``[N, D]`` buffer between chunks; after the last chunk ``dH = g[rows] · acc`` in fp32, cast once to the input
   dtype (written directly when there is a single chunk).
3. ``linear_logprobs_bwd_dw_kernel`` — grid (vocab tiles of the chunk, D tiles), loop over all tokens:
   ``dW[chunk, d] = gmax · s[:, chunk]ᵀ · ((g/gmax) ⊙ H)[:, d]`` (the H tile is scaled by ``g/gmax ≤ 1`` in fp32
   before the product, so its operands stay in range); each dW element is owned by one program and finished in
   one pass (fp32 in registers, cast once), so no fp32 ``[V, D]`` buffer and no atomics.

Why this dW strategy: accumulating dW with atomics (or read-modify-write) inside the logits kernel costs
``N·V·D / BLOCK_N`` fp32 memory updates — bandwidth-bound by several times at LLM sizes unless most tiles
are filtered away — and makes gradients run-to-run nondeterministic. Materialising one vocab chunk of
``dz`` (``N × C`` elements) turns dH and dW into ordinary register-accumulated GEMMs with a deterministic
reduction order, for 3 GEMMs in the backward (recompute, dH, dW) and O(N·C + N·D) extra memory.
Chunking over the vocabulary (rather than tokens) works because ``lse`` from the forward makes each
vocab slice of the softmax independent, and lets dW be written once per element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import memory
from ...options import LogprobOptions, compute_dtype
from ._common import (
    Tiles,
    _grouped_pid,
    _logits_tile,
    device_guard,
    dot_precision,
    group_rows,
    lse_hi_lo,
    require_dot_dtype,
    tiles_for,
)


@triton.jit
def linear_logprobs_bwd_dlogits_kernel(
    h_ptr,  # [N, D] hidden (strided)
    w_ptr,  # [V, D] weight (strided)
    b_ptr,  # [V] bias
    y_ptr,  # [N] labels
    g_ptr,  # [N] upstream gradient dL/dlogp
    lse_ptr,  # [2, N] log-sum-exp from the forward as hi (row 0) + lo (row 1) (lse_hi_lo)
    dz_ptr,  # [N, C] out: dL/d(raw logits) of this chunk, in the GEMM dtype
    dbp_ptr,  # [token tiles, C] out: fp32 column sums of dz per token tile (for dbias)
    flag_ptr,  # [token tiles, vocab tiles of C] out: 1 if the tile has any |dz| > threshold (FILTER only)
    N,
    V,
    D,
    v_start,
    chunk,  # C: row stride of dz and dbp
    n_flag_cols,
    n_vtiles,  # vocab tiles in this chunk (grid columns)
    group,
    stride_hn,
    stride_hd,
    stride_wv,
    stride_wd,
    ignore_index,
    logit_scale,
    softcap,
    threshold,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    IS_FP64: tl.constexpr,
    FILTER: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n, pid_v = _grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_N), n_vtiles, group)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = v_start + local
    row_ok = rows < N
    col_ok = (local < chunk) & (cols < V)
    y = tl.load(y_ptr + rows, mask=row_ok, other=ignore_index)
    live = row_ok & (y != ignore_index)
    g = tl.load(g_ptr + rows, mask=live, other=0.0)
    hi = tl.load(lse_ptr + rows, mask=live, other=0.0)
    lo = tl.load(lse_ptr + N + rows, mask=live, other=0.0)
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
    p = tl.exp((z - hi.to(z.dtype)[:, None]) - lo.to(z.dtype)[:, None])
    onehot = (cols[None, :] == y[:, None]).to(z.dtype)
    dz = onehot - p  # s: dL/d(raw logits) / g, stored unscaled (g is applied in fp32 by the GEMM kernels)
    if HAS_SOFTCAP:
        zc = z / softcap
        dz = dz * (1.0 - zc * zc)
    if HAS_SCALE:
        dz = dz * logit_scale
    ok = live[:, None] & col_ok[None, :]
    dz = tl.where(ok, dz, 0.0)

    tl.store(dbp_ptr + pid_n * chunk + local, tl.sum(g.to(z.dtype)[:, None] * dz, axis=0), mask=col_ok)
    dz_out = dz_ptr + rows.to(tl.int64)[:, None] * chunk + local[None, :]
    if FILTER:
        keep = tl.max(tl.max(tl.abs(dz), axis=1), axis=0) > threshold
        tl.store(flag_ptr + pid_n * n_flag_cols + pid_v, keep.to(tl.int8))
        if keep:
            tl.store(dz_out, dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    else:
        tl.store(dz_out, dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _dh_tile_step(
    acc, a_row, w_ptr, k, k_ok, row_ok, dd, d_ok, v_start, stride_wv, stride_wd, DOT_PRECISION: tl.constexpr
):
    """``acc += dz[rows, k] · W[v_start + k, dd]`` for one K tile of the dH GEMM."""
    a = tl.load(a_row + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    w = tl.load(
        w_ptr + (v_start + k).to(tl.int64)[:, None] * stride_wv + dd.to(tl.int64)[None, :] * stride_wd,
        mask=k_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    return tl.dot(a, w, acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)


@triton.jit
def _dw_tile_step(
    acc,
    dz_ptr,
    h_ptr,
    gn_ptr,
    tok,
    t_ok,
    local,
    v_ok,
    dd,
    d_ok,
    chunk,
    stride_hn,
    stride_hd,
    DOT_PRECISION: tl.constexpr,
):
    """``acc += s[tok, local]ᵀ · ((g/gmax) ⊙ H)[tok, dd]`` for one token tile of the dW GEMM."""
    a = tl.load(
        dz_ptr + tok.to(tl.int64)[None, :] * chunk + local[:, None],
        mask=v_ok[:, None] & t_ok[None, :],
        other=0.0,
    )
    h = tl.load(
        h_ptr + tok.to(tl.int64)[:, None] * stride_hn + dd.to(tl.int64)[None, :] * stride_hd,
        mask=t_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    gn = tl.load(gn_ptr + tok, mask=t_ok, other=0.0)
    h = (h.to(acc.dtype) * gn.to(acc.dtype)[:, None]).to(h_ptr.dtype.element_ty)
    return tl.dot(a, h, acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)


@triton.jit
def linear_logprobs_bwd_dh_kernel(
    dz_ptr,  # [N, C] dlogits of the chunk (contiguous, row stride C)
    w_ptr,  # [V, D] weight (strided)
    acc_ptr,  # [N, D] fp32 running dH (read if ACCUMULATE, written unless FINAL)
    out_ptr,  # [N, D] dH in the input dtype (written if FINAL)
    list_ptr,  # [token tiles, list_stride] int32: kept vocab tiles of each token tile, in order (FILTER only)
    cnt_ptr,  # [token tiles] int32: how many (FILTER only)
    g_ptr,  # [N] upstream gradient, applied per row at FINAL (fp32 / fp64)
    N,
    D,
    v_start,
    width,  # valid columns of this chunk
    chunk,
    list_stride,
    group,
    stride_wv,
    stride_wd,
    ACCUMULATE: tl.constexpr,
    FINAL: tl.constexpr,
    FILTER: tl.constexpr,
    IS_FP64: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n, pid_d = _grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(D, BLOCK_D), group)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = rows < N
    d_ok = dd < D
    out_off = rows.to(tl.int64)[:, None] * D + dd[None, :]
    out_mask = row_ok[:, None] & d_ok[None, :]
    if ACCUMULATE:
        acc = tl.load(acc_ptr + out_off, mask=out_mask, other=0.0)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float64 if IS_FP64 else tl.float32)
    a_row = dz_ptr + rows.to(tl.int64)[:, None] * chunk
    if FILTER:  # walk this token tile's list of kept vocab tiles: no branch inside the (pipelined) K loop
        for i in range(0, tl.load(cnt_ptr + pid_n)):
            kt = tl.load(list_ptr + pid_n * list_stride + i)
            k = kt * BLOCK_K + offs_k
            acc = _dh_tile_step(
                acc, a_row, w_ptr, k, k < width, row_ok, dd, d_ok, v_start, stride_wv, stride_wd, DOT_PRECISION
            )
    else:
        for kt in range(0, tl.cdiv(width, BLOCK_K)):
            k = kt * BLOCK_K + offs_k
            acc = _dh_tile_step(
                acc, a_row, w_ptr, k, k < width, row_ok, dd, d_ok, v_start, stride_wv, stride_wd, DOT_PRECISION
            )
    if FINAL:
        g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
        acc = acc * g.to(acc.dtype)[:, None]
        tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(acc_ptr + out_off, acc, mask=out_mask)


@triton.jit
def linear_logprobs_bwd_dw_kernel(
    dz_ptr,  # [N, C] dlogits of the chunk (contiguous, row stride C)
    h_ptr,  # [N, D] hidden (strided)
    out_ptr,  # [V, D] dW in the input dtype (contiguous); rows v_start .. v_start+width written
    list_ptr,  # [vocab tiles of C, list_stride] int32: kept token tiles of each vocab tile, in order (FILTER only)
    cnt_ptr,  # [vocab tiles of C] int32: how many (FILTER only)
    gn_ptr,  # [N] g / gmax (|·| ≤ 1)
    gmax_ptr,  # [1] gmax = max |g| (fp32 / fp64)
    N,
    D,
    v_start,
    width,
    chunk,
    list_stride,
    stride_hn,
    stride_hd,
    FILTER: tl.constexpr,
    IS_FP64: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_v = tl.program_id(0)
    pid_d = tl.program_id(1)
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    v_ok = local < width
    d_ok = dd < D
    acc = tl.zeros([BLOCK_V, BLOCK_D], dtype=tl.float64 if IS_FP64 else tl.float32)
    if FILTER:  # walk this vocab tile's list of kept token tiles: no branch inside the (pipelined) K loop
        for i in range(0, tl.load(cnt_ptr + pid_v)):
            kt = tl.load(list_ptr + pid_v * list_stride + i)
            tok = kt * BLOCK_K + offs_k
            acc = _dw_tile_step(
                acc, dz_ptr, h_ptr, gn_ptr, tok, tok < N, local, v_ok, dd, d_ok, chunk, stride_hn, stride_hd,
                DOT_PRECISION,
            )  # fmt: skip
    else:
        for kt in range(0, tl.cdiv(N, BLOCK_K)):
            tok = kt * BLOCK_K + offs_k
            acc = _dw_tile_step(
                acc, dz_ptr, h_ptr, gn_ptr, tok, tok < N, local, v_ok, dd, d_ok, chunk, stride_hn, stride_hd,
                DOT_PRECISION,
            )  # fmt: skip
    acc = acc * tl.load(gmax_ptr).to(acc.dtype)
    out_off = (v_start + local).to(tl.int64)[:, None] * D + dd[None, :]
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=v_ok[:, None] & d_ok[None, :])


def kept_tile_lists(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``flags [R, C]`` (non-zero: keep), the kept column indices first, in increasing order, and their
    count: ``(lists [R, C] int32, counts [R] int32)``. Built on the device with a stable sort (no host sync), once per
    chunk, so the GEMM kernels loop over exactly the kept tiles instead of branching on a flag per K step."""
    keep = flags != 0
    counts = keep.sum(dim=1, dtype=torch.int32)
    lists = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices.to(torch.int32)
    return lists.contiguous(), counts.contiguous()


def grad_filter_threshold(opts: LogprobOptions) -> float | None:
    """Gradient-filtering threshold: ``opts.tuning.grad_filter`` (``HAF_GRAD_FILTER``), ``None`` when 0 (the
    default: off). A tile whose ``|onehot − p|`` (before the upstream gradient) are all at most the threshold is
    skipped by both GEMMs.
    """
    value = opts.tuning.grad_filter
    return float(value) if value > 0 else None


_MIN_CHUNK = 2048  # below this the fp32 dH read-modify-write between chunks (8·N·D bytes) starts to dominate


def dz_budget_bytes(free_bytes: int | None, dz_mb: int | None = None) -> int:
    """Bytes one vocab chunk of ``dz`` may take: ``dz_mb`` (``HAF_TRITON_DZ_MB``) when set, else
    ``haf_kernels.memory.budget_bytes`` of ``free_bytes`` (1/8 of free CUDA memory, 512 MiB to 4 GiB, at most half
    of it; 64 MiB off CUDA)."""
    return memory.budget_bytes(free_bytes, dz_mb)


def dz_vocab_chunk(
    n: int,
    vocab: int,
    elem_bytes: int,
    block_v: int,
    *,
    free_bytes: int | None,
    dz_mb: int | None = None,
    chunk_vocab: int | None = None,
) -> int:
    """Vocab columns of ``dz [n, C]`` held at once by the backward (a pure function of its arguments).

    ``chunk_vocab`` (``HAF_CHUNK_VOCAB``) if set; else the columns that fit :func:`dz_budget_bytes` (``n·elem_bytes``
    per column), but at least ``_MIN_CHUNK``: each chunk costs one fp32 read+write of the ``[N, D]`` dH accumulator
    against ``6·N·C·D`` flops, so ``C ≥ 2048`` keeps that traffic to a fraction of the GEMM time (``C ≥ 16384``:
    ~2% on an H100). Rounded down to whole ``block_v`` tiles (at least one), at most the whole vocabulary.
    """
    if chunk_vocab:
        c = chunk_vocab
    else:
        c = max(dz_budget_bytes(free_bytes, dz_mb) // max(1, n * elem_bytes), _MIN_CHUNK)
    c = max(block_v, (c // block_v) * block_v)
    return min(c, triton.cdiv(vocab, block_v) * block_v)


def _vocab_chunk(n: int, vocab: int, elem_bytes: int, block_v: int, opts: LogprobOptions, device: torch.device) -> int:
    """:func:`dz_vocab_chunk` for ``opts`` (``chunk_vocab``, ``HAF_TRITON_DZ_MB``) and the free memory of ``device``."""
    chunk_vocab = opts.vocab_tile()
    free = None if chunk_vocab or opts.tuning.triton_dz_mb is not None else memory.free_device_bytes(device)
    return dz_vocab_chunk(
        n, vocab, elem_bytes, block_v, free_bytes=free, dz_mb=opts.tuning.triton_dz_mb, chunk_vocab=chunk_vocab
    )


def linear_logprobs_bwd(
    grad_logp: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    opts: LogprobOptions,
    needs: tuple[bool, bool, bool] = (True, True, True),
    *,
    grad_filter: float | None = None,
    tiles: Tiles | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients ``(dhidden [N, D], dweight [V, D], dbias [V])`` for an upstream ``grad_logp [N]``.

    ``lse [N]`` comes from ``linear_logprobs_fwd``. Ignored tokens (``labels == ignore_index``) get zero
    gradient. Results are in the inputs' dtypes, ``None`` where ``needs`` says so (or ``bias`` is None).
    ``grad_filter`` (default: :func:`grad_filter_threshold`) skips tiles whose ``|onehot − p|`` (times the
    softcap/scale chain) are all below it: a threshold relative to the softmax, independent of the loss scale.
    """
    require_dot_dtype(hidden.dtype)
    n, d = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    need_h, need_w, need_b = needs
    need_b = need_b and bias is not None
    acc_dtype = compute_dtype(hidden.dtype)
    if n == 0 or not (need_h or need_w or need_b):
        return (
            torch.zeros(n, d, dtype=hidden.dtype, device=dev) if need_h else None,
            torch.zeros(vocab, d, dtype=weight.dtype, device=dev) if need_w else None,
            torch.zeros(vocab, dtype=bias.dtype, device=dev) if need_b else None,
        )
    # every element of these is written by the kernels below (dH by the last chunk, dW/db once per chunk)
    dh = torch.empty(n, d, dtype=hidden.dtype, device=dev) if need_h else None
    dw = torch.empty(vocab, d, dtype=weight.dtype, device=dev) if need_w else None
    db = torch.empty(vocab, dtype=bias.dtype, device=dev) if need_b else None

    threshold = grad_filter if grad_filter is not None else grad_filter_threshold(opts)
    use_filter = threshold is not None and threshold > 0
    t = tiles or tiles_for(hidden.dtype, dev, opts.tuning)
    labels = labels.contiguous()
    g = grad_logp.to(acc_dtype).contiguous()
    # dW's H tiles are scaled by g / gmax (≤ 1 in magnitude), the product by gmax (no host sync)
    gmax = g.abs().amax().clamp_min(torch.finfo(acc_dtype).tiny).reshape(1)
    gn = (g / gmax).contiguous()
    lse_hl = lse_hi_lo(lse, acc_dtype)
    bias_c = None if bias is None else bias.contiguous()
    is_fp64 = hidden.dtype == torch.float64
    prec = dot_precision(hidden.dtype, opts.tuning)
    softcap = 1.0 if opts.softcap is None else float(opts.softcap)
    gemm_dtype = hidden.dtype  # dz is stored in the inputs' dtype so both GEMMs run on tensor cores

    n_tt = triton.cdiv(n, t.block_n)
    chunk = _vocab_chunk(n, vocab, gemm_dtype.itemsize, t.block_v, opts, dev)
    n_chunks = triton.cdiv(vocab, chunk)
    n_vt = chunk // t.block_v
    dz = torch.empty(n, chunk, dtype=gemm_dtype, device=dev)
    dbp = torch.empty(n_tt, chunk, dtype=acc_dtype, device=dev)
    flags = torch.empty(n_tt, n_vt, dtype=torch.int8, device=dev) if use_filter else dbp
    dh_acc = torch.empty(n, d, dtype=acc_dtype, device=dev) if (need_h and n_chunks > 1) else None

    with device_guard(dev):
        for ci in range(n_chunks):
            v_start = ci * chunk
            width = min(chunk, vocab - v_start)
            n_cols = triton.cdiv(width, t.block_v)
            linear_logprobs_bwd_dlogits_kernel[(n_tt * n_cols,)](
                hidden,
                weight,
                bias_c if bias_c is not None else hidden,
                labels,
                g,
                lse_hl,
                dz,
                dbp,
                flags,
                n,
                vocab,
                d,
                v_start,
                chunk,
                n_vt,
                n_cols,
                group_rows(n_tt, n_cols, dev, opts.tuning),
                hidden.stride(0),
                hidden.stride(1),
                weight.stride(0),
                weight.stride(1),
                opts.ignore_index,
                float(opts.logit_scale),
                softcap,
                float(threshold) if use_filter else 0.0,
                HAS_BIAS=bias is not None,
                HAS_SCALE=opts.logit_scale != 1.0,
                HAS_SOFTCAP=opts.softcap is not None,
                IS_FP64=is_fp64,
                FILTER=use_filter,
                DOT_PRECISION=prec,
                BLOCK_N=t.block_n,
                BLOCK_V=t.block_v,
                BLOCK_D=t.block_d,
                num_warps=t.num_warps,
                num_stages=t.num_stages,
            )
            if need_b:
                db[v_start : v_start + width] = dbp[:, :width].sum(dim=0).to(db.dtype)
            if use_filter:  # this chunk's flags [token tiles, n_cols] → kept-tile lists for each GEMM
                dh_list, dh_cnt = kept_tile_lists(flags[:, :n_cols])
                dw_list, dw_cnt = kept_tile_lists(flags[:, :n_cols].T)
            else:
                dh_list = dh_cnt = dw_list = dw_cnt = flags  # unused dummies
            if need_h:
                final = ci == n_chunks - 1
                n_dt = triton.cdiv(d, t.block_d_out)
                linear_logprobs_bwd_dh_kernel[(n_tt * n_dt,)](
                    dz,
                    weight,
                    dh_acc if dh_acc is not None else dh,
                    dh,
                    dh_list,
                    dh_cnt,
                    g,
                    n,
                    d,
                    v_start,
                    width,
                    chunk,
                    n_cols,
                    group_rows(n_tt, n_dt, dev, opts.tuning),
                    weight.stride(0),
                    weight.stride(1),
                    ACCUMULATE=ci > 0,
                    FINAL=final,
                    FILTER=use_filter,
                    IS_FP64=is_fp64,
                    DOT_PRECISION=prec,
                    BLOCK_N=t.block_n,
                    BLOCK_K=t.block_v,
                    BLOCK_D=t.block_d_out,
                    num_warps=t.num_warps,
                    num_stages=t.num_stages,
                )
            if need_w:
                linear_logprobs_bwd_dw_kernel[(triton.cdiv(width, t.block_v), triton.cdiv(d, t.block_d_out))](
                    dz,
                    hidden,
                    dw,
                    dw_list,
                    dw_cnt,
                    gn,
                    gmax,
                    n,
                    d,
                    v_start,
                    width,
                    chunk,
                    n_tt,
                    hidden.stride(0),
                    hidden.stride(1),
                    FILTER=use_filter,
                    IS_FP64=is_fp64,
                    DOT_PRECISION=prec,
                    BLOCK_V=t.block_v,
                    BLOCK_K=t.block_n,
                    BLOCK_D=t.block_d_out,
                    num_warps=t.num_warps,
                    num_stages=t.num_stages,
                )
    return dh, dw, db
