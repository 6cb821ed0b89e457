"""Backend registry: which implementations of ``linear_logprobs`` exist, which are usable, and ``auto``.

Every backend module exposes ``NAME``, ``is_available()``, ``why_unavailable()`` and, except ``reference``
(plain autograd), the pair::

    forward(hidden[N, D], weight[V, D], labels[N], bias[V] | None, opts) -> (logp[N], lse[N])
    backward(grad_logp[N], hidden, weight, labels, bias, lse, opts, needs=(dh, dw, db))
        -> (dhidden | None, dweight | None, dbias | None)

``logp``/``lse`` are fp32 (fp64 for fp64 inputs); gradients come back in their input's dtype. A backend may
also offer ``forward_keep`` / ``backward_saved`` (keep one chunk's logits between the two, 3 GEMMs instead of
4), used by the whole-loss path; otherwise the generic fallback in ``logprobs.py`` recomputes::

    forward_keep(hidden, weight, labels, bias, opts) -> (logp, lse, saved)
    backward_saved(saved, grad_logp, hidden, weight, labels, bias, lse, opts, needs[, dw_acc, db_acc])
        -> (dhidden in hidden's dtype, dweight and dbias in the accumulation dtype)

When ``backward_saved`` takes ``dw_acc``/``db_acc`` it adds into those buffers in place and returns them.

``auto`` picks ``triton`` for CUDA tensors, ``cpp`` for CPU tensors when the extension is built, else
``torch``; the environment variable ``HAF_KERNELS_BACKEND`` overrides ``auto``.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("triton", "cpp", "torch", "reference")
_MODULES = {
    "triton": "haf_kernels.backends.triton",
    "cpp": "haf_kernels.backends.cpp",
    "torch": "haf_kernels.backends.torch_chunked",
    "reference": "haf_kernels.backends.reference",
}
_loaded: dict[str, ModuleType | None] = {}
_errors: dict[str, str] = {}


def _load(name: str) -> ModuleType | None:
    if name not in _loaded:
        try:
            mod = importlib.import_module(_MODULES[name])
            if not callable(getattr(mod, "is_available", None)):
                raise ImportError(f"{_MODULES[name]} does not implement the backend protocol")
            _loaded[name] = mod
        except Exception as exc:  # a missing optional dependency must not break the package
            _loaded[name] = None
            _errors[name] = f"{type(exc).__name__}: {exc}"
    return _loaded[name]


def get(name: str) -> ModuleType:
    """The backend module ``name``; raises ``ValueError`` if unknown or unusable here."""
    if name not in _MODULES:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {name!r}")
    mod = _load(name)
    if mod is None or not mod.is_available():
        why = _errors.get(name) or (mod.why_unavailable() if mod is not None else "")
        raise ValueError(f"backend {name!r} is not available: {why}")
    return mod


def is_available(name: str) -> bool:
    """Whether backend ``name`` can run in this process (built, importable, its runtime present)."""
    if name not in _MODULES:
        return False
    mod = _load(name)
    return mod is not None and bool(mod.is_available())


def available() -> dict[str, bool]:
    """``{backend: usable}`` for every backend, e.g. ``{'triton': False, 'cpp': True, ...}``."""
    return {name: is_available(name) for name in BACKENDS}


def unavailable_reasons() -> dict[str, str]:
    """Why each unusable backend is unusable (import error or the backend's own reason)."""
    out = {}
    for name in BACKENDS:
        if not is_available(name):
            mod = _load(name)
            out[name] = _errors.get(name) or (mod.why_unavailable() if mod is not None else "unknown")
    return out


def supports_device(name: str, device: torch.device) -> bool:
    if name == "triton":
        return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    if name == "cpp":
        return device.type == "cpu"
    return True


def resolve(backend: str, device: torch.device) -> str:
    """Concrete backend name for ``backend`` (``"auto"`` or a name) and tensors on ``device``."""
    if backend == "auto":
        from ..tuning import current

        backend = current().backend
    if backend == "auto":
        if device.type == "cuda" and is_available("triton"):
            return "triton"
        if device.type == "cpu" and is_available("cpp"):
            return "cpp"
        return "torch"
    if backend not in _MODULES:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    get(backend)
    if not supports_device(backend, device):
        raise ValueError(f"backend {backend!r} does not run on {device.type} tensors")
    return backend
