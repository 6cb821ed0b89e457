"""A policy prior for the RM-quality experiment: a causal LM pretrained on the synthetic task's text, then SFT'd.

Both HaF-RM and Secrets of RLHF II start reward modelling from an SFT model; the experiment's from-scratch models
have no prior for HaF's kept LM head to carry. ``build_prior(cfg, root)`` gives one, without downloads:

1. **pretraining**: next-token cross-entropy on ``prompt + response + EOS`` sequences drawn from the task's
   generators (``pretrain_shift_fraction`` of them from the shifted generator, the rest in distribution);
2. **SFT**: cross-entropy on the *preferred* response (+ EOS) given its prompt (the prompt tokens are not targets):
   for each SFT prompt the best of ``sft_best_of`` generator samples by the true reward (rejection-sampling SFT;
   ``sft_best_of=2`` is the chosen response of a clean pair).

``prior.json`` also records how much the prior knows about the reward before any reward modelling: the accuracy
against the true order of its log-likelihood margin (sum and per-token mean) on clean pairs of a separate sample
(seed ``data_seed + 2``; not the experiment's test or shift split).

Sequences are tokenised by ``training.data.load_preferences``, so they are exactly the ids the preference trainer
sees. The result is a Hugging Face folder (``model.safetensors``, ``config.json``, the tokenizer) plus
``prior.json`` (the config, the losses and the wall times), cached at ``<root>/prior-<key>/`` where ``key`` hashes
the config and ``PRIOR_VERSION`` plus this file's source: a second call returns the cached folder without training,
a changed config or changed code builds a new one. Nothing is pickled. Pass the folder as ``TrainConfig.model``:
every method and seed then starts from the same SFT weights, and the reference model (DPO/HaF) is that SFT model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRIOR_VERSION = "1"
PRIOR_FILE = "prior.json"
BUILDS = {"count": 0}  # how many priors this process trained (tests: a cached prior is not rebuilt)


@dataclass(frozen=True)
class PriorConfig:
    """What the prior is: the model shape, the two training stages and their data.

    ``model_config`` are ``transformers`` Llama config overrides (vocab and special ids come from the tokenizer).
    Pretraining draws ``pretrain_sequences`` texts (sample seed ``data_seed``), SFT uses the best of ``sft_best_of``
    responses for each of ``sft_pairs`` prompts (sample seed ``data_seed + 1``); neither overlaps the experiment's
    seeds (1000+s, 2, 3, 7, 4000+s) as long as ``data_seed`` stays below 1000 and away from those values.
    """

    model_config: dict = field(
        default_factory=lambda: dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
    )
    task_seed: int = 0
    data_seed: int = 500
    pretrain_sequences: int = 8000
    pretrain_shift_fraction: float = 0.5
    pretrain_steps: int = 600
    sft_pairs: int = 2000
    sft_best_of: int = 4
    probe_pairs: int = 500
    sft_steps: int = 300
    batch_size: int = 64
    lr: float = 3e-3
    sft_lr: float = 1e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_length: int = 32
    max_prompt_length: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("pretrain_sequences", "pretrain_steps", "sft_pairs", "sft_steps", "batch_size", "probe_pairs"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"PriorConfig.{name} must be an int >= 1, got {v!r}")
        if not isinstance(self.sft_best_of, int) or self.sft_best_of < 2:
            raise ValueError(f"PriorConfig.sft_best_of must be an int >= 2, got {self.sft_best_of!r}")
        if not 0.0 <= self.pretrain_shift_fraction <= 1.0:
            raise ValueError(
                f"PriorConfig.pretrain_shift_fraction must be in [0, 1], got {self.pretrain_shift_fraction}"
            )
        for name in ("lr", "sft_lr"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ValueError(f"PriorConfig.{name} must be a finite float > 0, got {v!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> PriorConfig:
        return dataclasses.replace(self, **changes)


def code_version() -> str:
    """``PRIOR_VERSION`` and a hash of this module's source: a code change invalidates cached priors."""
    src = Path(__file__).read_bytes()
    return f"{PRIOR_VERSION}-{hashlib.sha256(src).hexdigest()[:12]}"


def prior_key(cfg: PriorConfig) -> str:
    """16 hex digits identifying ``cfg`` under the current code (the cache folder is ``prior-<key>``)."""
    blob = json.dumps({"config": cfg.to_dict(), "code": code_version()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prior_dir(cfg: PriorConfig, root: str | os.PathLike) -> Path:
    """The cache folder of ``cfg`` under ``root`` (it may not exist yet)."""
    return Path(root) / f"prior-{prior_key(cfg)}"


def is_built(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a finished prior (``prior.json`` is written last)."""
    f = Path(folder)
    return (f / PRIOR_FILE).exists() and (f / "config.json").exists() and (f / "model.safetensors").exists()


def build_prior(
    cfg: PriorConfig, root: str | os.PathLike, log: Callable[[str], None] | None = print
) -> tuple[Path, dict[str, Any]]:
    """The SFT'd prior of ``cfg`` under ``root``: ``(folder, record)``, trained only if not cached.

    The folder is built in ``<folder>.tmp-<pid>`` and renamed when complete, so an interrupted build leaves no
    folder that looks finished. ``record`` is ``prior.json``: config, key, code version, losses, wall times.
    """
    out = prior_dir(cfg, root)
    if is_built(out):
        return out, json.loads((out / PRIOR_FILE).read_text(encoding="utf-8"))
    import torch

    from training.synthetic import SyntheticTask, write_jsonl

    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    say = log or (lambda s: None)
    task = SyntheticTask(seed=cfg.task_seed)
    tok = task.tokenizer()
    t0 = time.time()
    # ---- data, tokenised like the trainer (prompt ids, response ids, EOS target)
    n_shift = round(cfg.pretrain_shift_fraction * cfg.pretrain_sequences)
    n_in = cfg.pretrain_sequences - n_shift
    texts = task.pairs((n_in + 1) // 2, seed=cfg.data_seed) if n_in else []
    if n_shift:
        texts += task.pairs((n_shift + 1) // 2, seed=cfg.data_seed, shift=True)
    write_jsonl(texts, tmp / "pretrain.jsonl")
    write_jsonl(_best_of(task, cfg), tmp / "sft.jsonl")
    write_jsonl(task.pairs(cfg.probe_pairs, seed=cfg.data_seed + 2), tmp / "probe.jsonl")
    pre = _sequences(tmp / "pretrain.jsonl", tok, cfg, both=True, prompt_targets=True)[: cfg.pretrain_sequences]
    sft = _sequences(tmp / "sft.jsonl", tok, cfg, both=False, prompt_targets=False)
    (tmp / "pretrain.jsonl").unlink()
    (tmp / "sft.jsonl").unlink()
    from training.data import load_preferences

    probe = load_preferences(
        str(tmp / "probe.jsonl"), tok, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length
    )
    (tmp / "probe.jsonl").unlink()
    # ---- model
    from training.model import build_causal_lm

    overrides = dict(cfg.model_config, vocab_size=len(tok))
    for name in ("pad", "bos", "eos"):
        overrides[f"{name}_token_id"] = getattr(tok, f"{name}_token_id")
    lm = build_causal_lm(model_type="llama", config_overrides=overrides, seed=cfg.seed)
    n_params = sum(p.numel() for p in lm.parameters())
    say(f"[prior] {n_params:,} parameters; pretraining on {len(pre)} sequences, {cfg.pretrain_steps} steps")
    pre_stats = _fit(lm, pre, tok.pad_token_id, cfg, cfg.pretrain_steps, cfg.lr, cfg.seed, say, "pretrain")
    t1 = time.time()
    say(f"[prior] SFT on {len(sft)} preferred responses, {cfg.sft_steps} steps")
    sft_stats = _fit(lm, sft, tok.pad_token_id, cfg, cfg.sft_steps, cfg.sft_lr, cfg.seed + 1, say, "sft")
    t2 = time.time()
    zero_shot = _probe(lm, probe, tok.pad_token_id)
    say(f"[prior] log-likelihood margin vs the true order: {zero_shot}")
    # ---- save: safetensors + config + tokenizer, record last
    from training.data import save_tokenizer

    lm.config.pad_token_id = tok.pad_token_id
    lm.save_pretrained(tmp, safe_serialization=True)
    save_tokenizer(tok, tmp)
    record = dict(
        key=prior_key(cfg),
        code_version=code_version(),
        config=cfg.to_dict(),
        n_params=n_params,
        pretrain=pre_stats,
        sft=sft_stats,
        zero_shot=zero_shot,
        pretrain_wall_s=t1 - t0,
        sft_wall_s=t2 - t1,
        wall_s=time.time() - t0,
        num_threads=torch.get_num_threads(),
    )
    (tmp / PRIOR_FILE).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    if out.exists():  # a concurrent or earlier unfinished build
        shutil.rmtree(out)
    os.replace(tmp, out)
    BUILDS["count"] += 1
    say(f"[prior] built {out} in {record['wall_s']:.0f} s")
    return out, record


def _best_of(task: Any, cfg: PriorConfig) -> list[dict[str, Any]]:
    """SFT rows: per prompt, the best of ``sft_best_of`` in-distribution responses (``chosen``) and the worst."""
    rows = []
    for cand in task.unlabelled(cfg.sft_pairs, k=cfg.sft_best_of, seed=cfg.data_seed + 1, shift=False):
        order = sorted(range(cfg.sft_best_of), key=lambda i: cand["true_rewards"][i])
        best, worst = cand["responses"][order[-1]], cand["responses"][order[0]]
        if best != worst:
            rows.append(dict(prompt=cand["prompt"], chosen=best, rejected=worst))
    return rows


def _probe(lm, dataset: Any, pad_id: int) -> dict[str, float]:
    """Accuracy against the true order of the LM's log-likelihood margin (sum and per-token mean) on clean pairs."""
    import torch

    from training.experiments.secrets_rlhf import true_accuracy
    from training.methods.scoring import score_pairs
    from training.model import HafRewardModel

    with torch.random.fork_rng():  # the (unused) reward head's init must not move the caller's RNG
        model = HafRewardModel(lm)
    total = score_pairs(model, dataset, pad_token_id=pad_id, backend="torch")
    mean = score_pairs(model, dataset, pad_token_id=pad_id, backend="torch", averaged=True)
    return dict(
        sum_logp_acc=true_accuracy(total.logp_chosen - total.logp_rejected, dataset),
        mean_logp_acc=true_accuracy(mean.logp_chosen - mean.logp_rejected, dataset),
        n_pairs=len(dataset),
    )


def _sequences(path: Path, tok: Any, cfg: PriorConfig, *, both: bool, prompt_targets: bool) -> list[tuple]:
    """``(ids, labels)`` per text: ``prompt + response + EOS``; labels -100 where not a target."""
    from training.data import load_preferences

    ds = load_preferences(str(path), tok, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
    out = []
    for ex in ds.examples:
        responses = [(ex.chosen_ids, ex.end_labels[0])]
        if both:
            responses.append((ex.rejected_ids, ex.end_labels[1]))
        for resp, end in responses:
            ids = list(ex.prompt_ids) + list(resp) + ([end] if end is not None else [])
            n_p = len(ex.prompt_ids)
            labels = list(ids) if prompt_targets else [-100] * n_p + ids[n_p:]
            labels[0] = -100  # the first token is never predicted
            out.append((ids, labels))
    return out


def _fit(lm, seqs: list[tuple], pad_id: int, cfg: PriorConfig, steps: int, lr: float, seed: int, say, stage: str):
    """Next-token cross-entropy with AdamW, linear warm-up and cosine decay; returns first/last losses."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    warm = min(cfg.warmup_steps, max(1, steps // 10))

    def lr_at(s: int) -> float:
        if s < warm:
            return lr * (s + 1) / warm
        prog = (s - warm) / max(1, steps - warm)
        return lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog)))

    lm.train()
    losses: list[float] = []
    perm: list[int] = []
    for step in range(steps):
        if len(perm) < cfg.batch_size:
            perm += torch.randperm(len(seqs), generator=gen).tolist()
        idx, perm = perm[: cfg.batch_size], perm[cfg.batch_size :]
        width = max(len(seqs[i][0]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        labels = torch.full((len(idx), width), -100, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            a, b = seqs[i]
            ids[row, : len(a)] = torch.tensor(a)
            labels[row, : len(b)] = torch.tensor(b)
            mask[row, : len(a)] = 1
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = lm(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 4) == 0:
            say(f"[prior] {stage} step {step + 1}/{steps} loss {sum(losses[-20:]) / len(losses[-20:]):.4f}")
    lm.eval()
    k = min(20, len(losses))
    return dict(steps=steps, first_loss=sum(losses[:k]) / k, last_loss=sum(losses[-k:]) / k)
