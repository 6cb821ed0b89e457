"""C++ CPU backend: ``haf_kernels._C`` (``csrc/``), OpenMP over vocab tiles, ATen GEMMs, fused row passes.

Each ``[chunk_tokens × vocab_tile]`` block of logits is made by a single-threaded BLAS GEMM inside one
OpenMP thread, turned into softmax statistics (forward) or ``dz = g ⊙ (onehot(y) − softmax) ⊙ chain`` (backward)
in one vectorised pass while it is still in cache, and consumed by the ``dH`` / ``dW`` GEMMs. A work slot owns
whole vocab tiles, hence its rows of ``dW`` / ``db``; softmax statistics and ``dH`` partials are merged in slot
order afterwards. By default there is one slot per thread: results are repeatable for a fixed thread count
(``torch.set_num_threads``). Under ``torch.use_deterministic_algorithms(True)`` the slot count is fixed (8, or
the number of vocab tiles if fewer), so results are bitwise equal for any thread count (using at most 8
threads).

Gradient filtering (``Tuning.grad_filter``, ``HAF_GRAD_FILTER`` = ε > 0; off by default): a backward block whose
entries off the targets all have ``|onehot − p|·chain·scale <= ε`` keeps only its targets' entries (rank-1
updates of ``dH`` / ``dW`` instead of the two GEMMs); ``db`` stays exact. ``filter_stats()`` counts such blocks.

Two strategies, as in ``torch_chunked``: ``forward`` / ``backward`` recompute the logits (4 GEMMs, memory
O(threads · tile)); ``forward_keep`` / ``backward_saved`` keep one chunk's logits (3 GEMMs, O(chunk · V)).

Plain PyTorch equivalent (what ``backends/reference.py`` computes)::

    z = (hidden @ weight.T + bias) * logit_scale; z = softcap * tanh(z / softcap)
    logp = z.log_softmax(-1).gather(-1, labels[:, None])[:, 0]      # 0 where labels == ignore_index
"""

from __future__ import annotations

import warnings

import torch

from ..options import LogprobOptions, compute_dtype
from ..tuning import Tuning, current
from . import Capabilities

NAME = "cpp"
CAPABILITIES = Capabilities(
    devices=frozenset({"cpu"}),
    auto_devices=frozenset({"cpu"}),
    priority=20,
    keeps_logits=True,
    grad_filter=True,
    determinism="bitwise for a fixed thread count; for any thread count under torch.use_deterministic_algorithms",
)

# Measured defaults (2-core AMD EPYC Zen 4, AVX-512, MKL; see the module notes in csrc/linear_logprobs.cpp):
# recompute blocks of 128 tokens × ~1000 vocab (0.5 MiB fp32, L2-resident between the GEMM that makes a block
# and the two that consume it); the keep-logits path does better with 512-token blocks (fewer, larger dW GEMMs).
DEFAULT_CHUNK_TOKENS = 128
DEFAULT_CHUNK_TOKENS_KEEP = 512
DEFAULT_VOCAB_TILE = 1024

try:
    from .. import _C  # type: ignore[attr-defined]

    _IMPORT_ERROR: str | None = None
except Exception as exc:  # not built, or built against another torch: fall back to the torch backend
    _C = None
    _IMPORT_ERROR = f"haf_kernels._C could not be imported ({type(exc).__name__}: {exc}); build it with " + (
        "`pip install --no-build-isolation -e .` (HAF_REQUIRE_CPP=1 turns a failed build into an error)"
    )
    warnings.warn(
        f"{_IMPORT_ERROR}. backend='auto' uses the pure-PyTorch backend on CPU.", RuntimeWarning, stacklevel=2
    )


def is_available() -> bool:
    return _C is not None


def isa() -> str:
    """Instruction set of the float row kernels in use: ``x86-64-v4`` (AVX-512), ``x86-64-v3`` (AVX2) or ``default``."""
    _apply_isa(current())
    return _C.isa()


def isa_supported() -> list[str]:
    """Instruction sets this CPU and build can run, best first (``default`` always last)."""
    return list(_C.isa_supported())


def set_isa(name: str) -> None:
    """Force the float row kernels' instruction set (``"auto"``: the best this CPU supports).

    Every path computes the same function; the last bits differ (SIMD width, FMA contraction). Tests use this
    to cover the paths other CPUs pick; ``HAF_CPP_ISA`` (``Tuning.cpp_isa``) sets it for a whole process.
    """
    if _C is None:
        raise RuntimeError(f"backend 'cpp' is not available: {_IMPORT_ERROR}")
    _C.set_isa(str(name))


_isa_from_tuning: str = "auto"  # the last Tuning.cpp_isa applied (an explicit set_isa stays until it changes)


def _apply_isa(tuning: Tuning) -> None:
    """Apply ``tuning.cpp_isa`` when it changes (on first use: no work at import time)."""
    global _isa_from_tuning
    if tuning.cpp_isa != _isa_from_tuning:
        try:
            _C.set_isa(tuning.cpp_isa)
        except ValueError as exc:
            raise ValueError(f"environment variable HAF_CPP_ISA: {exc}") from None
        _isa_from_tuning = tuning.cpp_isa


def filter_stats() -> tuple[int, int]:
    """``(blocks, sparse_blocks)`` of the last backward call: how many ``[chunk × vocab tile]`` blocks it had and
    how many gradient filtering reduced to their targets' entries (0 with filtering off)."""
    if _C is None:
        raise RuntimeError(f"backend 'cpp' is not available: {_IMPORT_ERROR}")
    blocks, sparse = _C.filter_stats()
    return int(blocks), int(sparse)


def why_unavailable() -> str:
    return _IMPORT_ERROR or ""


def tiles(vocab: int, opts: LogprobOptions, keep: bool = False) -> tuple[int, int]:
    """``(chunk_tokens, vocab_tile)``: from ``opts`` (arguments, then ``HAF_CHUNK_TOKENS`` / ``HAF_CHUNK_VOCAB``),
    else defaults.

    The default vocab tile splits ``vocab`` into equal tiles of at most ``DEFAULT_VOCAB_TILE`` (a multiple of
    16), so threads get balanced work. Depends only on ``vocab`` and ``opts`` (``forward_keep`` and
    ``backward_saved`` must agree on it).
    """
    default_t = DEFAULT_CHUNK_TOKENS_KEEP if keep else DEFAULT_CHUNK_TOKENS
    chunk_t = opts.chunk_tokens or opts.tuning.chunk_tokens or default_t
    chunk_v = opts.vocab_tile()
    if chunk_v is None:
        n_tiles = -(-vocab // DEFAULT_VOCAB_TILE)
        chunk_v = -(-vocab // n_tiles)
        chunk_v = min(vocab, -(-chunk_v // 16) * 16)
    return max(1, chunk_t), max(1, min(chunk_v, vocab))


def _args(hidden, weight, labels, bias, opts, keep=False):
    if _C is None:
        raise RuntimeError(f"backend 'cpp' is not available: {_IMPORT_ERROR}")
    _apply_isa(opts.tuning)
    chunk_t, chunk_v = tiles(weight.shape[0], opts, keep)
    return (
        hidden.contiguous(),
        weight.contiguous(),
        labels.contiguous().long(),
        None if bias is None else bias.contiguous(),
        int(opts.ignore_index),
        float(opts.logit_scale),
        None if opts.softcap is None else float(opts.softcap),
        chunk_t,
        chunk_v,
    )


def forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    opts: LogprobOptions,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logp [N] (fp32; fp64 for fp64 inputs), lse [N] (fp64); ``logp`` is 0 where ``labels == ignore_index``.

    Args: hidden ``[N, D]`` (fp32/bf16/fp16/fp64), weight ``[V, D]`` (same dtype), labels ``[N]`` int64,
    bias ``[V]`` or None. Nothing ``[N, V]``-sized is allocated.
    """
    return _C.forward(*_args(hidden, weight, labels, bias, opts))


def backward(
    grad_logp: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    opts: LogprobOptions,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dhidden, dweight, dbias) in the inputs' dtypes (None where ``needs`` says False); recomputes logits."""
    need_h, need_w, need_b = (bool(x) for x in needs)
    dt = compute_dtype(hidden.dtype)
    args = _args(hidden, weight, labels, bias, opts)
    dh, dw, db = _C.backward(
        grad_logp.contiguous().to(dt),
        *args[:4],
        lse.contiguous().to(torch.float64),
        *args[4:],
        need_h,
        need_w,
        need_b and bias is not None,
        partial_bytes=opts.tuning.cpp_partial_kb << 10,  # bound on the per-slot dH partials
        grad_filter=float(opts.tuning.grad_filter),
    )
    return (
        None if dh is None else dh.to(hidden.dtype),
        None if dw is None else dw.to(weight.dtype),
        None if (db is None or bias is None) else db.to(bias.dtype),
    )


def forward_keep(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    opts: LogprobOptions,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Like ``forward`` but also returns the logits (fp32/fp64, ``[N·V]`` tile-major) for ``backward_saved``.

    ``out``: a contiguous buffer of the compute dtype with at least ``N·V`` elements (e.g. the ``saved`` of an
    earlier chunk, consumed by its ``backward_saved``); the logits are written into its first ``N·V`` elements
    instead of a fresh buffer, which saves the fresh buffer's first-touch page faults.
    """
    return _C.forward_keep(*_args(hidden, weight, labels, bias, opts, keep=True), out)


def backward_saved(
    saved: torch.Tensor,
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
    """Gradients from the logits kept by ``forward_keep`` (2 GEMMs, no recompute; ``saved`` is overwritten).

    Returns dhidden in the hidden dtype, dweight / dbias in the accumulation dtype (fp32, fp64 for fp64).
    With ``dw_acc`` / ``db_acc`` (contiguous accumulation-dtype buffers) they are added into and returned.
    """
    need_h, need_w, need_b = (bool(x) for x in needs)
    dt = compute_dtype(hidden.dtype)
    args = _args(hidden, weight, labels, bias, opts, keep=True)
    dh, dw, db = _C.backward_saved(
        saved,
        grad_logp.contiguous().to(dt),
        *args[:4],
        lse.contiguous().to(torch.float64),
        *args[4:],
        need_h,
        need_w,
        need_b and bias is not None,
        dw_acc=dw_acc if need_w else None,
        db_acc=db_acc if (need_b and bias is not None) else None,
        partial_bytes=opts.tuning.cpp_partial_kb << 10,
        grad_filter=float(opts.tuning.grad_filter),
    )
    return (None if dh is None else dh.to(hidden.dtype), dw, None if bias is None else db)
