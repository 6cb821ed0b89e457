"""Reference backend: materialises the full ``[N, V]`` logits. Ground truth for tests, never a default.

Plain PyTorch equivalent of ``linear_logprobs``::

    z = hidden.double() @ weight.double().T + bias          # [N, V]
    z = z * logit_scale
    z = softcap * torch.tanh(z / softcap)                   # when softcap is set
    logp = z.log_softmax(-1).gather(-1, labels[:, None])    # 0 where labels == ignore_index

Differentiable through ordinary autograd (no custom backward), so it also checks the others' gradients.
"""

from __future__ import annotations

import torch

from ..options import LogprobOptions, compute_dtype
from . import Capabilities

NAME = "reference"
CAPABILITIES = Capabilities(
    devices=frozenset({"*"}),
    determinism="as plain PyTorch (supports double backward)",
)


def is_available() -> bool:
    return True


def why_unavailable() -> str:
    return ""


def logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, opts: LogprobOptions) -> torch.Tensor:
    """Full logits ``[N, V]`` in the accumulation dtype (fp32, or fp64 for fp64 inputs)."""
    dt = compute_dtype(hidden.dtype)
    return opts.head(hidden.to(dt) @ weight.to(dt).T, bias)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    opts: LogprobOptions,
) -> torch.Tensor:
    """logp [N] (fp32, fp64 for fp64 inputs), 0 where ``labels == ignore_index``; autograd-differentiable."""
    z = logits(hidden, weight, bias, opts)
    valid = labels != opts.ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    logp = z.log_softmax(-1).gather(-1, safe[:, None]).squeeze(-1)
    return torch.where(valid, logp, torch.zeros_like(logp))
