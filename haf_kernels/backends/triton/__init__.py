"""Triton backend of ``linear_logprobs``: the fast path on CUDA tensors (CPU under ``TRITON_INTERPRET=1``).

Kernels live in ``forward.py`` (tiled logits, online log-sum-exp, vocab splits for small N),
``backward.py`` (recompute + dlogits per vocab chunk, then dH and dW GEMMs) and ``keep.py`` (the whole-loss path:
vendor GEMMs on one kept chunk of logits plus two Triton row kernels, 3 GEMMs instead of 4); tile tables in
``_common.py``. This module is the backend protocol of ``haf_kernels.backends``::

    forward(hidden[N, D], weight[V, D], labels[N], bias[V] | None, opts) -> (logp[N], lse[N])
    backward(grad_logp[N], hidden, weight, labels, bias, lse, opts, needs) -> (dhidden, dweight, dbias)
    forward_keep(hidden, weight, labels, bias, opts) -> (logp, lse, kept logits)
    backward_saved(kept, grad_logp, hidden, weight, labels, bias, lse, opts, needs, dw_acc, db_acc)
        -> (dhidden, dweight fp32, dbias fp32)

Environment: ``HAF_AUTOTUNE=1`` autotunes the forward tiles (never in the interpreter);
``HAF_GRAD_FILTER=<threshold>`` turns on gradient filtering in the backward (off by default);
``HAF_TRITON_FP32_DOT=tf32x3|tf32`` trades fp32 accuracy for speed; ``HAF_TRITON_TILES`` overrides tiles.
"""

from __future__ import annotations

import os

import torch

from ...options import LogprobOptions
from .. import FLOATS, Capabilities

NAME = "triton"
_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"  # read at import, as Triton itself does
CAPABILITIES = Capabilities(
    devices=frozenset({"cuda", "cpu"} if _INTERPRETING else {"cuda"}),
    auto_devices=frozenset({"cuda"}),
    priority=30,
    dtypes=FLOATS - {torch.bfloat16} if _INTERPRETING else FLOATS,
    dtype_note="under TRITON_INTERPRET=1 the interpreter's tl.dot multiplies raw bf16 bits (wrong numbers); use "
    "float16/float32 inputs, or backend='cpp' / 'torch' on CPU (bf16 runs correctly on a GPU)"
    if _INTERPRETING
    else "",
    keeps_logits=True,
    kept_dtype="input",
    grad_filter=True,
    determinism="bitwise run to run (no atomics)",
)

try:  # triton is optional: the package must import without it
    import triton  # noqa: F401

    _IMPORT_ERROR = ""
except Exception as exc:  # pragma: no cover - depends on the environment
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

if not _IMPORT_ERROR:
    from .backward import grad_filter_threshold, linear_logprobs_bwd
    from .forward import linear_logprobs_fwd
    from .keep import keep_backward, keep_forward

__all__ = [
    "NAME",
    "CAPABILITIES",
    "is_available",
    "why_unavailable",
    "forward",
    "backward",
    "forward_keep",
    "backward_saved",
    "linear_logprobs_fwd",
    "linear_logprobs_bwd",
    "grad_filter_threshold",
]


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def is_available() -> bool:
    """True when triton imports and either CUDA is available or ``TRITON_INTERPRET=1``."""
    return not _IMPORT_ERROR and (_interpret() or torch.cuda.is_available())


def why_unavailable() -> str:
    if _IMPORT_ERROR:
        return f"triton does not import ({_IMPORT_ERROR})"
    if not (_interpret() or torch.cuda.is_available()):
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU in the interpreter)"
    return ""


def forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    opts: LogprobOptions,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp [N], lse [N])`` fp32 (fp64 for fp64 inputs); ``logp`` is 0 where ``labels == ignore_index``."""
    return linear_logprobs_fwd(hidden, weight, labels, bias, opts)


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
    """``(dhidden, dweight, dbias)`` in the inputs' dtypes, ``None`` where ``needs`` is False."""
    return linear_logprobs_bwd(grad_logp, hidden, weight, labels, bias, lse, opts, needs)


def forward_keep(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    opts: LogprobOptions,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logp [N], lse [N], z [N, V])``: like ``forward``, keeping the logits for ``backward_saved`` (one GEMM)."""
    return keep_forward(hidden, weight, labels, bias, opts)


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
    """Gradients from the logits kept by ``forward_keep`` (two GEMMs, ``saved`` overwritten).

    ``dhidden`` in ``hidden``'s dtype; ``dweight`` / ``dbias`` in the accumulation dtype (fp32, fp64 for fp64),
    added in place into ``dw_acc`` / ``db_acc`` when given.
    """
    return keep_backward(saved, grad_logp, hidden, weight, labels, bias, lse, opts, needs, dw_acc, db_acc)
