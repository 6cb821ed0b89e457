"""Shared test fixtures: the backends under test and tolerances.

``BACKENDS`` lists every fast backend usable on CPU tensors in this process (``torch`` always, ``cpp``
when the extension is built, ``triton`` under ``TRITON_INTERPRET=1``); the backend-parametrised suites
run on each of them and compare with ``reference`` in float64.
"""

from __future__ import annotations

import os

import pytest
import torch

from haf_kernels import backends

CPU = torch.device("cpu")
BACKENDS = [
    name for name in ("torch", "cpp", "triton") if backends.is_available(name) and backends.supports_device(name, CPU)
]

# dtypes each backend is tested in on CPU (the Triton interpreter's tl.dot is wrong for bf16).
DTYPES = {
    "torch": (torch.float32, torch.float64),
    "cpp": (torch.float32, torch.float64),
    "triton": (torch.float32, torch.float16),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (absolute when ‖b‖ = 0)."""
    a, b = a.detach().double(), b.detach().double()
    denom = b.norm().item()
    diff = (a - b).norm().item()
    return diff / denom if denom > 0 else diff


def tol(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}[dtype]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(int(os.environ.get("HAF_TEST_SEED", "0")))
    yield
