"""Non-tensor options shared by every backend (one frozen dataclass, passed down unchanged)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

_DEFAULT_CHUNK_MB = 64


def _env_int(name: str, default: int | None) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from exc
    if value <= 0:
        raise ValueError(f"environment variable {name} must be positive, got {value}")
    return value


@dataclass(frozen=True)
class LogprobOptions:
    """How logits are formed and how the work is tiled.

    ``logits = softcap · tanh((h·Wᵀ + b) · logit_scale / softcap)`` (no tanh when ``softcap is None``).

    ``chunk_tokens`` / ``chunk_vocab`` tile the chunked backends; ``None`` picks a size that keeps one
    fp32 logits tile at about ``HAF_CHUNK_MB`` MiB (default 64). ``HAF_CHUNK_TOKENS`` and
    ``HAF_CHUNK_VOCAB`` override the defaults from the environment.
    """

    ignore_index: int = -100
    logit_scale: float = 1.0
    softcap: float | None = None
    chunk_tokens: int | None = None
    chunk_vocab: int | None = None

    def tile(self, n_tokens: int, vocab: int) -> tuple[int, int]:
        """Token and vocab tile sizes for a problem of ``n_tokens × vocab`` logits."""
        chunk_v = self.chunk_vocab or _env_int("HAF_CHUNK_VOCAB", None) or min(vocab, 65536)
        chunk_v = max(1, min(chunk_v, vocab))
        chunk_t = self.chunk_tokens or _env_int("HAF_CHUNK_TOKENS", None)
        if chunk_t is None:
            budget = chunk_budget_bytes() // 4
            chunk_t = max(16, budget // max(chunk_v, 1))
        return max(1, min(chunk_t, max(n_tokens, 1))), chunk_v


def chunk_budget_bytes() -> int:
    """Bytes one fp32 logits tile may take (``HAF_CHUNK_MB`` MiB, default 64)."""
    return (_env_int("HAF_CHUNK_MB", _DEFAULT_CHUNK_MB) or _DEFAULT_CHUNK_MB) * (1 << 20)


def keep_max_bytes() -> int:
    """Most bytes of fp32 logits the whole-loss path keeps for one pair (``HAF_KEEP_MAX_MB``, default 512)."""
    return (_env_int("HAF_KEEP_MAX_MB", 512) or 512) * (1 << 20)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64 (for gradcheck), everything else accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
