"""The HaF reward-model training loop. Reads top to bottom: setup, data, model, reference, optimiser,
resume, loop (accumulate → clip → step → log / eval / checkpoint), final eval, export, plots.

Every step's loss is ``haf_kernels.fused_haf_loss`` (no full-vocab logits). Extension points for RM methods
(see ``TrainHooks``):

- ``hooks.on_model(model, cfg)``: add sub-modules (e.g. prototypes) before the optimiser / DDP / FSDP wrap;
- ``hooks.pair_terms(batch, cfg) -> (reward_margin | None, pair_weights | None)``: per-pair loss inputs;
  default ``default_pair_terms`` reads ``cfg.margin_column`` (× ``cfg.margin_scale``) and ``cfg.weight_column``
  from ``batch.columns`` (every numeric data column is there, e.g. ``strength``, ``strength_mean``);
- ``hooks.aux_loss(out, batch, model, step) -> Tensor | None``: added to the loss *inside* the model's forward
  (``out.features`` are the reward-head inputs; parameters are gathered there under FSDP);
- ``hooks.on_step_end(state)``: after each optimiser step (``state`` is a ``StepState``);
- ``hooks.forward_params(model, step) -> {name: tensor}``: compute the step's loss at other (look-ahead)
  parameters, e.g. MetaRM's ``θ' = θ + η∇J``; gradients flow back to the model's own parameters.

The RM methods of ``training/methods`` (noisy-pair flip/drop/soft, adaptive margin, SimCSE/SwAV, MetaRM) are
switched on by config fields: ``prepare_method_data`` rewrites the data, ``method_hooks`` adds their hooks.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from haf_kernels import fused_haf_loss

from . import checkpoint as ckpt
from . import distributed as D
from .config import TrainConfig
from .data import PairBatch, PreferenceDataset, collate_pairs, load_preferences
from .evaluate import evaluate
from .model import HafRewardModel, RewardModelOutput, apply_lora, build_causal_lm, frozen_copy
from .reference import ReferenceLogps, for_loss
from .tracking import MetricsLogger, plot_curves


@dataclass
class TrainHooks:
    """Optional callables that plug RM methods into the loop (see the module docstring)."""

    on_model: Callable[[HafRewardModel, TrainConfig], None] | None = None
    pair_terms: Callable[[PairBatch, TrainConfig], tuple[Any, Any]] | None = None
    aux_loss: Callable[[RewardModelOutput, PairBatch, HafRewardModel, int], torch.Tensor | None] | None = None
    on_step_end: Callable[[StepState], None] | None = None
    # MetaRM: parameters (name → tensor, differentiable functions of the model's) at which this step's loss is
    # computed, through ``torch.func.functional_call``; ``None`` = the model's own (single process only)
    forward_params: Callable[[HafRewardModel, int], dict[str, torch.Tensor] | None] | None = None


@dataclass
class StepState:
    """What ``on_step_end`` sees: the step just finished and the live objects of the run."""

    step: int
    model: torch.nn.Module
    raw_model: HafRewardModel
    optimizer: torch.optim.Optimizer
    cfg: TrainConfig
    info: D.DistInfo
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- building blocks
def load_tokenizer(cfg: TrainConfig):
    """The synthetic task's word-level tokenizer (``"synthetic"``) or ``AutoTokenizer`` (pad set if missing)."""
    if cfg.tokenizer == "synthetic":
        from .synthetic import SyntheticTask

        return SyntheticTask().tokenizer()
    from .data import load_tokenizer_dir

    tok = load_tokenizer_dir(cfg.tokenizer or cfg.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = "right"
    return tok


def load_data(cfg: TrainConfig, tokenizer: Any) -> tuple[PreferenceDataset, PreferenceDataset]:
    """Train and held-out datasets; without ``eval_data`` a seeded ``eval_fraction`` of train is held out."""
    kw = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length, skip_bad_rows=cfg.skip_bad_rows)
    train = load_preferences(cfg.train_data, tokenizer, split=cfg.train_split, limit=cfg.max_train_rows or None, **kw)
    if cfg.eval_data:
        held = load_preferences(cfg.eval_data, tokenizer, split=cfg.eval_split, limit=cfg.max_eval_rows or None, **kw)
        return train, held
    n_eval = max(1, int(len(train) * cfg.eval_fraction))
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed + 12345)).tolist()
    pick = lambda ids: [train.examples[i] for i in sorted(ids)]
    ev, tr = pick(perm[:n_eval]), pick(perm[n_eval:])
    for i, ex in enumerate(tr):
        ex.index = i
    for i, ex in enumerate(ev):
        ex.index = i
    return PreferenceDataset(tr, train.report), PreferenceDataset(ev, train.report)


def build_model(cfg: TrainConfig, tokenizer: Any) -> HafRewardModel:
    """``HafRewardModel`` around a pretrained or from-config causal LM, LoRA-wrapped if ``lora_r > 0``."""
    overrides = dict(cfg.model_config)
    if not cfg.model:
        overrides.setdefault("vocab_size", len(tokenizer))
        for name in ("pad", "bos", "eos"):
            tid = getattr(tokenizer, f"{name}_token_id", None)
            if tid is not None:
                overrides.setdefault(f"{name}_token_id", tid)
    lm = build_causal_lm(
        pretrained=cfg.model or None, model_type=cfg.model_type, config_overrides=overrides, seed=cfg.seed
    )
    if tokenizer.pad_token_id is not None:
        lm.config.pad_token_id = tokenizer.pad_token_id
    if cfg.gradient_checkpointing:
        if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5 name
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed + 1)
        model = HafRewardModel(lm)
    if cfg.lora_r > 0:
        model = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_target_modules, cfg.lora_dropout)
    return model


def default_pair_terms(batch: PairBatch, cfg: TrainConfig) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(reward_margin [B], pair_weights [B])`` from the configured data columns (``None`` when unused)."""
    margin = weights = None
    if cfg.margin_column:
        if cfg.margin_column not in batch.columns:
            raise KeyError(f"margin_column {cfg.margin_column!r} not in the data (has {sorted(batch.columns)})")
        margin = cfg.margin_scale * torch.nan_to_num(batch.columns[cfg.margin_column], nan=0.0)
    if cfg.weight_column:
        if cfg.weight_column not in batch.columns:
            raise KeyError(f"weight_column {cfg.weight_column!r} not in the data (has {sorted(batch.columns)})")
        weights = torch.nan_to_num(batch.columns[cfg.weight_column], nan=1.0)
    return margin, weights


def lr_lambda(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up to 1, then cosine decay to ``min_lr_ratio``."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / max(1, cfg.warmup_steps)
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def step_indices(step: int, n: int, cfg: TrainConfig, seed: int) -> list[int]:
    """Dataset indices of optimiser step ``step`` (all ranks, all micro-batches): stateless, so resumable."""
    per_epoch = max(1, n // cfg.batch_size)
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return perm[pos * cfg.batch_size : (pos + 1) * cfg.batch_size].tolist()


# ---------------------------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, hooks: TrainHooks | None = None) -> dict[str, Any]:
    """Train a HaF reward model; returns the final metrics (on rank 0; ``{}`` on other ranks)."""
    from .methods.integration import method_hooks, prepare_method_data

    cfg = prepare_method_data(cfg.validate())
    hooks = hooks or TrainHooks()
    t_start = time.time()

    # ---- processes, device, precision, seeds
    info = D.setup(cfg.device, cfg.distributed)
    device = info.device
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    use_bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")
    amp_dtype = torch.bfloat16 if use_bf16 else None
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)  # noqa: E731
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.run_dir)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    log = print if info.is_main else (lambda *a, **k: None)

    # ---- data
    tokenizer = load_tokenizer(cfg)
    hooks = method_hooks(cfg, tokenizer, hooks)
    if hooks.forward_params is not None and info.world_size > 1:
        raise ValueError("forward_params (MetaRM) runs single-process only")
    train_ds, eval_ds = load_data(cfg, tokenizer)
    log(f"[haf-train] {train_ds.report.summary()}; train {len(train_ds)} / eval {len(eval_ds)} pairs")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    per_step = cfg.micro_batch_size * info.world_size
    if cfg.batch_size % per_step:
        raise ValueError(
            f"batch_size {cfg.batch_size} must be a multiple of micro_batch_size × world "
            f"({cfg.micro_batch_size} × {info.world_size})"
        )
    accum = cfg.batch_size // per_step
    steps_per_epoch = max(1, len(train_ds) // cfg.batch_size)
    max_steps = cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch))

    # ---- model and reference (the reference sees the initial weights, also when resuming)
    model = build_model(cfg, tokenizer).to(device)
    if hooks.on_model is not None:
        hooks.on_model(model, cfg)
    mode = cfg.reference_mode
    reference = ReferenceLogps(mode, backend=cfg.backend, amp_dtype=amp_dtype)
    if mode == "copy":
        reference.ref_model = frozen_copy(model)
    elif mode == "precomputed":
        key = {
            k: v
            for k, v in cfg.to_dict().items()
            if k
            in ("model", "model_type", "model_config", "tokenizer", "max_length", "max_prompt_length", "seed", "dtype")
        }
        reference.precompute(
            model,
            {"train": train_ds, "eval": eval_ds},
            cache_dir=cfg.ref_cache_dir or run_dir / "ref_cache",
            key_extra=key,
            pad_token_id=pad_id,
            batch_size=cfg.eval_batch_size,
            device=device,
            write=info.is_main,
            autocast=autocast,
        )
    averaged = cfg.average_log_prob or cfg.policy_loss == "simpo"
    log(
        f"[haf-train] reference: {mode}; {sum(p.numel() for p in model.parameters() if p.requires_grad):,} "
        f"trainable parameters; {max_steps} steps × {cfg.batch_size} pairs (accum {accum}, world {info.world_size})"
    )

    # ---- resume: model weights before wrapping, optimiser/scheduler/RNG after building them
    ckpt_path = run_dir / ckpt.CHECKPOINT
    state = ckpt.load(ckpt_path) if cfg.resume and ckpt_path.exists() else None
    if state is not None:
        ignore = {"resume", "max_steps", "debug_step_sleep", "progress", "num_threads", "run_dir", "eval_every"}
        now = cfg.to_dict()
        changed = sorted(k for k, v in state["config"].items() if k not in ignore and not _same(now.get(k), v))
        if changed:
            log(f"[haf-train] warning: resuming with a config that differs from the checkpoint's in {changed}")
    if state is not None and info.mode != "fsdp":
        model.load_state_dict(state["model"])

    # ---- wrap (DDP / FSDP2), optimiser, schedule
    wrapped = D.wrap(model, info, find_unused_parameters=cfg.alpha == 0 or hooks.aux_loss is not None)
    head_ids = {id(p) for p in model.reward_head.parameters()}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    head = [p for p in model.parameters() if p.requires_grad and id(p) in head_ids]
    optimizer = torch.optim.AdamW(
        [{"params": body, "lr": cfg.lr}, {"params": head, "lr": cfg.head_lr or cfg.lr}],
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, max_steps))
    start_step = 0
    if state is not None:
        if info.mode == "fsdp":
            _set_fsdp_state(wrapped, optimizer, state)
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        start_step = state["step"]
        log(f"[haf-train] resumed from {ckpt_path} at step {start_step}")
    del state
    logger = MetricsLogger(
        run_dir, enabled=info.is_main, tensorboard=cfg.tensorboard, resume_step=start_step if cfg.resume else None
    )
    if info.is_main:
        (run_dir / "config.json").write_text(__import__("json").dumps(cfg.to_dict(), indent=2))

    def run_eval(step: int, split: str) -> dict[str, float]:
        metrics = evaluate(
            wrapped,
            model,
            eval_ds,
            reference=reference,
            split="eval",
            pad_token_id=pad_id,
            batch_size=cfg.eval_batch_size,
            beta=cfg.beta,
            averaged=averaged,
            info=info,
            autocast=autocast,
            backend=cfg.backend,
            amp_dtype=amp_dtype,
        )
        logger.log(step, split, metrics)
        return metrics

    def save(step: int) -> None:
        payload = _gather_state(wrapped, model, optimizer, info)
        if info.is_main:
            payload.update(step=step, config=cfg.to_dict(), scheduler=scheduler.state_dict(), rng=ckpt.rng_state())
            ckpt.save_atomic(payload, ckpt_path)
        D.barrier(info)

    # ---- the loop
    pair_terms = hooks.pair_terms or default_pair_terms
    progress = None
    if cfg.progress and info.is_main:
        from tqdm.auto import tqdm

        progress = tqdm(total=max_steps, initial=start_step, desc="haf-train", dynamic_ncols=True)
    model.train()
    sums: dict[str, torch.Tensor] = {}
    n_acc = 0
    t_log = time.time()
    for step in range(start_step, max_steps):
        idx = step_indices(step, len(train_ds), cfg, cfg.seed)
        for micro in range(accum):
            lo = (micro * info.world_size + info.rank) * cfg.micro_batch_size
            batch = collate_pairs([train_ds[i] for i in idx[lo : lo + cfg.micro_batch_size]], pad_id).to(device)
            with autocast():
                ref = for_loss(reference(batch, "train", model=wrapped, raw=model), averaged)
            margin, weights = pair_terms(batch, cfg)

            def compute(out: RewardModelOutput, m: HafRewardModel):
                w, b = m.lm_head_weight, m.lm_head_bias
                dt = amp_dtype or w.dtype
                res = fused_haf_loss(
                    out.hidden.to(dt),
                    w.to(dt),
                    batch.labels,
                    out.rewards.float(),
                    ref,
                    beta=cfg.beta,
                    alpha=cfg.alpha,
                    reward_weight=cfg.reward_weight,
                    policy_loss=cfg.policy_loss,
                    simpo_gamma=cfg.simpo_gamma,
                    average_log_prob=cfg.average_log_prob,
                    reward_margin=margin,
                    label_smoothing=cfg.label_smoothing,
                    pair_weights=weights,
                    lm_head_bias=None if b is None else b.to(dt),
                    logit_scale=m.logit_scale,
                    softcap=m.softcap,
                    backend=cfg.backend,
                )
                loss = res.loss
                aux = hooks.aux_loss(out, batch, m, step) if hooks.aux_loss is not None else None
                if aux is not None:
                    loss = loss + aux
                return loss, res, aux

            sync = micro == accum - 1 or info.mode != "ddp"
            fast = hooks.forward_params(model, step) if hooks.forward_params is not None else None
            with contextlib.nullcontext() if sync else wrapped.no_sync(), autocast():
                if fast is None:
                    loss, res, aux = wrapped(batch.input_ids, batch.attention_mask, compute=compute)
                else:  # look-ahead parameters (MetaRM): the same forward, functionally
                    loss, res, aux = torch.func.functional_call(
                        model, fast, (batch.input_ids, batch.attention_mask), {"compute": compute}
                    )
            (loss / accum).backward()
            for k, v in (
                ("loss", loss),
                ("reward_loss", res.reward_loss),
                ("policy_loss", res.policy_loss),
                ("reward_accuracy", res.reward_accuracy),
                ("implicit_accuracy", res.implicit_accuracy),
                ("aux_loss", aux),
            ):
                if v is not None:
                    sums[k] = sums.get(k, 0.0) + v.detach().float()
            n_acc += 1
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else 1e30)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if cfg.debug_step_sleep:
            time.sleep(cfg.debug_step_sleep)
        if hooks.on_step_end is not None:
            hooks.on_step_end(StepState(done, wrapped, model, optimizer, cfg, info))

        if done % cfg.log_every == 0 or done == max_steps:  # the only host syncs of the loop
            vec = torch.stack([sums[k] for k in sorted(sums)]) / n_acc
            vec = D.all_reduce_mean(vec, info).tolist()
            gn = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            metrics = dict(zip(sorted(sums), vec))
            metrics.update(
                grad_norm=float(gn),
                lr=scheduler.get_last_lr()[0],
                pairs_per_s=cfg.batch_size * cfg.log_every / max(time.time() - t_log, 1e-9),
            )
            logger.log(done, "train", metrics)
            if progress is not None:
                progress.set_postfix(
                    loss=f"{metrics['loss']:.4f}",
                    acc=f"{metrics['reward_accuracy']:.3f}",
                    iacc=f"{metrics['implicit_accuracy']:.3f}",
                )
            sums, n_acc, t_log = {}, 0, time.time()
        if cfg.eval_every and done % cfg.eval_every == 0 and done < max_steps:
            run_eval(done, "eval")
        if cfg.save_every and done % cfg.save_every == 0 and done < max_steps:
            save(done)
        if progress is not None:
            progress.update(1)
    if progress is not None:
        progress.close()

    # ---- final evaluation, checkpoint, export, plots
    final = run_eval(max_steps, "final")
    save(max_steps)
    if info.is_main:
        if cfg.export:
            from .export import export_pretrained

            export_pretrained(model, tokenizer, run_dir / "export")
        logger.close()
        if cfg.plots:
            plot_curves(logger.history, run_dir / "curves.png")
        final = dict(final, wall_s=time.time() - t_start, run_dir=str(run_dir))
    D.cleanup(info)
    return final


def _same(a: Any, b: Any) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


# ---------------------------------------------------------------------------------------------- state (FSDP-aware)
def _gather_state(wrapped: torch.nn.Module, model: HafRewardModel, optimizer, info: D.DistInfo) -> dict[str, Any]:
    """Full (unsharded) model and optimiser state; a collective under FSDP, plain ``state_dict`` otherwise."""
    if info.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        msd, osd = get_state_dict(wrapped, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {"model": msd, "optimizer": osd}
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}


def _set_fsdp_state(wrapped: torch.nn.Module, optimizer, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(
        wrapped,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=StateDictOptions(full_state_dict=True),
    )


def load_trained(run_dir: str | Path, device: str = "cpu") -> tuple[HafRewardModel, Any, TrainConfig]:
    """``(model, tokenizer, config)`` of a finished run directory (from its checkpoint)."""
    state = ckpt.load(Path(run_dir) / ckpt.CHECKPOINT)
    cfg = TrainConfig.from_dict(state["config"])
    tokenizer = load_tokenizer(cfg)
    model = build_model(cfg, tokenizer)
    # auxiliary method modules (e.g. SwAV prototypes under ``rm_methods``) are not part of the reward model
    model.load_state_dict({k: v for k, v in state["model"].items() if not k.startswith("rm_methods.")})
    return model.to(device).eval(), tokenizer, cfg
