"""Non-tensor options shared by every backend (one frozen dataclass, passed down unchanged)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .tuning import Tuning, current


@dataclass(frozen=True)
class LogprobOptions:
    """How logits are formed and how the work is tiled.

    ``logits = softcap · tanh((h·Wᵀ + b) · logit_scale / softcap)`` (no tanh when ``softcap is None``).

    ``chunk_tokens`` / ``chunk_vocab`` tile the chunked backends (arguments win); ``None`` takes
    ``tuning.chunk_tokens`` / ``tuning.chunk_vocab`` (``HAF_CHUNK_TOKENS`` / ``HAF_CHUNK_VOCAB``), else a size that
    keeps one fp32 logits tile at ``tuning.tile_mb`` MiB. ``tuning``: every other knob (``haf_kernels.tuning``),
    read from the environment when the options are made.
    """

    ignore_index: int = -100
    logit_scale: float = 1.0
    softcap: float | None = None
    chunk_tokens: int | None = None
    chunk_vocab: int | None = None
    tuning: Tuning = field(default_factory=current, compare=False)

    def tile(self, n_tokens: int, vocab: int) -> tuple[int, int]:
        """Token and vocab tile sizes for a problem of ``n_tokens × vocab`` logits."""
        chunk_v = self.vocab_tile() or min(vocab, 65536)
        chunk_v = max(1, min(chunk_v, vocab))
        chunk_t = self.chunk_tokens or self.tuning.chunk_tokens
        if chunk_t is None:
            budget = (self.tuning.tile_mb << 20) // 4
            chunk_t = max(16, budget // max(chunk_v, 1))
        return max(1, min(chunk_t, max(n_tokens, 1))), chunk_v

    def head(self, z: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``cap(scale·(z + bias))``: raw products ``z = h·Wᵀ`` (any shape, last dim V or matching ``bias``) to
        logits, out of place, in ``z``'s dtype."""
        if bias is not None:
            z = z + bias.to(z.dtype)
        if self.logit_scale != 1.0:
            z = z * self.logit_scale
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z

    def vocab_tile(self) -> int | None:
        """``chunk_vocab`` from the arguments, else from the tuning (``None``: the backend's default)."""
        return self.chunk_vocab or self.tuning.chunk_vocab


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64 (for gradcheck), everything else accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
