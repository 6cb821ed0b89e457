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


TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Module-level mark of the Triton test files: the kernels need CUDA or the interpreter (set before pytest starts).
needs_triton = pytest.mark.skipif(
    not backends.is_available("triton") or not (TRITON_INTERPRET or torch.cuda.is_available()),
    reason="triton backend unusable here: "
    + backends.unavailable_reasons().get("triton", "")
    + " (run with TRITON_INTERPRET=1 set before pytest starts)",
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (absolute when ‖b‖ = 0)."""
    a, b = a.detach().double(), b.detach().double()
    denom = b.norm().item()
    diff = (a - b).norm().item()
    return diff / denom if denom > 0 else diff


def tol(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}[dtype]


# The one tolerance rule against plain PyTorch: a kernel's error (vs float64) may be at most
# TORCH_ERR_FACTOR × the error of the same computation in plain PyTorch at the same dtype, on the same inputs,
# plus a floor that keeps the bound meaningful when PyTorch happens to be almost exact. It moves with the
# inputs and the machine (AVX2 vs AVX-512 GEMMs round differently) instead of one machine's numbers.
TORCH_ERR_FACTOR = 2.0
TORCH_ERR_FLOOR = {torch.float64: 1e-12, torch.float32: 5e-7, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def torch_err_bound(torch_err: float, dtype: torch.dtype) -> float:
    """Largest error a kernel may have where plain PyTorch at ``dtype`` has ``torch_err`` (see above)."""
    return TORCH_ERR_FACTOR * torch_err + TORCH_ERR_FLOOR[dtype]


def peaked_inputs(n, v, d, target_logit=15.0, seed=0):
    """A trained LM's rows (as the benchmarks' ``peaky`` regime): the target logit ~15 above the rest.

    Where fp32 shortcuts show: the target's gradient is ``g·(1 − p)`` with ``p`` close to 1, so one fp32 rounding
    of a large ``lse`` or a sum of small terms rounded against the max's 1 costs most of it."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=gen)
    w = torch.randn(v, d, generator=gen) / d**0.5
    y = torch.randint(0, v, (n,), generator=gen)
    w.index_add_(0, y, h * (target_logit / d))
    return h, w, y


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(int(os.environ.get("HAF_TEST_SEED", "0")))
    yield


# The tiny in-process training run of the loop tests: a 1-layer Llama on the synthetic task's word-level tokenizer.
TINY_MODEL = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64
)


def tiny_train_config(data, run_dir, **kw):
    """A ``TrainConfig`` for 2 quick steps on ``data/{train,test}.jsonl`` (``kw`` overrides any field)."""
    from training.config import TrainConfig

    base = dict(
        train_data=str(data / "train.jsonl"),
        eval_data=str(data / "test.jsonl"),
        tokenizer="synthetic",
        model_config=TINY_MODEL,
        max_length=32,
        max_prompt_length=8,
        batch_size=8,
        micro_batch_size=4,
        max_steps=2,
        log_every=1,
        lr=1e-3,
        run_dir=str(run_dir),
        progress=False,
        tensorboard=False,
        plots=False,
    )
    return TrainConfig.from_dict({**base, **kw})
