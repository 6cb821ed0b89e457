"""MetaRM: keep a reward model discriminative on a shifted distribution (Secrets of RLHF II, §4.2).

Per step, with ``X_t`` a labelled preference batch and ``X_s`` a batch of P prompts each with k responses sampled
from the shifted (e.g. RL-trained) policy:

1. Difference objective on the shifted batch, per prompt ``x`` with responses ``s_1..s_k``:
   ``J(θ) = (2/k²) Σ_{i<j} σ(|r_θ(x, s_i) − r_θ(x, s_j)|)`` (averaged over the P prompts).
2. Inner *ascent* on a functional copy of the parameters: ``θ' = θ + η·∇_θ J(θ; X_s)``.
3. Outer loss at ``θ'`` on ``X_t``: the BT (or HaF) loss ``L(θ'; X_t)``.
4. Outer step on the original parameters: ``θ ← θ − α·∇_θ L(θ'(θ))``. The exact meta-gradient goes through
   the look-ahead, ``∇_θ L(θ') = (I + η·∇²J(θ))·∇_{θ'} L(θ')``; ``first_order=True`` drops the Hessian term and
   uses ``∇_{θ'} L(θ')`` (the update the paper writes, ``θ ← θ − α∇_{θ'}L(θ')``).

The functional copy is made with ``torch.func.functional_call`` so the module's own parameters are never
modified by the inner step. ``α`` is the outer optimizer's learning rate (the caller's optimizer).

Choices the paper leaves open, exposed here: ``inner_lr`` η, ``k``, the outer lr α (optimizer), first- vs
second-order meta-gradient (default second order, exact), which parameters take the inner step (default every
trainable parameter; ``param_names`` restricts it, e.g. to the reward head + LoRA), and whether the inner step
sees dropout (it sees whatever mode the model is in).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

RewardFn = Callable[[nn.Module, dict[str, torch.Tensor], torch.Tensor, torch.Tensor], torch.Tensor]


def meta_objective(rewards: torch.Tensor) -> torch.Tensor:
    """``J = mean_prompts (2/k²) Σ_{i<j} σ(|r_i − r_j|)`` of ``rewards [P, k]`` (scalar)."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [P, k] with k >= 2, got shape {tuple(rewards.shape)}")
    k = rewards.shape[1]
    diff = rewards[:, :, None] - rewards[:, None, :]  # [P, k, k]
    iu = torch.triu_indices(k, k, offset=1, device=rewards.device)
    terms = torch.sigmoid(diff[:, iu[0], iu[1]].abs())  # [P, k(k-1)/2]
    return (2.0 / k**2) * terms.sum(dim=1).mean()


def default_reward_fn(
    model: nn.Module, params: dict[str, torch.Tensor], input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Rewards ``[N]`` of ``model`` run with ``params``: ``functional_call(model, params, (ids, mask))``; uses
    ``.rewards`` of the output when it has one (``RewardModelOutput``), else the output itself."""
    out = functional_call(model, params, (input_ids, attention_mask))
    return out.rewards if hasattr(out, "rewards") else out


def trainable_params(model: nn.Module, param_names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """``{name: parameter}`` of the parameters that take the inner step (trainable ones by default)."""
    names = None if param_names is None else set(param_names)
    return {n: p for n, p in model.named_parameters() if p.requires_grad and (names is None or n in names)}


def shifted_objective(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    k: int,
    reward_fn: RewardFn = default_reward_fn,
) -> torch.Tensor:
    """``J`` of the shifted batch (``input_ids, attention_mask: [P·k, T]``, prompt-major: rows ``p·k..p·k+k−1``
    are prompt p's responses) at ``params``."""
    if input_ids.shape[0] % k:
        raise ValueError(f"shifted batch rows ({input_ids.shape[0]}) must be a multiple of k={k}")
    r = reward_fn(model, params, input_ids, attention_mask)
    return meta_objective(r.reshape(-1, k))


def inner_step(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    k: int,
    inner_lr: float,
    first_order: bool = False,
    reward_fn: RewardFn = default_reward_fn,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``(θ' = θ + η·∇J(θ), J(θ).detach())``. With ``first_order`` the gradient is detached (no Hessian path).

    For the exact (second-order) meta-gradient the inner pass runs scaled-dot-product attention with its MATH
    backend: the fused CPU/CUDA attention kernels have no double backward.
    """
    names = list(params)
    ctx = contextlib.nullcontext() if first_order else sdpa_kernel([SDPBackend.MATH])
    with ctx:
        j = shifted_objective(model, params, input_ids, attention_mask, k, reward_fn)
        grads = torch.autograd.grad(j, [params[n] for n in names], create_graph=not first_order, allow_unused=True)
    fast = {}
    for n, g in zip(names, grads):
        if g is None:
            fast[n] = params[n]
        else:
            fast[n] = params[n] + inner_lr * (g.detach() if first_order else g)
    return fast, j.detach()


@dataclass
class MetaRMOutput:
    """``loss``: outer loss ``L(θ')`` (backward gives the meta-gradient on θ); ``objective_before``: ``J(θ)``;
    ``fast_params``: ``θ'`` (differentiable functions of θ unless first order)."""

    loss: torch.Tensor
    objective_before: torch.Tensor
    fast_params: dict[str, torch.Tensor]


def metarm_loss(
    model: nn.Module,
    shifted_input_ids: torch.Tensor,
    shifted_attention_mask: torch.Tensor,
    outer_loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    *,
    k: int,
    inner_lr: float = 0.1,
    first_order: bool = False,
    param_names: Iterable[str] | None = None,
    reward_fn: RewardFn = default_reward_fn,
) -> MetaRMOutput:
    """One MetaRM look-ahead; ``outer_loss_fn(fast_params)`` computes the labelled loss at ``θ'``.

    Typical ``outer_loss_fn``::

        def outer(fast):
            out = functional_call(model, fast, (ids_t, mask_t))
            return fused_haf_loss(out.hidden, fast["lm_head.weight"], labels_t, out.rewards, ...).loss

    Call ``.loss.backward()`` then ``optimizer.step()`` (lr = α) to update ``θ``.
    """
    params = trainable_params(model, param_names)
    fast, j0 = inner_step(
        model,
        params,
        shifted_input_ids,
        shifted_attention_mask,
        k=k,
        inner_lr=inner_lr,
        first_order=first_order,
        reward_fn=reward_fn,
    )
    return MetaRMOutput(loss=outer_loss_fn(fast), objective_before=j0, fast_params=fast)


def metarm_step(model: nn.Module, optimizer: torch.optim.Optimizer, *args, **kwargs) -> MetaRMOutput:
    """``metarm_loss`` + ``zero_grad`` / ``backward`` / ``optimizer.step()`` (outer update ``θ ← θ − α·g``)."""
    optimizer.zero_grad(set_to_none=True)
    out = metarm_loss(model, *args, **kwargs)
    out.loss.backward()
    optimizer.step()
    return out
