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
import itertools
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from haf_kernels import fused_haf_loss, objectives

from . import checkpoint as ckpt
from . import distributed as D
from .config import ConfigError, TrainConfig
from .data import (
    PairBatch,
    PreferenceDataset,
    collate_packed,
    collate_pairs,
    load_preferences,
    load_tokenizer,
    padding_fraction,
)
from .evaluate import evaluate
from .hooks import StepState, TrainHooks
from .methods.integration import method_hooks, prepare_method_data
from .model import HafRewardModel, RewardModelOutput, apply_lora, build_causal_lm, frozen_copy, packing_problem
from .reference import ReferenceLogps, for_loss
from .tracking import MetricsLogger, format_metrics, plot_curves

BASE_DIR = "base_model"  # <run_dir>/base_model: the base LM's config.json and the tokenizer (self-contained runs)
DATA_KEYS = ("train_data", "eval_data", "metarm_data")  # fingerprinted into checkpoints (size, mtime, sha256)
# keys that may change on --resume: how far to train, how often to log/eval/save, reporting, where it runs
SAFE_ON_RESUME = frozenset(
    {
        "resume",
        "max_steps",
        "epochs",
        "log_every",
        "eval_every",
        "save_every",
        "eval_batch_size",
        "progress",
        "tensorboard",
        "plots",
        "export",
        "debug_step_sleep",
        "num_threads",
        "run_dir",
        "device",
        "distributed",
        "ref_cache_dir",
        "nonfinite",
        "nonfinite_max_skips",
        "check_finite_steps",
        "pack",  # packing changes the layout of a forward, not its results (same loss up to rounding)
        "pack_length",
    }
)


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient stopped training (or non-finite weights stopped a checkpoint)."""


# ---------------------------------------------------------------------------------------------- building blocks
def load_data(cfg: TrainConfig, tokenizer: Any) -> tuple[PreferenceDataset, PreferenceDataset]:
    """Train and held-out datasets; without ``eval_data`` a seeded ``eval_fraction`` of train is held out.

    ``PairExample.index`` is renumbered within each split (it indexes reference caches); ``source_row``, the pair's
    row in its file, is kept, so evaluation and ``haf-score`` report file rows."""
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


def check_packing(cfg: TrainConfig, model: HafRewardModel) -> None:
    """``ConfigError`` naming ``pack`` when packed rows cannot reproduce unpacked ones for this model: a known
    unsupported setting (``training.model.packing_problem``), else a failed probe (``HafRewardModel.check_packing``:
    random sequences packed vs alone, on the model itself)."""
    problem = packing_problem(model.config, cfg.max_length)
    if problem is None:
        try:
            model.check_packing()
        except ValueError as exc:
            problem = str(exc)
        except TypeError as exc:  # a body without position_ids / 4D masks
            problem = f"the model body cannot run packed rows ({exc})"
    if problem is not None:
        raise ConfigError(f"pack: {problem}; train without --pack")


def padding_report(cfg: TrainConfig, train_ds: PreferenceDataset, max_steps: int, pack_length: int) -> str:
    """One line: the share of padding among the token positions the model body runs on, unpacked and packed, over
    the micro-batches of the first epoch's steps (at most 1000 steps; all ranks' micro-batches)."""
    steps = min(max_steps, max(1, len(train_ds) // cfg.batch_size), 1000)
    batches = []
    for step in range(steps):
        idx = step_indices(step, len(train_ds), cfg, cfg.seed)
        batches += [
            [train_ds[i] for i in idx[lo : lo + cfg.micro_batch_size]]
            for lo in range(0, len(idx), cfg.micro_batch_size)
        ]
    unpacked, packed = padding_fraction(batches), padding_fraction(batches, pack_length)
    state = "on" if cfg.pack else "off"
    return (
        f"padding: {unpacked:.1%} of the body's token positions unpacked, {packed:.1%} packed into rows of <= "
        f"{pack_length} tokens (pack: {state}; micro-batches of {cfg.micro_batch_size} pairs, first {steps} steps)"
    )


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
    cfg.validate(need_data=True)  # every problem at once, before any work
    data_fp = {k: ckpt.data_fingerprint(getattr(cfg, k)) for k in DATA_KEYS if getattr(cfg, k)}
    user_cfg = cfg.to_dict()
    # checkpoint.pt (no weights) or None; refuses incoherent changes; rebuilt: the base model is gone, so the
    # model is built from the run's saved config (its weights all come from the checkpoint)
    resume, rebuilt = resume_state(cfg, data_fp)
    cfg = prepare_method_data(cfg)
    hooks = hooks or TrainHooks()
    t_start = time.time()

    # ---- processes, device, precision, seeds
    info = D.setup(cfg.device, cfg.distributed)
    device = info.device
    per_step = cfg.micro_batch_size * info.world_size
    if cfg.batch_size % per_step:
        raise ConfigError(
            f"batch_size: {cfg.batch_size} must be a multiple of micro_batch_size × world "
            f"({cfg.micro_batch_size} × {info.world_size})"
        )
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    use_bf16 = _use_bf16(cfg, device)
    amp_dtype = torch.bfloat16 if use_bf16 else None
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)  # noqa: E731
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.run_dir)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    log = print if info.is_main else (lambda *a, **k: None)
    for warning in cfg.warnings():
        log(f"[haf-train] warning: {warning}")
    base_dir = run_dir / BASE_DIR

    # ---- data
    tokenizer = load_tokenizer(cfg, base_dir if resume is not None else None)
    hooks = method_hooks(cfg, tokenizer, hooks)
    if hooks.forward_params is not None and info.world_size > 1:
        raise ValueError("forward_params (MetaRM) runs single-process only")
    train_ds, eval_ds = load_data(cfg, tokenizer)
    log(f"[haf-train] {train_ds.report.summary()}; train {len(train_ds)} / eval {len(eval_ds)} pairs")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    accum = cfg.batch_size // per_step
    steps_per_epoch = max(1, len(train_ds) // cfg.batch_size)
    max_steps = cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch))
    pack_length = cfg.pack_length or cfg.max_length
    log(f"[haf-train] {padding_report(cfg, train_ds, max_steps, pack_length)}")

    # ---- model and reference (the reference sees the initial weights, also when resuming)
    ckpt_weights = ckpt.load_model_state(run_dir, resume) if resume is not None else None
    model = build_run_model(cfg, tokenizer, run_dir, ckpt_weights, rebuild=rebuilt)
    model = model.to(device)
    if cfg.pack:
        check_packing(cfg, model)
    if info.is_main and not rebuilt:
        try:
            save_base(model, tokenizer, base_dir)
        except Exception as exc:  # the run still trains; it just needs the base model folder later
            log(f"[haf-train] warning: could not save the base model's config/tokenizer into {base_dir}: {exc}")
    if hooks.on_model is not None:
        hooks.on_model(model, cfg)
    reference = build_reference(
        cfg, model, train_ds, eval_ds, run_dir, resume if rebuilt else None, pad_id, info, autocast, amp_dtype
    )
    mode = reference.mode
    averaged = objectives.uses_means(cfg.policy_loss, cfg.average_log_prob)
    log(
        f"[haf-train] reference: {mode}; {sum(p.numel() for p in model.parameters() if p.requires_grad):,} "
        f"trainable parameters; {max_steps} steps × {cfg.batch_size} pairs (accum {accum}, world {info.world_size})"
    )

    # ---- resume: model weights before wrapping, optimiser/scheduler/RNG after building them
    ckpt_path = run_dir / ckpt.CHECKPOINT
    state = None if resume is None else dict(resume, model=ckpt_weights)
    if state is not None and info.mode != "fsdp":
        model.load_state_dict(ckpt_weights)

    # ---- wrap (DDP / FSDP2), optimiser, schedule
    wrapped = D.wrap(model, info, find_unused_parameters=cfg.alpha == 0 or hooks.aux_loss is not None)
    optimizer = build_optimizer(cfg, model)
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
    del state, ckpt_weights
    logger = MetricsLogger(
        run_dir,
        enabled=info.is_main,
        tensorboard=cfg.tensorboard,
        resume_step=start_step if resume is not None else None,
    )
    if info.is_main:
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

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
        if metrics:  # rank 0: eval metrics on stdout too (tqdm-safe), not only in metrics.jsonl
            line = format_metrics(step, split, metrics)
            progress.write(line) if progress is not None and not progress.disable else log(line)
        return metrics

    ref_cache = _relative(reference.cache_path, run_dir)

    def save(step: int) -> None:
        check_finite_weights(model, info, step)  # never write a checkpoint with non-finite weights
        payload = _gather_state(wrapped, model, optimizer, info)
        if info.is_main:
            state = dict(
                step=step,
                config=cfg.to_dict(),
                user_config=user_cfg,
                data=data_fp,
                reference_cache=ref_cache,
                optimizer=payload["optimizer"],
                scheduler=scheduler.state_dict(),
                rng=ckpt.rng_state(),
            )
            ckpt.save(run_dir, payload["model"], state)
        D.barrier(info)

    # ---- the loop
    pair_terms = hooks.pair_terms or default_pair_terms
    progress = None
    if cfg.progress and info.is_main:
        from tqdm.auto import tqdm

        progress = tqdm(total=max_steps, initial=start_step, desc="haf-train", dynamic_ncols=True)
    model.train()
    window = LogWindow(start_step)
    streak = 0  # consecutive steps whose update was skipped (nonfinite: skip)
    good_grad_norm = torch.full((), float("nan"))
    for step in range(start_step, max_steps):
        idx = step_indices(step, len(train_ds), cfg, cfg.seed)
        step_sums: dict[str, torch.Tensor] = {}
        micro_losses = torch.zeros(accum, device=device)
        for micro in range(accum):
            lo = (micro * info.world_size + info.rank) * cfg.micro_batch_size
            examples = [train_ds[i] for i in idx[lo : lo + cfg.micro_batch_size]]
            batch = collate_packed(examples, pad_id, pack_length) if cfg.pack else collate_pairs(examples, pad_id)
            window.tokens += int(batch.attention_mask.sum())  # on the CPU batch: no device sync
            batch = batch.to(device)
            with autocast():
                ref = for_loss(reference(batch, "train", model=wrapped, raw=model), averaged)
            check = step < cfg.check_finite_steps and info.world_size == 1
            compute = loss_on_batch(cfg, batch, ref, pair_terms(batch, cfg), hooks, step, amp_dtype, check)
            sync = micro == accum - 1 or info.mode != "ddp"
            fast = hooks.forward_params(model, step) if hooks.forward_params is not None else None
            with (
                nonfinite_input_guard(step + 1, micro, accum, info),
                contextlib.nullcontext() if sync else wrapped.no_sync(),
                autocast(),
            ):
                if fast is None:
                    loss, res, aux = wrapped(
                        batch.input_ids, batch.attention_mask, compute=compute, packing=batch.packing
                    )
                else:  # look-ahead parameters (MetaRM): the same forward, functionally
                    loss, res, aux = torch.func.functional_call(
                        model,
                        fast,
                        (batch.input_ids, batch.attention_mask),
                        {"compute": compute, "packing": batch.packing},
                    )
            (loss / accum).backward()
            micro_losses[micro] = loss.detach().float()
            for k, v in (
                ("loss", loss),
                ("reward_loss", res.reward_loss),
                ("policy_loss", res.policy_loss),
                ("reward_accuracy", res.reward_accuracy),
                ("implicit_accuracy", res.implicit_accuracy),
                ("aux_loss", aux),
                ("center_loss", res.center_loss),
            ):
                if v is not None:
                    step_sums[k] = step_sums.get(k, 0.0) + v.detach().float()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else 1e30)
        flags = nonfinite_flags(micro_losses, grad_norm, info)  # the loop's one host sync per optimiser step
        if flags is None:
            optimizer.step()
            window.add(step_sums, accum)
            streak, good_grad_norm = 0, grad_norm
        else:
            what = nonfinite_message(step + 1, micro_losses, grad_norm, flags, info)
            if cfg.nonfinite == "stop" or streak >= cfg.nonfinite_max_skips:
                if progress is not None:
                    progress.close()
                last = f"the last checkpoint is {ckpt_path}" if ckpt_path.exists() else "no checkpoint was written"
                why = "" if cfg.nonfinite == "stop" else f" after {streak} consecutive skipped steps"
                raise NonFiniteError(
                    f"{what}; training stopped{why} before the optimiser step (weights unchanged; {last}). "
                    "Lower lr, set grad_clip, check the data, or use --nonfinite skip to drop such updates"
                )
            streak, window.skipped = streak + 1, window.skipped + 1
            log(f"[haf-train] warning: {what}; update skipped ({streak} in a row, at most {cfg.nonfinite_max_skips})")
        with warnings.catch_warnings():  # a skipped first step: "scheduler.step() before optimizer.step()"
            warnings.simplefilter("ignore", UserWarning)
            scheduler.step()  # a skipped step still counts: the schedule and the data order follow the step index
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if cfg.debug_step_sleep:
            time.sleep(cfg.debug_step_sleep)
        if hooks.on_step_end is not None:
            hooks.on_step_end(StepState(done, wrapped, model, optimizer, cfg, info))

        if done % cfg.log_every == 0 or done == max_steps:  # the only host syncs of the loop
            skipped = window.skipped
            metrics = window.flush(done, cfg.batch_size, info)
            gn = good_grad_norm.full_tensor() if hasattr(good_grad_norm, "full_tensor") else good_grad_norm
            if cfg.nonfinite == "skip":
                metrics["skipped_steps"] = skipped
            metrics.update(grad_norm=float(gn), lr=scheduler.get_last_lr()[0])
            logger.log(done, "train", metrics)
            if progress is not None and "loss" in metrics:
                progress.set_postfix(
                    loss=f"{metrics['loss']:.4f}",
                    acc=f"{metrics['reward_accuracy']:.3f}",
                    iacc=f"{metrics['implicit_accuracy']:.3f}",
                )
        if cfg.eval_every and done % cfg.eval_every == 0 and done < max_steps:
            with window.pause():
                run_eval(done, "eval")
        if cfg.save_every and done % cfg.save_every == 0 and done < max_steps:
            with window.pause():
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

            export_pretrained(
                model, tokenizer, run_dir / "export", max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length
            )
        logger.close()
        if cfg.plots:
            plot_curves(logger.history, run_dir / "curves.png")
        final = dict(final, wall_s=time.time() - t_start, run_dir=str(run_dir))
    D.cleanup(info)
    return final


def _same(a: Any, b: Any) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def build_reference(
    cfg: TrainConfig,
    model: HafRewardModel,
    train_ds: PreferenceDataset,
    eval_ds: PreferenceDataset,
    run_dir: Path,
    rebuilt_from: dict[str, Any] | None,
    pad_id: int,
    info: D.DistInfo,
    autocast: Callable,
    amp_dtype: torch.dtype | None,
) -> ReferenceLogps:
    """The reference log-probs of ``cfg.reference_mode``, from the model's *initial* weights (also on resume):
    a frozen copy, the LoRA adapter disabled, none, or precomputed into a cache keyed by the model and data
    (``rebuilt_from``: the checkpoint state of a run whose base model is gone; its recorded cache is used)."""
    mode = cfg.reference_mode
    reference = ReferenceLogps(mode, backend=cfg.backend, amp_dtype=amp_dtype)
    if mode == "copy":
        reference.ref_model = frozen_copy(model)
    elif mode == "precomputed" and rebuilt_from is not None:
        reference.load_cache(_recorded_path(rebuilt_from.get("reference_cache"), run_dir))
    elif mode == "precomputed":
        keys = ("model", "model_type", "model_config", "tokenizer", "max_length", "max_prompt_length", "seed", "dtype")
        reference.precompute(
            model,
            {"train": train_ds, "eval": eval_ds},
            cache_dir=cfg.ref_cache_dir or run_dir / "ref_cache",
            key_extra={k: v for k, v in cfg.to_dict().items() if k in keys},
            pad_token_id=pad_id,
            batch_size=cfg.eval_batch_size,
            device=info.device,
            write=info.is_main,
            autocast=autocast,
        )
    return reference


def _use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast: asked for, or ``auto`` on CUDA."""
    return cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")


def build_optimizer(cfg: TrainConfig, model: HafRewardModel) -> torch.optim.Optimizer:
    """AdamW with two parameter groups: the body (``lr``) and the reward head (``head_lr``, default ``lr``)."""
    head_ids = {id(p) for p in model.reward_head.parameters()}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    head = [p for p in model.parameters() if p.requires_grad and id(p) in head_ids]
    return torch.optim.AdamW(
        [{"params": body, "lr": cfg.lr}, {"params": head, "lr": cfg.head_lr or cfg.lr}],
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.weight_decay,
    )


def loss_on_batch(
    cfg: TrainConfig,
    batch: PairBatch,
    ref: torch.Tensor | None,
    pair_terms: tuple[Any, Any],
    hooks: TrainHooks,
    step: int,
    amp_dtype: torch.dtype | None,
    check_finite: bool,
) -> Callable[[RewardModelOutput, HafRewardModel], tuple[torch.Tensor, Any, torch.Tensor | None]]:
    """The ``compute`` callable of one micro-batch: ``fused_haf_loss`` on the model's hidden states and LM head
    (inside the wrapped forward, where DDP/FSDP have the parameters) plus a method's auxiliary loss."""
    margin, weights = pair_terms

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
            policy_loss_weights=cfg.policy_loss_weights or None,
            simpo_gamma=cfg.simpo_gamma,
            discopop_tau=cfg.discopop_tau,
            average_log_prob=cfg.average_log_prob,
            reward_margin=margin,
            label_smoothing=cfg.label_smoothing,
            pair_weights=weights,
            center_rewards_coefficient=cfg.center_rewards_coefficient,
            lm_head_bias=None if b is None else b.to(dt),
            logit_scale=m.logit_scale,
            softcap=m.softcap,
            backend=cfg.backend,
            check_finite=check_finite,
        )
        aux = hooks.aux_loss(out, batch, m, step) if hooks.aux_loss is not None else None
        return (res.loss if aux is None else res.loss + aux), res, aux

    return compute


class LogWindow:
    """What one log window accumulates: per-step loss terms (device tensors, synced once at ``flush``), tokens,
    skipped updates, and the wall clock of its steps (``pause`` leaves eval / checkpoint time out)."""

    def __init__(self, start_step: int) -> None:
        self.reset(start_step)

    def reset(self, start_step: int) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.micro_batches = self.tokens = self.skipped = 0
        self.start, self.t0 = start_step, time.time()

    def add(self, step_sums: dict[str, torch.Tensor], micro_batches: int) -> None:
        for k, v in step_sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.micro_batches += micro_batches

    @contextlib.contextmanager
    def pause(self):
        t = time.time()
        yield
        self.t0 += time.time() - t

    def flush(self, done: int, pairs_per_step: int, info: D.DistInfo) -> dict[str, float]:
        """Means over the window's micro-batches and ranks, throughput of its own steps; then a new window."""
        keys = sorted(self.sums)
        vec = (
            torch.stack([self.sums[k] for k in keys]) / self.micro_batches
            if keys
            else torch.zeros(0, device=info.device)
        )
        vec = D.all_reduce_mean(torch.cat([vec, vec.new_tensor([float(self.tokens)])]), info).tolist()
        seconds = max(time.time() - self.t0, 1e-9)
        tokens = vec.pop() * info.world_size  # all ranks' tokens of the window
        metrics = dict(zip(keys, vec))
        metrics.update(pairs_per_s=pairs_per_step * (done - self.start) / seconds, tokens_per_s=tokens / seconds)
        self.reset(done)
        return metrics


# ---------------------------------------------------------------------------------------------- resume
def resume_state(cfg: TrainConfig, data_fp: dict[str, dict[str, Any]]) -> tuple[dict[str, Any] | None, bool]:
    """``(checkpoint state without the weights, rebuild)`` to resume from, or ``(None, False)`` to start fresh.

    ``cfg.resume``: ``False`` starts fresh; ``True`` needs ``<run_dir>/checkpoint.pt``; ``"auto"`` resumes when it
    exists. Refuses (``ConfigError``, one line per key) a config or data change that would make the run
    incoherent; only the keys of ``SAFE_ON_RESUME`` may change. ``rebuild``: the base model folder is gone, so
    the model is built from the run's saved config (``base_model/``); refused when the reference needs the base
    model's initial weights.
    """
    run_dir = Path(cfg.run_dir)
    path = run_dir / ckpt.CHECKPOINT
    if not cfg.resume or (cfg.resume == "auto" and not path.exists()):
        return None, False
    if not path.exists():
        raise ConfigError(f"resume: no checkpoint to resume from at {path}: drop --resume, or use --resume auto")
    state = ckpt.load_state(path)
    old = state.get("user_config") or state["config"]
    now = cfg.to_dict()
    defaults = type(cfg)().to_dict()
    problems = []
    for key, value in now.items():
        before = old.get(key, defaults.get(key))
        if key not in SAFE_ON_RESUME and not _same(before, value):
            problems.append(f"{key}: {before!r} in the checkpoint, {value!r} now")
    for key, fp in data_fp.items():
        was = (state.get("data") or {}).get(key) or {}
        if was.get("path") == fp.get("path") and was.get("sha256") and was["sha256"] != fp.get("sha256"):
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(fp.get("mtime", 0)))
            problems.append(
                f"{key}: {fp['path']} changed since the checkpoint (size {was.get('size')} -> {fp.get('size')} "
                f"bytes, modified {when}, sha256 {was['sha256'][:12]} -> {str(fp.get('sha256'))[:12]})"
            )
    if problems:
        allowed = ", ".join(sorted(SAFE_ON_RESUME - {"resume"}))
        raise ConfigError(
            problems,
            header=f"cannot resume {path} (step {state['step']}): changed since the checkpoint",
            hint=f"start a new run (another --run_dir) or restore the checkpoint's values; may change on resume: "
            f"{allowed}",
        )
    return state, _rebuild_for_resume(cfg, run_dir, state)


def _base_gone(cfg: TrainConfig) -> bool:
    """The config names a pretrained model that is not a local folder (moved, deleted, or a hub name)."""
    return bool(cfg.model) and not Path(cfg.model).expanduser().exists()


def _rebuild_for_resume(cfg: TrainConfig, run_dir: Path, state: dict[str, Any]) -> bool:
    from .config import _looks_local

    if not _base_gone(cfg):
        return False
    saved = (run_dir / BASE_DIR / "config.json").exists()
    mode = cfg.reference_mode
    cache = _recorded_path(state.get("reference_cache"), run_dir)
    needs_base = mode == "copy" or (mode == "precomputed" and (cache is None or not cache.exists()))
    if not _looks_local(cfg.model) and (needs_base or not saved):
        return False  # a hub name: from_pretrained (its cache or the network) gives the initial weights
    if not saved:
        raise ConfigError(
            f"model: {cfg.model!r} not found, and {run_dir} has no saved copy of its config and tokenizer "
            f"({BASE_DIR}/, written by newer haf-train): restore the model folder to resume"
        )
    if mode == "copy":
        raise ConfigError(
            f"reference: 'copy' needs the initial weights of the base model {cfg.model!r}, which is not found: "
            "restore it to resume (runs with reference lora, precomputed or none resume from the run directory alone)"
        )
    if needs_base:
        raise ConfigError(
            f"reference: the precomputed reference log-probs ({cache}) are gone and so is the base model "
            f"{cfg.model!r} that computes them: restore either to resume"
        )
    return True


def _recorded_path(value: str | None, run_dir: Path) -> Path | None:
    if not value:
        return None
    p = Path(value)
    return p if p.is_absolute() else run_dir / p


def _relative(path: str | Path | None, run_dir: Path) -> str | None:
    """``path`` relative to the run directory when inside it (the run directory may move), else absolute."""
    if path is None:
        return None
    p, root = Path(path).resolve(), run_dir.resolve()
    return str(p.relative_to(root)) if p.is_relative_to(root) else str(p)


def build_run_model(
    cfg: TrainConfig,
    tokenizer: Any,
    run_dir: str | Path,
    weights: dict[str, torch.Tensor] | None = None,
    *,
    rebuild: bool = False,
) -> HafRewardModel:
    """``build_model``, or (``rebuild``) the same architecture from the run's saved ``base_model/config.json``
    with the dtypes of ``weights`` (which then replace every parameter): no base model folder needed."""
    if not rebuild:
        return build_model(cfg, tokenizer)
    base = json.loads((Path(run_dir) / BASE_DIR / "config.json").read_text(encoding="utf-8"))
    model_type = base.pop("model_type")
    model = build_model(cfg.replace(model="", model_type=model_type, model_config=base), tokenizer)
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        w = (weights or {}).get(name)
        if w is not None and t.is_floating_point() and w.dtype != t.dtype:
            t.data = t.data.to(w.dtype)
    return model


def save_base(model: HafRewardModel, tokenizer: Any, base_dir: str | Path) -> Path:
    """The base LM's ``config.json`` and the tokenizer into ``<run_dir>/base_model`` (the run scores and resumes
    after the base model folder is moved or deleted)."""
    import shutil

    base_dir = Path(base_dir)
    tmp = base_dir.with_name(base_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model.config.save_pretrained(tmp)
        if hasattr(tokenizer, "save_pretrained"):
            from .data import save_tokenizer

            save_tokenizer(tokenizer, tmp)  # records the class training used (base_model/ has a config.json)
        shutil.rmtree(base_dir, ignore_errors=True)
        os.replace(tmp, base_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return base_dir


# ---------------------------------------------------------------------------------------------- non-finite guard
def nonfinite_flags(micro_losses: torch.Tensor, grad_norm: torch.Tensor, info: D.DistInfo) -> tuple[bool, bool] | None:
    """``None`` when every micro-batch loss and the gradient norm are finite on every rank, else
    ``(loss_bad, grad_bad)``: one small all-reduce and one host sync."""
    gn = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    flags = torch.stack([(~torch.isfinite(micro_losses)).any(), ~torch.isfinite(gn.to(micro_losses.device))])
    loss_bad, grad_bad = (D.all_reduce_mean(flags.float(), info) > 0).tolist()
    return (loss_bad, grad_bad) if loss_bad or grad_bad else None


def nonfinite_message(
    step: int, micro_losses: torch.Tensor, grad_norm: torch.Tensor, flags: tuple[bool, bool], info: D.DistInfo
) -> str:
    """Where the non-finite value is: step, micro-batch(es) and loss, or the gradient."""
    losses = micro_losses.tolist()
    bad = [i for i, v in enumerate(losses) if not math.isfinite(v)]
    rank = f" on rank {info.rank}" if info.world_size > 1 else ""
    if bad:
        where = ", ".join(f"micro-batch {i + 1} of {len(losses)} (loss {losses[i]})" for i in bad[:4])
        return f"step {step}: non-finite loss in {where}{rank}"
    if flags[0]:
        return f"step {step}: non-finite loss on another rank"
    gn = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    return f"step {step}: non-finite gradient (norm {float(gn)}) with finite losses in all {len(losses)} micro-batches"


@contextlib.contextmanager
def nonfinite_input_guard(step: int, micro: int, accum: int, info: D.DistInfo):
    """A ``check_finite`` failure of the loss inputs (``check_finite_steps``) as a ``NonFiniteError`` naming the
    step and micro-batch: such inputs in the first steps mean a broken model or batch, so the run stops in
    either ``nonfinite`` mode."""
    from haf_kernels.validate import NonFiniteInputError

    try:
        yield
    except NonFiniteInputError as exc:
        rank = f" on rank {info.rank}" if info.world_size > 1 else ""
        raise NonFiniteError(
            f"step {step}: non-finite loss input in micro-batch {micro + 1} of {accum}{rank}: {exc}; training "
            "stopped before the optimiser step (check_finite_steps)"
        ) from None


def check_finite_weights(model: torch.nn.Module, info: D.DistInfo, step: int) -> None:
    """``NonFiniteError`` (on every rank) when a parameter or buffer holds NaN/Inf: such weights are never saved."""
    named = [
        (n, t.to_local() if hasattr(t, "to_local") else t)
        for n, t in itertools.chain(model.named_parameters(), model.named_buffers())
    ]
    named = [(n, t) for n, t in named if t.is_floating_point() and t.numel()]
    if not named:
        return
    ok = torch.stack([torch.isfinite(t).all() for _, t in named])
    any_bad = D.all_reduce_mean((~ok).any().float().reshape(1), info)
    if float(any_bad) > 0:
        names = [n for (n, _), good in zip(named, ok.tolist()) if not good]
        raise NonFiniteError(
            f"step {step}: refusing to write a checkpoint: non-finite values in {names[:3] or 'another rank'}"
            f"{' and more' if len(names) > 3 else ''}; the previous checkpoint (if any) is kept"
        )


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
    """``(model, tokenizer, config)`` of a run directory: the weights from its checkpoint (safetensors, nothing
    unpickled beyond plain data); the base LM's config and the tokenizer from the base model folder or, when that
    is gone, from the run's own copy (``base_model/``)."""
    from .config import _looks_local

    run_dir = Path(run_dir)
    state = ckpt.load_state(run_dir / ckpt.CHECKPOINT)
    cfg = TrainConfig.from_dict(state["config"])
    weights = ckpt.load_model_state(run_dir, state)
    base_dir = run_dir / BASE_DIR
    rebuild = _base_gone(cfg) and (base_dir / "config.json").exists()
    if _base_gone(cfg) and not rebuild and _looks_local(cfg.model):
        raise ckpt.CheckpointError(
            f"{run_dir}: needs the base model {cfg.model!r} for its config and tokenizer (not found, and the run has "
            f"no {BASE_DIR}/ copy: written by an older haf-train); restore that folder, or copy its config.json and "
            f"tokenizer files into {base_dir}"
        )
    tokenizer = load_tokenizer(cfg, base_dir)
    model = build_run_model(cfg, tokenizer, run_dir, weights, rebuild=rebuild)
    # auxiliary method modules (e.g. SwAV prototypes under ``rm_methods``) are not part of the reward model
    model.load_state_dict({k: v for k, v in weights.items() if not k.startswith("rm_methods.")})
    return model.to(device).eval(), tokenizer, cfg
