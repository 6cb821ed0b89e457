"""Pure-PyTorch backend, chunked over tokens and vocab: the portable fallback on any device.

Forward keeps an online (max, sum-exp) per token across vocab chunks and picks the target logit when its
chunk passes, so peak extra memory is one ``[chunk_tokens, chunk_vocab]`` fp32 tile, never ``[N, V]``.
Backward recomputes each tile: ``dz = g ⊙ (onehot(y) − softmax(z))``, times the softcap/scale chain rule,
then ``dH += dz·W`` and ``dW += dzᵀ·H`` in fp32.

Plain PyTorch equivalent (what ``backends/reference.py`` computes)::

    logp = (hidden @ weight.T * logit_scale).log_softmax(-1).gather(-1, labels[:, None])[:, 0]
"""

from __future__ import annotations

import torch

from ..options import LogprobOptions, compute_dtype
from . import Capabilities

NAME = "torch"
CAPABILITIES = Capabilities(
    devices=frozenset({"*"}),
    auto_devices=frozenset({"*"}),
    priority=0,  # the portable fallback
    keeps_logits=True,
    determinism="as the device's matmuls (CPU: bitwise for a fixed thread count)",
)


def is_available() -> bool:
    return True


def why_unavailable() -> str:
    return ""


def _tile_logits(
    h: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    opts: LogprobOptions,
    dt: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits of one tile in ``dt`` (scaled and soft-capped), in ``out`` (``[n, V_tile]``, ``dt``) if given."""
    z = torch.mm(h.to(dt), w.to(dt).T, out=out)
    if b is not None:
        z += b.to(dt)
    if opts.logit_scale != 1.0:
        z *= opts.logit_scale
    if opts.softcap is not None:
        z.div_(opts.softcap).tanh_().mul_(opts.softcap)
    return z


def lse_split(lse: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``lse`` (float64) as ``hi + lo`` in ``dtype``: ``hi`` rounded to ``dtype``, ``lo`` the rest.

    ``exp(z − hi)·exp(−lo)`` keeps the relative accuracy of the softmax where it matters: ``z − hi`` is exact for
    the large logits, so the target of a peaked row, whose gradient is ``1 − p`` with ``p`` close to 1, is not
    swamped by one fp32 rounding of ``lse`` (for ``lse ≈ 20`` that rounding alone is 1e-6 absolute).
    """
    hi = lse.to(dtype)
    return hi, (lse - hi.to(torch.float64)).to(dtype)


def _tile_grad_(
    z: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor, g: torch.Tensor, v0: int, opts: LogprobOptions
) -> torch.Tensor:
    """Turn a tile of logits ``z`` into ``dL/d(raw logits)`` in place.

    ``dL/dz = g ⊙ (onehot(y) − exp(z − lse))``; with softcap, ``z = c·tanh(u/c)`` so ``dz/du = 1 − (z/c)²``;
    then the ``logit_scale`` factor. ``lse`` is float64 and enters as ``hi + lo`` in ``z``'s dtype (see
    ``lse_split``).
    """
    if opts.softcap is not None:
        chain = 1.0 - (z / opts.softcap) ** 2
    hi, lo = lse_split(lse, z.dtype)
    # exp(z − hi − lo) = exp(z − hi)·exp(−lo): the per-row factor joins −g, so no extra pass over the tile
    z.sub_(hi[:, None]).exp_().mul_((-g * torch.exp(-lo))[:, None])
    local = labels - v0
    hit = (local >= 0) & (local < z.shape[1])
    idx = local.clamp(0, z.shape[1] - 1).long()[:, None]
    z.scatter_add_(1, idx, torch.where(hit, g, torch.zeros_like(g))[:, None])
    if opts.softcap is not None:
        z.mul_(chain)
    if opts.logit_scale != 1.0:
        z.mul_(opts.logit_scale)
    return z


def forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    opts: LogprobOptions,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logp [N] (fp32; fp64 for fp64 inputs), lse [N] (fp64). ``logp`` is 0 where ``labels == ignore_index``.

    The running (max, sum-exp) across vocab chunks is kept in float64: a peaked row's small chunk sums must not
    be rounded against its large one.
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    dt = compute_dtype(hidden.dtype)
    f64 = torch.float64
    logp = torch.zeros(n, dtype=dt, device=hidden.device)
    lse = torch.zeros(n, dtype=f64, device=hidden.device)
    chunk_t, chunk_v = opts.tile(n, vocab)
    for t0 in range(0, n, chunk_t):
        t1 = min(t0 + chunk_t, n)
        h = hidden[t0:t1]
        y = labels[t0:t1]
        run_max = torch.full((t1 - t0,), float("-inf"), dtype=f64, device=hidden.device)
        run_sum = torch.zeros(t1 - t0, dtype=f64, device=hidden.device)
        target = torch.zeros(t1 - t0, dtype=dt, device=hidden.device)
        for v0 in range(0, vocab, chunk_v):
            v1 = min(v0 + chunk_v, vocab)
            z = _tile_logits(h, weight[v0:v1], None if bias is None else bias[v0:v1], opts, dt)
            tile_max = z.max(dim=1).values
            tile_sum = torch.exp(z - tile_max[:, None]).sum(dim=1).to(f64)
            new_max = torch.maximum(run_max, tile_max.to(f64))
            run_sum = run_sum * torch.exp(run_max - new_max) + tile_sum * torch.exp(tile_max.to(f64) - new_max)
            run_max = new_max
            local = y - v0
            hit = (local >= 0) & (local < v1 - v0)
            picked = z.gather(1, local.clamp(0, v1 - v0 - 1).long()[:, None]).squeeze(1)
            target = torch.where(hit, picked, target)
        chunk_lse = run_max + torch.log(run_sum)
        lse[t0:t1] = chunk_lse
        valid = y != opts.ignore_index
        logp[t0:t1] = torch.where(valid, target.to(f64) - chunk_lse, torch.zeros_like(chunk_lse)).to(dt)
    return logp, lse


def backward(
    grad_logp: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    opts: LogprobOptions,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients (dhidden, dweight, dbias) for an upstream ``grad_logp`` [N]; recomputes each tile."""
    n, vocab = hidden.shape[0], weight.shape[0]
    dt = compute_dtype(hidden.dtype)
    need_h, need_w, need_b = needs
    g_all = torch.where(labels != opts.ignore_index, grad_logp.to(dt), torch.zeros((), dtype=dt, device=hidden.device))
    dh = torch.zeros(hidden.shape, dtype=dt, device=hidden.device) if need_h else None
    dw = torch.zeros(weight.shape, dtype=dt, device=weight.device) if need_w else None
    db = torch.zeros(vocab, dtype=dt, device=weight.device) if (need_b and bias is not None) else None
    chunk_t, chunk_v = opts.tile(n, vocab)
    for t0 in range(0, n, chunk_t):
        t1 = min(t0 + chunk_t, n)
        g = g_all[t0:t1]
        if not bool((g != 0).any()):
            continue
        h = hidden[t0:t1].to(dt)
        for v0 in range(0, vocab, chunk_v):
            v1 = min(v0 + chunk_v, vocab)
            w = weight[v0:v1].to(dt)
            z = _tile_logits(h, w, None if bias is None else bias[v0:v1], opts, dt)
            dz = _tile_grad_(z, lse[t0:t1], labels[t0:t1], g, v0, opts)
            if dh is not None:
                dh[t0:t1].addmm_(dz, w)
            if dw is not None:
                dw[v0:v1].addmm_(dz.T, h)
            if db is not None:
                db[v0:v1] += dz.sum(dim=0)
    return (
        None if dh is None else dh.to(hidden.dtype),
        None if dw is None else dw.to(weight.dtype),
        None if db is None else db.to(bias.dtype),
    )


def forward_keep(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    opts: LogprobOptions,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Like ``forward`` but keeps the ``[n, V]`` logits for ``backward_saved`` (caller bounds ``n``).

    ``out``: a contiguous ``dt`` buffer of at least ``n·V`` elements on the inputs' device (e.g. an earlier chunk's
    consumed ``saved``) to hold the logits instead of a fresh allocation.
    """
    dt = compute_dtype(hidden.dtype)
    n, v = hidden.shape[0], weight.shape[0]
    if out is not None:
        if out.dtype != dt or out.device != hidden.device or not out.is_contiguous() or out.numel() < n * v:
            raise ValueError(
                f"out must be a contiguous {dt} tensor on {hidden.device} with at least N*V = {n * v} elements, "
                f"got {tuple(out.shape)} {out.dtype} on {out.device}"
            )
        out = out.view(-1)[: n * v].view(n, v)
    z = _tile_logits(hidden, weight, bias, opts, dt, out)
    lse = torch.empty(z.shape[0], dtype=torch.float64, device=z.device)
    rows = max(1, (1 << 22) // max(z.shape[1], 1))  # the exp temporary stays ~16 MiB
    for r0 in range(0, z.shape[0], rows):
        zr = z[r0 : r0 + rows]
        m = zr.max(dim=1).values
        s = torch.exp(zr - m[:, None]).sum(dim=1)
        lse[r0 : r0 + rows] = m.to(torch.float64) + s.to(torch.float64).log()
    valid = labels != opts.ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    picked = z.gather(1, safe[:, None]).squeeze(1).to(torch.float64)
    logp = torch.where(valid, picked - lse, torch.zeros_like(lse)).to(dt)
    return logp, lse, z


def backward_saved(
    saved: torch.Tensor,
    grad_logp: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    opts: LogprobOptions,
    needs: tuple[bool, bool, bool],
    dw_acc: torch.Tensor | None = None,
    db_acc: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients from the logits kept by ``forward_keep`` (2 GEMMs, no recompute); dW/db in fp32/fp64.

    With ``dw_acc`` / ``db_acc`` (accumulation-dtype buffers) the chunk's dW/db are added into them in place
    and they are returned, so a loop over chunks needs no second ``[V, D]`` buffer.
    """
    dt = saved.dtype
    g = torch.where(labels != opts.ignore_index, grad_logp.to(dt), torch.zeros((), dtype=dt, device=saved.device))
    dz = _tile_grad_(saved, lse, labels, g, 0, opts)
    need_h, need_w, need_b = needs
    dh = (dz @ weight.to(dt)).to(hidden.dtype) if need_h else None
    dw = db = None
    if need_w:
        dw = dz.T @ hidden.to(dt) if dw_acc is None else dw_acc.addmm_(dz.T, hidden.to(dt))
    if need_b and bias is not None:
        db = dz.sum(dim=0) if db_acc is None else db_acc.add_(dz.sum(dim=0))
    return dh, dw, db
