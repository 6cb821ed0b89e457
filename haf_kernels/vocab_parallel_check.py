"""Vocab-parallel LM head, end to end: ``torchrun --nproc_per_node 2 -m haf_kernels.vocab_parallel_check``.

Shards an LM head ``Shard(0)`` as a ``DTensor`` over every rank (gloo on CPU, nccl on CUDA), runs
``fused_haf_loss(..., vocab_parallel=...)`` and its backward, and compares the loss and the gradients (``dW``/``db``
gathered from the DTensor) with the unsharded float64 reference in each process. Rank 0 prints the layout, the errors
and the bytes all-reduced per step.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from .losses import fused_haf_loss
from .vocab_parallel import from_dtensor


def demo(pairs: int = 4, seq_len: int = 64, dim: int = 64, vocab: int = 1001, seed: int = 0) -> dict[str, float]:
    """A ``Shard(0)`` DTensor LM head under ``torchrun``, the HaF loss on it, checked against one process.

    Every rank draws the same random batch, shards an ``nn.Linear(dim, vocab)`` head's weight and bias
    ``Shard(0)`` over all ranks (gloo on CPU, nccl on CUDA), runs ``fused_haf_loss(..., vocab_parallel=...)``
    and its backward, and compares the loss and gradients with the unsharded float64 reference. Rank 0 prints
    the shard sizes, the relative errors and the bytes each rank sent per step. Returns the errors.
    """
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh(device.type, (world,))
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * pairs, seq_len, dim, generator=gen)
    labels = torch.randint(0, vocab, (2 * pairs, seq_len), generator=gen)
    labels[:, : seq_len // 4] = -100  # the prompt
    rewards = torch.randn(2 * pairs, generator=gen)
    head = torch.nn.Linear(dim, vocab)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, dim, generator=gen) / dim**0.5)
        head.bias.copy_(torch.randn(vocab, generator=gen) * 0.1)
    weight = torch.nn.Parameter(distribute_tensor(head.weight.detach().to(device), mesh, [Shard(0)]))
    bias = torch.nn.Parameter(distribute_tensor(head.bias.detach().to(device), mesh, [Shard(0)]))
    w_local, b_local, vp = from_dtensor(weight, bias)

    h = hidden.to(device).requires_grad_(True)
    out = fused_haf_loss(h, w_local, labels.to(device), rewards.to(device), lm_head_bias=b_local, vocab_parallel=vp)
    out.loss.backward()

    h64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (hidden, head.weight, head.bias))
    ref = fused_haf_loss(h64, w64, labels, rewards.double(), lm_head_bias=b64, backend="reference")
    ref.loss.backward()

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.detach().double().cpu() - b.detach()).norm() / b.detach().norm())

    errors = {
        "loss": rel(out.loss, ref.loss),
        "dH": rel(h.grad, h64.grad),
        "dW": rel(weight.grad.full_tensor(), w64.grad),
        "db": rel(bias.grad.full_tensor(), b64.grad),
    }
    rows = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(rows, torch.tensor([w_local.shape[0]], device=device))
    n_tok = int((labels != -100).sum())
    stats = 2 * 8 * n_tok + 8 * n_tok  # all-reduce MAX of lse, all-reduce SUM of [exp(lse - max), target]: float64
    grad_h = n_tok * dim * h.element_size()
    if rank == 0:
        print(f"world {world} ({device.type}), V = {vocab} split {[int(r) for r in rows]}, D = {dim}, {n_tok} tokens")
        print(f"loss {out.loss.item():.6f} (reference {ref.loss.item():.6f})")
        print(
            "relative error vs the unsharded float64 reference: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
        )
        print(
            f"all-reduced per step: forward {stats} B of statistics, backward {grad_h} B of dH; "
            f"the full fp32 logits would be {n_tok * vocab * 4} B"
        )
    dist.barrier()
    dist.destroy_process_group()
    return errors


if __name__ == "__main__":
    demo()
