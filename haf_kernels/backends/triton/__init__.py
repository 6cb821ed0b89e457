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

import functools
import os
import re
import warnings

import torch

from ...options import LogprobOptions
from .. import FLOATS, Capabilities

NAME = "triton"
MIN_TRITON = (3, 2)  # the oldest tested; 3.0/3.1 (torch 2.4/2.5) fail in their interpreter ("arange's arguments
# must be of type tl.constexpr") and their AOT API differs, so nothing shows the kernels right there
FP64_DOT_TRITON = (3, 5)  # older Triton rejects tl.dot on float64 operands ("Unsupported lhs dtype fp64")
INTERPRETER_NUMPY_TRITON = (3, 7)  # older interpreters call int() on 1-element arrays, a TypeError on numpy >= 2.4


def parse_version(text: str) -> tuple[int, int]:
    """``(major, minor)`` of a version such as ``"3.6.0"`` or ``"3.2.0+git4b3bb1f8"``; ``(0, 0)`` if unreadable."""
    m = re.match(r"\s*(\d+)\.(\d+)", text)
    return (int(m[1]), int(m[2])) if m else (0, 0)


@functools.cache  # a property of the installed numpy: probed once (catch_warnings is not thread-safe)
def numpy_rejects_sized_scalars() -> bool:
    """Whether ``int()`` of a 1-element, 1-d numpy array raises (numpy >= 2.4), as Triton < 3.7's interpreter does."""
    import numpy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            int(numpy.array([1]))
        except TypeError:
            return True
    return False


def version_problem(version: tuple[int, int], interpreting: bool, numpy_strict: bool) -> str:
    """Why Triton ``version`` cannot run this backend (``""`` when it can): too old, or an interpreter that fails
    with this numpy. Tested: the interpreter suite and the sm80/sm90 compile on Triton 3.2-3.9."""
    shown = ".".join(map(str, version))
    if version < MIN_TRITON:
        return (
            f"triton {shown} is older than {'.'.join(map(str, MIN_TRITON))}, the oldest these kernels are tested on "
            "(torch >= 2.6 brings a newer one); backend='torch' runs on CUDA meanwhile and 'auto' picks it"
        )
    if interpreting and version < INTERPRETER_NUMPY_TRITON and numpy_strict:
        return (
            f"triton {shown}'s interpreter (TRITON_INTERPRET=1) fails with numpy >= 2.4 (it calls int() on 1-element "
            "arrays); install numpy<2.4 or triton>=3.7 to run the kernels on CPU"
        )
    return ""


def declared_dtypes(version: tuple[int, int], interpreting: bool) -> tuple[frozenset[torch.dtype], str]:
    """Input dtypes this backend computes correctly with Triton ``version``, and why the others are refused."""
    dtypes, notes = set(FLOATS), []
    if interpreting:
        dtypes.discard(torch.bfloat16)
        notes.append(
            "under TRITON_INTERPRET=1 the interpreter's tl.dot multiplies raw bf16 bits (wrong numbers); use "
            "float16/float32 inputs, or backend='cpp' / 'torch' on CPU (bf16 runs correctly on a GPU)"
        )
    if version < FP64_DOT_TRITON:
        dtypes.discard(torch.float64)
        notes.append(
            f"triton {'.'.join(map(str, version))} has no float64 tl.dot (it needs triton >= "
            f"{'.'.join(map(str, FP64_DOT_TRITON))}); backend='torch' computes float64, and 'auto' picks it"
        )
    return frozenset(dtypes), "; ".join(notes)


_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"  # read at import, as Triton itself does
try:  # triton is optional: the package must import without it
    import triton

    _IMPORT_ERROR = ""
    TRITON_VERSION = parse_version(getattr(triton, "__version__", ""))
except Exception as exc:  # pragma: no cover - depends on the environment
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
    TRITON_VERSION = (0, 0)

_DTYPES, _DTYPE_NOTE = declared_dtypes(TRITON_VERSION, _INTERPRETING) if not _IMPORT_ERROR else (FLOATS, "")
CAPABILITIES = Capabilities(
    devices=frozenset({"cuda", "cpu"} if _INTERPRETING else {"cuda"}),
    auto_devices=frozenset({"cuda"}),
    priority=30,
    dtypes=_DTYPES,
    dtype_note=_DTYPE_NOTE,
    keeps_logits=True,
    kept_dtype="input",
    grad_filter=True,
    determinism="bitwise run to run (no atomics)",
)

if not _IMPORT_ERROR and TRITON_VERSION >= MIN_TRITON:  # older ones may not even define what the kernels use
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


def _version_problem() -> str:
    return version_problem(TRITON_VERSION, _interpret(), _interpret() and numpy_rejects_sized_scalars())


def is_available() -> bool:
    """True when a Triton these kernels run on imports and either CUDA is available or ``TRITON_INTERPRET=1``."""
    return not why_unavailable()


def why_unavailable() -> str:
    if _IMPORT_ERROR:
        return f"triton does not import ({_IMPORT_ERROR})"
    problem = _version_problem()
    if problem:
        return problem
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
    """``(logp [N], lse [N] fp64)``: ``logp`` fp32 (fp64 for fp64 inputs), 0 where ``labels == ignore_index``."""
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
