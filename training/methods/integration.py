"""Config → RM methods in the training loop: data rewriting before training, and ``TrainHooks`` during it.

Reads these ``TrainConfig`` fields (all off by default; ``getattr`` defaults keep older configs working):

- ``noisy_mode`` (``""`` | flip | drop | soft), ``noisy_fraction`` / ``noisy_threshold``, ``strength_column``
  (``strength_mean``), ``noisy_soft_mode`` / ``noisy_soft_epsilon`` / ``noisy_soft_weight``: the training file
  is rewritten by ``noisy.apply_noisy_mode`` into ``<run_dir>/method_data/train.jsonl`` and pair weights are
  read from its ``weight`` column;
- ``adaptive_margin`` (λ; 0 = off): ``reward_margin = λ · strength_mean`` (through the trainer's
  ``margin_column`` / ``margin_scale``);
- ``contrastive`` (``""`` | simcse | swav), ``contrastive_on`` (pair | diff), ``contrastive_weight`` /
  ``contrastive_temperature`` / ``contrastive_prototypes`` (≤ 0: the paper's defaults), ``contrastive_dropout``:
  an auxiliary loss on ``out.features`` (SwAV's prototypes live in ``model.rm_methods``);
- ``metarm_data`` (jsonl of ``prompt`` + ``responses``), ``metarm_k``, ``metarm_inner_lr``, ``metarm_prompts``
  (prompts per step), ``metarm_first_order``: each step's loss is computed at the look-ahead parameters
  ``θ' = θ + η∇J`` (``TrainHooks.forward_params``).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import read_records
from . import contrastive as C
from . import metarm as MR
from . import noisy as N


def _get(cfg: Any, name: str, default: Any) -> Any:
    return getattr(cfg, name, default)


def prepare_method_data(cfg: Any) -> Any:
    """A config whose training data / columns implement the noisy-pair mode and the adaptive margin.

    Returns ``cfg`` unchanged when neither is on. Flip/drop/soft need a ``strength_column`` in the data
    (written by ``haf-strength``).
    """
    mode = _get(cfg, "noisy_mode", "") or ""
    lam = float(_get(cfg, "adaptive_margin", 0.0) or 0.0)
    col = _get(cfg, "strength_column", "strength_mean") or "strength_mean"
    changes: dict[str, Any] = {}
    if mode:
        path = Path(cfg.run_dir) / "method_data" / "train.jsonl"
        if path.exists() and Path(cfg.train_data).resolve() == path.resolve():
            return cfg  # a saved config of a run whose data was already rewritten
        if not cfg.eval_data:
            raise ValueError("noisy_mode rewrites the training file (soft mode adds rows); give eval_data explicitly")
        rows = read_records(cfg.train_data)
        thr = _get(cfg, "noisy_threshold", None)
        frac = _get(cfg, "noisy_fraction", 0.1)
        use_thr = thr is not None and not (isinstance(thr, float) and thr != thr)  # NaN = unset
        out = N.apply_noisy_mode(
            rows,
            mode,
            threshold=float(thr) if use_thr else None,
            fraction=None if use_thr else float(frac),
            soft_mode=_get(cfg, "noisy_soft_mode", "smooth"),
            soft_epsilon=float(_get(cfg, "noisy_soft_epsilon", 0.3)),
            soft_weight=float(_get(cfg, "noisy_soft_weight", 0.5)),
            strength_key=col,
            weight_key="weight",
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for row in out:
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, path)  # every rank writes the same content; the replace is atomic
        changes.update(train_data=str(path), weight_column="weight")
    if lam:
        changes.update(margin_column=col, margin_scale=lam)
    return cfg.replace(**changes) if changes else cfg


# ---------------------------------------------------------------------------------------------- contrastive
def add_contrastive(model: nn.Module, cfg: Any) -> None:
    """``on_model`` hook: registers ``model.rm_methods["contrastive"]`` (so its parameters are optimised)."""
    method = _get(cfg, "contrastive", "") or ""
    if not method:
        return
    dim = model.lm_head_weight.shape[1]
    w = float(_get(cfg, "contrastive_weight", -1.0))
    t = float(_get(cfg, "contrastive_temperature", -1.0))
    k = int(_get(cfg, "contrastive_prototypes", 0))
    with torch.random.fork_rng():
        torch.manual_seed(int(cfg.seed) + 7)
        mod = C.ContrastiveLoss(
            dim,
            method,
            _get(cfg, "contrastive_on", "pair") or "pair",
            weight=w if w >= 0 else None,
            temperature=t if t > 0 else None,
            dropout=float(_get(cfg, "contrastive_dropout", 0.05)),
            num_prototypes=k if k > 0 else None,
        )
    if not hasattr(model, "rm_methods"):
        model.rm_methods = nn.ModuleDict()
    model.rm_methods["contrastive"] = mod.to(model.lm_head_weight.device)


def contrastive_aux_loss(out: Any, batch: Any, model: nn.Module, step: int) -> torch.Tensor | None:
    """``aux_loss`` hook: ``weight · L_contrastive(out.features)``."""
    mods = getattr(model, "rm_methods", None)
    if mods is None or "contrastive" not in mods:
        return None
    return mods["contrastive"](out.features.float())


# ---------------------------------------------------------------------------------------------- MetaRM
class ShiftedPool:
    """Tokenised MetaRM pool: prompts with k responses each, sampled P prompts per step (seeded by step)."""

    def __init__(self, path: str | Path, tokenizer: Any, *, k: int, max_length: int, max_prompt_length: int) -> None:
        from ..data import tokenize_pair, truncate

        self.k, self.pad = k, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.items: list[list[list[int]]] = []
        for row in read_records(path):
            resp = list(row["responses"])
            if len(resp) < k:
                continue
            seqs = []
            for j in range(k):
                p, r, _ = tokenize_pair(tokenizer, row.get("prompt", ""), resp[j], resp[j])
                p, r = truncate(p, r, max_length, max_prompt_length)
                seqs.append(p + r)
            self.items.append(seqs)
        if not self.items:
            raise ValueError(f"{path}: no prompt with at least k={k} responses")

    def batch(self, n_prompts: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` ``[P·k, T]`` right-padded, prompt-major."""
        rng = random.Random(seed)
        pick = rng.sample(range(len(self.items)), min(n_prompts, len(self.items)))
        seqs = [s for i in pick for s in self.items[i]]
        t = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), t), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), t), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        return ids.to(device), mask.to(device)


def metarm_forward_params(cfg: Any, tokenizer: Any):
    """``forward_params(model, step)`` hook: the look-ahead ``θ' = θ + η∇J(X_s)`` for this step's shifted batch."""
    k = int(_get(cfg, "metarm_k", 4))
    pool = ShiftedPool(
        cfg.metarm_data, tokenizer, k=k, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length
    )
    eta = float(_get(cfg, "metarm_inner_lr", 0.1))
    n_prompts = int(_get(cfg, "metarm_prompts", 8))
    first_order = bool(_get(cfg, "metarm_first_order", False))
    log: dict[str, float] = {}

    def forward_params(model: nn.Module, step: int) -> dict[str, torch.Tensor]:
        ids, mask = pool.batch(n_prompts, int(cfg.seed) * 1_000_003 + step, model.lm_head_weight.device)
        params = MR.trainable_params(model)
        fast, j0 = MR.inner_step(model, params, ids, mask, k=k, inner_lr=eta, first_order=first_order)
        log["metarm_J"] = float(j0) if step % max(1, int(cfg.log_every)) == 0 else log.get("metarm_J", float("nan"))
        return fast

    forward_params.log = log  # type: ignore[attr-defined]
    return forward_params


def method_hooks(cfg: Any, tokenizer: Any = None, base: Any = None) -> Any:
    """``TrainHooks`` for the configured methods (``base`` hooks' callables are kept where not overridden)."""
    from ..hooks import TrainHooks

    hooks = base if base is not None else TrainHooks()
    if _get(cfg, "contrastive", ""):
        prev_on_model = hooks.on_model

        def on_model(model, c):
            if prev_on_model is not None:
                prev_on_model(model, c)
            add_contrastive(model, c)

        hooks.on_model = on_model
        hooks.aux_loss = hooks.aux_loss or contrastive_aux_loss
    if _get(cfg, "metarm_data", ""):
        if tokenizer is None:
            from ..data import load_tokenizer

            tokenizer = load_tokenizer(cfg)
        hooks.forward_params = metarm_forward_params(cfg, tokenizer)
    return hooks
