"""Device-memory budgets: how much a kept or recomputed chunk of logits may take, from one rule.

On CUDA a chunk may take 1/8 of the free device memory, at least 512 MiB and at most 4 GiB, and never more than
half of what is free: big enough that the fp32 read-modify-write of the gradient accumulators between chunks stays
a few percent of the GEMMs at LLM shapes (see ``benchmarks/roofline_triton.md``), small enough to leave room for the
model. Off CUDA (CPU, the Triton interpreter) a chunk is small (64 MiB), where cache locality matters more. An
explicit MiB setting (an environment knob of ``haf_kernels.tuning``) wins over both.
"""

from __future__ import annotations

import os

import torch

FREE_FRACTION = 8  # on CUDA a chunk may take 1/8 of the free device memory ...
MIN_BYTES = 512 << 20  # ... but at least 512 MiB ...
MAX_BYTES = 4 << 30  # ... and at most 4 GiB (N = 16384 × V = 128256 in bf16), never more than half of what is free
OFF_CUDA_BYTES = 64 << 20  # CPU / interpreter


def budget_bytes(free_bytes: int | None, override_mb: int | None = None) -> int:
    """Bytes one chunk may take: ``override_mb`` MiB when set; else from ``free_bytes`` (free CUDA memory) by the
    module's rule; ``OFF_CUDA_BYTES`` when ``free_bytes`` is ``None`` (off CUDA)."""
    if override_mb is not None:
        return int(override_mb) << 20
    if free_bytes is None:
        return OFF_CUDA_BYTES
    budget = min(max(free_bytes // FREE_FRACTION, MIN_BYTES), MAX_BYTES)
    return max(1, min(budget, free_bytes // 2))


def free_device_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA ``device`` as this process can use it (driver-free + torch's cached, unused blocks);
    ``None`` off CUDA and under ``TRITON_INTERPRET=1``."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
