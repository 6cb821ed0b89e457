"""Reference-model sequence log-probs: LoRA adapter disabled, a frozen copy, precomputed (disk cache), or none.

Every mode answers ``ReferenceLogps(batch, split) -> (sums [2B], counts [2B])`` or ``None`` (reference-free);
``for_loss`` turns that into the ``ref_logps`` argument of ``fused_haf_loss`` (per-token means when the
loss averages log-probs).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from haf_kernels import objectives, sequence_logprobs

from .data import PairBatch, PreferenceDataset, collate_pairs
from .model import HafRewardModel, RewardModelOutput


def seq_logprobs_fn(labels: torch.Tensor, backend: str = "auto", amp_dtype: torch.dtype | None = None) -> Callable:
    """A ``compute`` callable for ``HafRewardModel.forward``: ``(sums [S], counts [S])`` of ``labels``."""

    def compute(out: RewardModelOutput, m: HafRewardModel):
        w, b = m.lm_head_weight, m.lm_head_bias
        dt = amp_dtype or w.dtype
        return sequence_logprobs(
            out.hidden.to(dt),
            w.to(dt),
            labels,
            bias=None if b is None else b.to(dt),
            logit_scale=m.logit_scale,
            softcap=m.softcap,
            backend=backend,
        )

    return compute


def model_fingerprint(model: torch.nn.Module, extra: Any = None) -> str:
    """Cheap hash of a model's initial weights (the first 256 values of every tensor) and ``extra``."""
    h = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().reshape(-1)[:256].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class ReferenceLogps:
    """Reference sequence log-probs for one training run.

    Args:
        mode: ``"lora"`` (same model, adapter disabled), ``"copy"`` (frozen deep copy), ``"precomputed"``
            (computed once before training, cached on disk), ``"none"`` (reference-free).
    """

    def __init__(self, mode: str, *, backend: str = "auto", amp_dtype: torch.dtype | None = None) -> None:
        self.mode = mode
        self.backend = backend
        self.amp_dtype = amp_dtype
        self.ref_model: HafRewardModel | None = None
        self.tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # split -> (sums [N, 2], counts [N, 2])
        self.cache_path: Path | None = None

    # ------------------------------------------------------------------ precomputed
    @torch.no_grad()
    def precompute(
        self,
        model: HafRewardModel,
        datasets: dict[str, PreferenceDataset],
        *,
        cache_dir: str | os.PathLike,
        key_extra: Any,
        pad_token_id: int,
        batch_size: int,
        device: torch.device,
        write: bool = True,
        autocast: Callable[[], Any] | None = None,
    ) -> None:
        """Forward-only pass of the *initial* model over every split; loads the disk cache when the key matches."""
        key = model_fingerprint(model, key_extra)
        key += (
            "-"
            + hashlib.sha256(
                "".join(f"{k}:{d.fingerprint()}" for k, d in sorted(datasets.items())).encode()
            ).hexdigest()[:16]
        )
        path = Path(cache_dir) / f"ref_logps_{key}.pt"
        self.cache_path = path
        if path.exists():
            from .checkpoint import CheckpointError

            try:
                self.load_cache(path)
                return
            except CheckpointError as exc:  # torn, corrupted or unsafe: never unpickled; recomputed below
                print(f"[haf-train] warning: {exc}; recomputing it")
        was_training = model.training
        model.eval()
        for split, ds in datasets.items():
            sums = torch.zeros(len(ds), 2)
            counts = torch.zeros(len(ds), 2, dtype=torch.long)
            for i in range(0, len(ds), batch_size):
                batch = collate_pairs([ds[j] for j in range(i, min(i + batch_size, len(ds)))], pad_token_id).to(device)
                ctx = autocast() if autocast is not None else torch.autocast("cpu", enabled=False)
                with ctx:
                    s, c = model(
                        batch.input_ids,
                        batch.attention_mask,
                        compute=seq_logprobs_fn(batch.labels, self.backend, self.amp_dtype),
                    )
                b = batch.n_pairs
                sums[i : i + b] = torch.stack([s[:b], s[b:]], 1).float().cpu()
                counts[i : i + b] = torch.stack([c[:b], c[b:]], 1).cpu()
            self.tables[split] = (sums, counts)
        model.train(was_training)
        if write:
            from .checkpoint import save_atomic

            save_atomic(self.tables, path)  # tensors only: loads with weights_only=True; no .tmp left on error

    def load_cache(self, path: str | os.PathLike) -> None:
        """Tables of a cache file written by ``precompute`` (``torch.load(weights_only=True)``: data, never code)."""
        from .checkpoint import CheckpointError, load_safe

        path = Path(path)
        tables = load_safe(path, what="reference log-prob cache")
        ok = isinstance(tables, dict) and all(
            isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(t, torch.Tensor) for t in v)
            for v in tables.values()
        )
        if not ok:
            raise CheckpointError(f"{path}: not a reference log-prob cache (expected split -> (sums, counts))")
        self.tables = {k: (v[0], v[1]) for k, v in tables.items()}
        self.cache_path = path

    # ------------------------------------------------------------------ lookup
    @torch.no_grad()
    def __call__(
        self, batch: PairBatch, split: str, model: torch.nn.Module | None = None, raw: HafRewardModel | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(sums [2B], counts [2B])`` for ``batch`` (``model``: the possibly wrapped training model)."""
        if self.mode == "none":
            return None
        if self.mode == "precomputed":
            sums, counts = self.tables[split]
            idx = batch.index.cpu()
            s = torch.cat([sums[idx, 0], sums[idx, 1]]).to(batch.input_ids.device)
            c = torch.cat([counts[idx, 0], counts[idx, 1]]).to(batch.input_ids.device)
            return s, c
        compute = seq_logprobs_fn(batch.labels, self.backend, self.amp_dtype)
        if self.mode == "copy":
            assert self.ref_model is not None
            return self.ref_model(batch.input_ids, batch.attention_mask, compute=compute)
        if self.mode == "lora":
            assert model is not None and raw is not None
            was_training = raw.training
            raw.eval()
            with raw.adapter_disabled():
                out = model(batch.input_ids, batch.attention_mask, compute=compute)
            raw.train(was_training)
            return out
        raise ValueError(f"unknown reference mode {self.mode!r}")


def for_loss(ref: tuple[torch.Tensor, torch.Tensor] | None, averaged: bool) -> torch.Tensor | None:
    """``ref_logps`` for ``fused_haf_loss``: sums, or per-token means when the loss averages log-probs."""
    if ref is None:
        return None
    return objectives.sequence_logps(*ref, averaged)
