"""Backend registry: which implementations of ``linear_logprobs`` exist, which are usable, and ``auto``.

Every backend module exposes ``NAME``, ``is_available()``, ``why_unavailable()`` and, except ``reference``
(plain autograd), the pair::

    forward(hidden[N, D], weight[V, D], labels[N], bias[V] | None, opts) -> (logp[N], lse[N])
    backward(grad_logp[N], hidden, weight, labels, bias, lse, opts, needs=(dh, dw, db))
        -> (dhidden | None, dweight | None, dbias | None)

``logp`` is fp32 (fp64 for fp64 inputs), ``lse`` float64 (a backward reads it as fp32 ``hi + lo``: one fp32
rounding of a large lse would cost a peaked row's ``1 − p`` its accuracy); gradients come back in their input's
dtype. A backend may also offer ``forward_keep`` / ``backward_saved`` (keep one chunk's logits between the two,
3 GEMMs instead of 4), used by the whole-loss path; otherwise the generic fallback in ``logprobs.py`` recomputes::

    forward_keep(hidden, weight, labels, bias, opts[, out]) -> (logp, lse, saved)
    backward_saved(saved, grad_logp, hidden, weight, labels, bias, lse, opts, needs[, dw_acc, db_acc])
        -> (dhidden in hidden's dtype, dweight and dbias in the accumulation dtype)

When ``backward_saved`` takes ``dw_acc``/``db_acc`` it adds into those buffers in place and returns them. When
``forward_keep`` takes ``out`` (a consumed ``saved`` of the same call, at least ``N·V`` elements), it keeps the
logits there instead of a fresh buffer.

Each module also declares ``CAPABILITIES`` (a ``Capabilities``): the devices and dtypes it runs, where ``auto``
may pick it and with what priority, and its features (kept logits, gradient filtering, determinism).
``resolve`` reads only these declarations: ``auto`` takes the available backend of highest priority that
declares the device (and dtype) for auto use (today: ``triton`` on CUDA, ``cpp`` on CPU when built, else
``torch``); an explicit backend that lacks the device or dtype is an error saying what it declares. A new
backend is one module plus one line in ``_MODULES``. ``HAF_KERNELS_BACKEND`` overrides ``auto``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

import torch

FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


@dataclass(frozen=True)
class Capabilities:
    """What a backend declares about itself (read by ``resolve`` and by the whole-loss path).

    ``devices``: device types it runs on (``"*"``: any); ``auto_devices``: where ``auto`` may pick it, with ``priority``
    (highest wins); ``dtypes``: input dtypes it computes correctly (``dtype_note`` says why others are refused);
    ``keeps_logits``: offers ``forward_keep``/``backward_saved`` (the 3-GEMM whole loss); ``kept_dtype``: the dtype of
    the logits it keeps there, ``"compute"`` (fp32, fp64 for fp64 inputs) or ``"input"`` (the inputs' own dtype);
    ``grad_filter``: honours ``Tuning.grad_filter``; ``determinism``: what repeats bitwise.
    """

    devices: frozenset[str]
    auto_devices: frozenset[str] = frozenset()
    priority: int = 0
    dtypes: frozenset[torch.dtype] = FLOATS
    dtype_note: str = ""
    keeps_logits: bool = False
    kept_dtype: str = "compute"
    grad_filter: bool = False
    determinism: str = "run to run"

    def kept_logit_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of one kept logit for inputs of ``dtype`` (what the whole-loss path budgets per token and column)."""
        kept = dtype if self.kept_dtype == "input" else (torch.float64 if dtype == torch.float64 else torch.float32)
        return torch.empty((), dtype=kept).element_size()

    def runs_on(self, device_type: str) -> bool:
        return "*" in self.devices or device_type in self.devices

    def auto_on(self, device_type: str) -> bool:
        return "*" in self.auto_devices or device_type in self.auto_devices


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


def capabilities(name: str) -> Capabilities:
    """The ``Capabilities`` backend ``name`` declares (``ValueError`` if unknown or unusable here)."""
    return get(name).CAPABILITIES


def supports_device(name: str, device: torch.device) -> bool:
    """Whether backend ``name`` declares ``device``'s type (``False`` when it is unusable here)."""
    return is_available(name) and capabilities(name).runs_on(device.type)


def resolve(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Concrete backend name for ``backend`` (``"auto"`` or a name) and inputs of ``dtype`` on ``device``."""
    if backend == "auto":
        from ..tuning import current

        backend = current().backend
    if backend == "auto":
        candidates = [
            (caps.priority, name)
            for name in BACKENDS
            if is_available(name)
            and (caps := capabilities(name)).auto_on(device.type)
            and (dtype is None or dtype in caps.dtypes)
        ]
        if not candidates:
            raise ValueError(f"no available backend declares {device.type} tensors for backend='auto'")
        return max(candidates)[1]
    if backend not in _MODULES:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    caps = capabilities(backend)
    if not caps.runs_on(device.type):
        raise ValueError(
            f"backend {backend!r} does not run on {device.type} tensors (it declares {sorted(caps.devices)})"
        )
    if dtype is not None and dtype not in caps.dtypes:
        names = sorted(str(d).removeprefix("torch.") for d in caps.dtypes)
        raise TypeError(
            f"backend {backend!r} does not compute {str(dtype).removeprefix('torch.')} inputs here (it declares "
            f"{names}){': ' + caps.dtype_note if caps.dtype_note else ''}"
        )
    return backend
