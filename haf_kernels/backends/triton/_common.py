"""Pieces shared by the Triton kernels: the logits-tile helpers (``_logits_tile``; ``_head_transform``, the
scale / softcap of a tile; ``_online_lse_step``, the running max / sum-exp / target update;
``_store_split_partials``, a split's partials) and the tile-size table.

Tile sizes come from a small table keyed by GPU architecture (sm90, sm80, default) and input dtype; the
interpreter (``TRITON_INTERPRET=1``) gets tiny tiles so CPU tests stay fast and exercise the masks.
``HAF_AUTOTUNE=1`` lets the forward kernel autotune over a few configs instead (never in the interpreter).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ...tuning import Tuning
from ..torch_chunked import lse_split


def interpreting() -> bool:
    """Whether kernels run under the Triton CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def autotune_requested(tuning: Tuning) -> bool:
    """``tuning.autotune`` (``HAF_AUTOTUNE=1``) and not in the interpreter."""
    return tuning.autotune and not interpreting()


def combine_partials(
    part: torch.Tensor, labels: torch.Tensor, ignore_index: int, acc_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp [N] in acc_dtype, lse [N] float64)`` from per-split partials ``part [3, S, N]`` (max, sum of
    exp(z − max), target logit or 0), combined in float64: one fp32 rounding of a large lse (≈ 20: 1e-6 absolute)
    would cost the target's ``1 − p`` of a peaked row most of its accuracy, so the backward reads lse as
    ``hi + lo`` (:func:`lse_hi_lo`), as the cpp and torch backends do. ``logp`` is 0 where ``labels == ignore_index``.
    """
    f64 = torch.float64
    run_max, run_sum = part[0].to(f64), part[1].to(f64)
    top = run_max.max(dim=0).values
    lse = top + torch.log((run_sum * torch.exp(run_max - top)).sum(dim=0))
    valid = labels != ignore_index
    logp = torch.where(valid, part[2].sum(dim=0).to(f64) - lse, torch.zeros((), dtype=f64, device=lse.device))
    return logp.to(acc_dtype), lse


def lse_hi_lo(lse: torch.Tensor, acc_dtype: torch.dtype) -> torch.Tensor:
    """``[2, N]`` in ``acc_dtype``: the torch backend's ``lse_split`` (row 0 ``lse`` rounded, row 1 the rest) as one
    tensor for the kernels' ``p = exp((z − hi) − lo)``."""
    return torch.stack(lse_split(lse, acc_dtype))


def require_dot_dtype(dtype: torch.dtype) -> None:
    """``TypeError`` when this Triton cannot compile the kernels' ``tl.dot`` for ``dtype``: float64 where the backend
    does not declare it (Triton < 3.5, see ``declared_dtypes``)."""
    from . import CAPABILITIES

    if dtype == torch.float64 and dtype not in CAPABILITIES.dtypes:
        raise TypeError(f"the Triton kernels cannot take float64 hidden/weight here: {CAPABILITIES.dtype_note}")


def dot_precision(dtype: torch.dtype, tuning: Tuning) -> str:
    """``tl.dot`` input precision: fp32 inputs use exact IEEE products (TF32 would cost ~1e-3 relative error).

    ``tuning.triton_fp32_dot`` (``HAF_TRITON_FP32_DOT``): ``tf32x3`` (near-fp32 accuracy, faster) or ``tf32``.
    """
    if dtype == torch.float32:
        return tuning.triton_fp32_dot
    if dtype == torch.float64:
        return "ieee"
    return "tf32"  # the default; only meaningful for fp32 operands (fp16/bf16 always use tensor cores)


@dataclass(frozen=True)
class Tiles:
    """One launch configuration.

    ``block_n`` × ``block_v`` is the logits tile (tokens × vocab) of the forward and the backward's
    dlogits kernel; ``block_d`` the step over the hidden dimension when forming logits. The backward's
    GEMM kernels reuse ``block_n`` / ``block_v`` as their reduction steps (so gradient-filtering flags line
    up with dlogits tiles) and ``block_d_out`` as their output tile over D.
    """

    block_n: int
    block_v: int
    block_d: int
    block_d_out: int
    num_warps: int
    num_stages: int


# (arch, dtype class) -> Tiles. dtype class: "half" (fp16/bf16), "fp32", "fp64".
_TABLE: dict[tuple[str, str], Tiles] = {
    ("sm90", "half"): Tiles(128, 128, 64, 128, 8, 3),
    ("sm90", "fp32"): Tiles(64, 128, 32, 64, 8, 3),
    ("sm80", "half"): Tiles(128, 128, 32, 64, 8, 3),
    ("sm80", "fp32"): Tiles(64, 64, 16, 32, 8, 2),
    ("default", "half"): Tiles(64, 64, 32, 64, 4, 2),
    ("default", "fp32"): Tiles(64, 64, 16, 32, 8, 2),
}
_FP64 = Tiles(32, 32, 16, 32, 4, 1)
_INTERPRETER = Tiles(16, 32, 16, 16, 1, 1)


def shared_memory_bytes(device: torch.device) -> int:
    """Opt-in shared memory per block of ``device``, as Triton sees it (0 off CUDA)."""
    if device.type != "cuda":
        return 0
    try:
        props = triton.runtime.driver.active.utils.get_device_properties(device.index or 0)
        return int(props["max_shared_mem"])
    except Exception:  # an older/newer Triton without that query: torch's view of the same attribute
        return int(getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 0))


def _arch(device: torch.device) -> str:
    """Tile-table row by the shared memory the device offers, not by its major version: sm_120 (RTX 50xx, 99 KB)
    must not get sm_90's 192 KB tiles. ≥ 200 KB (H100/H200/B200: 227 KB) → "sm90"; ≥ 160 KB (A100: 163 KB) →
    "sm80"; else "default"."""
    smem = shared_memory_bytes(device)
    if smem >= 200 * 1024:
        return "sm90"
    if smem >= 160 * 1024:
        return "sm80"
    return "default"


def tiles_for(dtype: torch.dtype, device: torch.device, tuning: Tuning) -> Tiles:
    """Known-good tile sizes for inputs of ``dtype`` on ``device`` (tiny ones in the interpreter).

    ``tuning.triton_tiles`` (``HAF_TRITON_TILES="BN,BV,BD,BDO,WARPS,STAGES"``) overrides the table.
    """
    if tuning.triton_tiles is not None:
        return Tiles(*tuning.triton_tiles)
    if interpreting():
        return _INTERPRETER
    if dtype == torch.float64:
        return _FP64
    kind = "fp32" if dtype == torch.float32 else "half"
    return _TABLE[(_arch(device), kind)]


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` current while launching (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on ``device`` (1 in the interpreter / on CPU)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


ASSUMED_CTAS_PER_SM = 2  # when the compiled kernel's resources are unknown (interpreter, CPU, an old Triton)


@dataclass(frozen=True)
class SmLimits:
    """Per-SM resources that bound how many CTAs of one kernel are resident at once (defaults: H100 / sm_90)."""

    regs_per_sm: int = 65536
    max_threads_per_sm: int = 2048
    smem_per_sm: int = 233472  # 228 KiB (A100: 167936 = 164 KiB)
    max_ctas_per_sm: int = 32
    warp_size: int = 32
    reg_alloc_unit: int = 256  # registers are allocated per warp in units of 256 (8 per thread)
    smem_reserved_per_cta: int = 1024  # sm_80 and later reserve 1 KiB of shared memory per CTA


def ctas_per_sm(n_regs: int, num_warps: int, shared_bytes: int, limits: SmLimits = SmLimits()) -> int:
    """CTAs of one kernel resident per SM (at least 1): the least of the register, thread, shared-memory and CTA
    limits.

    ``n_regs``: registers per thread of the compiled kernel; ``num_warps``: warps per CTA; ``shared_bytes``: its
    shared memory (``metadata.shared``). E.g. 255 registers × 256 threads on a 64K-register SM → 1; 128 registers ×
    128 threads → 4. Spilled registers live in local memory and do not change the count.
    """
    regs_per_warp = triton.cdiv(max(1, n_regs) * limits.warp_size, limits.reg_alloc_unit) * limits.reg_alloc_unit
    by_regs = (limits.regs_per_sm // regs_per_warp) // max(1, num_warps)
    by_threads = limits.max_threads_per_sm // (max(1, num_warps) * limits.warp_size)
    by_smem = limits.smem_per_sm // (shared_bytes + limits.smem_reserved_per_cta) if shared_bytes > 0 else 1 << 30
    return max(1, min(by_regs, by_threads, by_smem, limits.max_ctas_per_sm))


def sm_limits(device: torch.device) -> SmLimits:
    """``SmLimits`` of a CUDA ``device`` from torch's device properties (defaults where an attribute is missing)."""
    props = torch.cuda.get_device_properties(device)
    base = SmLimits()
    return SmLimits(
        regs_per_sm=int(getattr(props, "regs_per_multiprocessor", base.regs_per_sm) or base.regs_per_sm),
        max_threads_per_sm=int(getattr(props, "max_threads_per_multi_processor", 0) or base.max_threads_per_sm),
        smem_per_sm=int(getattr(props, "shared_memory_per_multiprocessor", 0) or base.smem_per_sm),
        warp_size=int(getattr(props, "warp_size", 0) or base.warp_size),
    )


_RESIDENT: dict[tuple, int] = {}


def resident_ctas(
    kernel: triton.JITFunction, make_args: Callable[[], tuple], kwargs: dict, device: torch.device, key: tuple
) -> int:
    """CTAs/SM of ``kernel`` compiled for ``make_args()`` / ``kwargs`` on ``device`` (cached under ``key``).

    Compiles without launching (``warmup``), loads the binary to read ``n_regs`` (Triton 3.x fills it on load) and
    ``metadata.shared`` / ``metadata.num_warps``, and applies :func:`ctas_per_sm` with the device's limits. Off CUDA,
    in the interpreter, or when any of that is unavailable: ``ASSUMED_CTAS_PER_SM``.
    """
    if interpreting() or device.type != "cuda":
        return ASSUMED_CTAS_PER_SM
    full_key = (device.index, *key)
    if full_key not in _RESIDENT:
        try:
            compiled = kernel.warmup(*make_args(), grid=(1,), **kwargs)
            compiled._init_handles()
            meta = compiled.metadata
            n_regs = int(compiled.n_regs)
            _RESIDENT[full_key] = ctas_per_sm(n_regs, int(meta.num_warps), int(meta.shared), sm_limits(device))
        except Exception:  # an older/newer Triton without these fields: the previous assumption
            _RESIDENT[full_key] = ASSUMED_CTAS_PER_SM
    return _RESIDENT[full_key]


def group_rows(n_rows: int, n_cols: int, device: torch.device, tuning: Tuning) -> int:
    """Rows per group for :func:`_grouped_pid`: about one GPU-full of programs (``SMs // n_cols`` rows).

    Concurrently running programs then share a few row blocks (e.g. token tiles of ``hidden``) and a few
    column blocks (vocab tiles of ``weight``), which stay in L2, instead of every row block at once.
    ``tuning.triton_group`` (``HAF_TRITON_GROUP``) overrides (tests use it to exercise the mapping in the
    interpreter).
    """
    if tuning.triton_group is not None:
        return max(1, min(n_rows, tuning.triton_group))
    if device.type != "cuda":
        return n_rows
    return max(1, min(n_rows, num_sms(device) // max(1, n_cols)))


@triton.jit
def _grouped_pid(pid, n_rows, n_cols, group):
    """Map a 1-D program id onto (row, col) of an ``n_rows × n_cols`` grid, ``group`` rows at a time.

    Consecutive ids walk down the rows of one group, then move to the next column; a group covers all
    columns before the next group of rows starts. ``group = n_rows`` is plain row-fastest order.
    """
    per_group = group * n_cols
    first = (pid // per_group) * group
    size = tl.minimum(n_rows - first, group)
    within = pid % per_group
    return first + within % size, within // size


@triton.jit
def _tanh(x):
    """tanh through exp (portable: no libdevice / inline asm): sign(x)·(1 − e^{−2|x|}) / (1 + e^{−2|x|})."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _head_transform(z, logit_scale, softcap, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """Raw logits tile to logits: ``(cap(scale·z), tanh(scale·z / softcap))``, in ``z``'s dtype.

    ``cap(u) = softcap·tanh(u / softcap)`` when ``HAS_SOFTCAP``, else the identity (the second value is then the
    scaled ``z`` itself and meaningless). The tanh is returned unrounded for the softcap derivative ``1 − tanh²``.
    """
    if HAS_SCALE:
        z = z * logit_scale
    t = z
    if HAS_SOFTCAP:
        t = _tanh(z / softcap)
        z = softcap * t
    return z, t


@triton.jit
def _online_lse_step(m_i, s_i, t_i, z, cols, col_ok, y):
    """Fold one logits tile ``z [R, C]`` into the running per-row ``(max, sum of exp(z − max), target logit)``.

    ``m_i``, ``s_i``, ``t_i``: ``[R]`` running values (start at ``(-inf, 0, 0)``); ``cols [C]`` the tile's vocab
    ids, ``col_ok [C]`` which of them belong to this program (others count as ``-inf`` and are never the target);
    ``y [R]`` the labels. Returns the updated ``(m_i, s_i, t_i)``.
    """
    z = tl.where(col_ok[None, :], z, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(z, axis=1))
    s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
    hit = (cols[None, :] == y[:, None]) & col_ok[None, :]
    t_i += tl.sum(tl.where(hit, z, 0.0), axis=1)
    return m_new, s_i, t_i


@triton.jit
def _store_split_partials(max_ptr, sum_ptr, tgt_ptr, out, row_ok, m_i, s_i, t_i, EMPTY_SUM: tl.constexpr):
    """Store one split's running ``(max, sum-exp, target)`` ``[R]`` at offsets ``out [R]`` (rows ``row_ok``).

    A row that saw no column (``m_i = -inf``) stores max 0 and sum-exp ``EMPTY_SUM``: finite for the combine.
    """
    empty = m_i == float("-inf")
    m_i = tl.where(empty, 0.0, m_i)
    s_i = tl.where(empty, EMPTY_SUM, s_i)
    tl.store(max_ptr + out, m_i, mask=row_ok)
    tl.store(sum_ptr + out, s_i, mask=row_ok)
    tl.store(tgt_ptr + out, t_i, mask=row_ok)


@triton.jit
def _logits_tile(
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
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    IS_FP64: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Logits tile ``z[BLOCK_N, BLOCK_V] = cap(scale·(h[rows]·w[cols]ᵀ + b[cols]))`` accumulated in fp32 (fp64).

    Masked rows/columns read zeros; the caller masks the result.
    """
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float64 if IS_FP64 else tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    h_row = h_ptr + rows.to(tl.int64)[:, None] * stride_hn
    w_col = w_ptr + cols.to(tl.int64)[None, :] * stride_wv
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_ok = d < D
        d64 = d.to(tl.int64)  # column offsets in int64: a transposed W has stride_wd = V (wraps int32 at D·V ≥ 2³¹)
        h = tl.load(h_row + d64[None, :] * stride_hd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_col + d64[:, None] * stride_wd, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0)
        acc += b.to(acc.dtype)[None, :]
    acc, _ = _head_transform(acc, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
    return acc
