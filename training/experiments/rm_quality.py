"""RM-quality experiment v2: reward models fine-tuned from an SFT'd policy prior, scored against the true reward.

``python -m training.experiments.rm_quality [--quick] [--no-prior] [--sweep alpha|beta|size|secrets] [--workers N] ...``

The papers' setting on the synthetic task of ``training/synthetic.py`` (a known true reward):

1. **prior** (``training/experiments/prior.py``): one causal LM, pretrained on the task's generated text and SFT'd
   on preferred responses, cached on disk and shared by every method, seed and noise rate; every run starts from
   it (``TrainConfig.model``) and the reference model of DPO/HaF is that SFT model. ``--no-prior`` gives the old
   setting instead (``secrets_rlhf``'s D = 32 model from random init, lr 3e-3);
2. for every noise rate ρ and seed s: noisy training pairs (sample seed ``1000+s``, as in ``secrets_rlhf``), one
   run per method through ``training.trainer.train``; the seed changes the training sample, the flips, the
   reward-head initialisation and the data order (the body always starts from the prior);
3. metrics on the TRUE reward: pairwise accuracy on ``test`` (in distribution) and ``shift`` (clean labels), and
   Best-of-N (HaF-RM): for held-out prompts, N responses from the generator (in distribution and shifted), the
   reward model picks one: top-1 recall (the pick is the true best) and mean true-reward regret;
4. statistics: mean ± 95% t-interval over seeds per cell, and the paired difference (same seeds) of every method
   against the baseline (BT; in the alpha sweep alpha = 0) with its interval, ``*`` where it excludes 0; in the
   ``secrets`` sweep also against HaF (the Secrets-II methods are "HaF + X": "X helps" is the difference vs HaF).

The strength methods (``haf_flip``, ``haf_flip_neg``, ``haf_margin``) need preference strength: once per (noise,
seed) unit and model size, ``training.ensemble.run_strength_ensemble`` fine-tunes ``members`` BT reward models
(alpha = 0, ``member_steps`` steps, seeds ``100·s + m``) **from the same prior** and writes the training file with
``strength_mean`` / ``strength_std`` columns, shared by every strength method of the unit; the unit records how
well ``−strength_mean`` ranks the pairs the annotator flipped (AUROC, ``strength.auroc``).

Every hyper-parameter is fixed up front; nothing is selected on ``test``, ``shift`` or the Best-of-N sets. Each
unit of work runs on one thread and is seeded, and units are collected in job order, so a rerun on one machine at
the same thread count gives bitwise the same records (``--workers`` changes only the wall time).
Results: ``<out>/rm_quality[_<sweep>].{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from training.experiments import secrets_rlhf as v1
from training.experiments.prior import PriorConfig
from training.experiments.stats import best_of_n, mean_ci, paired_diff

NOISE_RATES = (0.0, 0.2, 0.4)
SEEDS = (0, 1, 2, 3, 4)
SWEEP_NOISE = 0.2
ALPHAS = (0.0, 0.05, 0.2, 0.5, 1.0)
BETAS = (0.03, 0.1, 0.3, 1.0)

_LLAMA = dict(max_position_embeddings=64, tie_word_embeddings=False)
# model sizes of the prior (and so of every run that starts from it); "base" is the default
MODEL_SIZES: dict[str, dict[str, Any]] = {
    "small": dict(
        _LLAMA, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4
    ),
    "base": dict(
        _LLAMA,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
    ),
}
QUICK_MODEL = dict(
    _LLAMA, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2
)
QUICK_MODEL_SIZES = {"small": dict(QUICK_MODEL, hidden_size=8, intermediate_size=16), "base": QUICK_MODEL}
PRIOR = dict(pretrain_sequences=8000, pretrain_steps=600, sft_pairs=2000, sft_steps=300)
QUICK_PRIOR = dict(pretrain_sequences=256, pretrain_steps=8, sft_pairs=64, sft_steps=4, batch_size=32)
# fine-tuning from the prior: the v1 settings with a smaller learning rate (a pretrained body; fixed up front)
FINETUNE = dict(lr=1e-3)
SIZES = dict(n_train=1000, n_val=200, n_test=500, n_shift=500, n_pool=400, bon_prompts=200, bon_n=16)
QUICK = dict(
    n_train=96, n_val=32, n_test=64, n_shift=64, n_pool=32, bon_prompts=12, bon_n=4, max_steps=6, warmup_steps=2
)
QUICK_METHODS = ("bt", "dpo", "haf")
DEFAULT_METHODS = ("bt", "dpo", "haf")
SUPPORTED = tuple(v1.METHODS)
# the Secrets-II sweep (``--sweep secrets``): BT, HaF and "HaF + X" from the prior. Measured per run (seed 0, train +
# eval) while other work shared the 2 cores: BT 38 s, HaF + label smoothing 57 s, SimCSE 84 s, MetaRM 241 s, the
# M = 3 ensemble 55 s; from that, 5 seeds x 2 noise rates with MetaRM would take ~54 min, so MetaRM
# (``--methods haf_metarm``) and haf_flip_neg (haf_flip is the paper's rule, the lowest 10% by strength) are left out
# of the default. On free cores MetaRM took 93 s and a default unit 240-270 s (experiments README).
SECRETS_METHODS = ("bt", "haf", "haf_ls", "haf_flip", "haf_margin", "haf_simcse")
SECRETS_NOISE = (0.2, 0.4)
# the strength ensemble of a unit: M members fine-tuned from the prior (BT, alpha = 0), fixed up front
STRENGTH = dict(members=3, member_steps=100)
QUICK_STRENGTH = dict(members=2, member_steps=3)


def variants(sweep: str, methods: list[str], sizes: list[str]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The runs of one (noise, seed) unit and, per run, the run it is compared with (paired, same seed).

    Returns ``(variants, baseline_of)``: ``variants[name] = {label, changes, scored_by, size}``.
    """
    out: dict[str, dict[str, Any]] = {}
    base_of: dict[str, str] = {}
    if sweep == "alpha":
        for a in ALPHAS:
            out[f"haf_a{a}"] = dict(label=f"HaF alpha={a}", changes=dict(alpha=a), scored_by="reward", size=sizes[0])
            base_of[f"haf_a{a}"] = f"haf_a{ALPHAS[0]}"
        return out, base_of
    if sweep == "beta":
        out["bt"] = dict(label=v1.METHODS["bt"][0], changes=v1.METHODS["bt"][1], scored_by="reward", size=sizes[0])
        base_of["bt"] = "bt"
        for b in BETAS:
            out[f"haf_b{b}"] = dict(label=f"HaF (alpha=0.2) beta={b}", changes=dict(beta=b), scored_by="reward")
            out[f"haf_b{b}"]["size"] = sizes[0]
            base_of[f"haf_b{b}"] = "bt"
        return out, base_of
    if sweep == "secrets":
        methods = ["bt", "haf"] + [m for m in methods if m not in ("bt", "haf")]
    for size in sizes:
        suffix = f"@{size}" if sweep == "size" else ""
        for m in methods:
            label, changes, scored_by = v1.METHODS[m]
            out[m + suffix] = dict(label=label + suffix, changes=changes, scored_by=scored_by, size=size)
            base_of[m + suffix] = "bt" + suffix
    return out, base_of


def haf_baselines(sweep: str, names: list[str]) -> dict[str, str]:
    """In the ``secrets`` sweep, every "HaF + X" run and its paired HaF run (same seed): ``{name: "haf"}``."""
    if sweep != "secrets":
        return {}
    return {n: "haf" for n in names if n not in ("bt", "haf")}


def prior_config(size: str, quick: bool) -> PriorConfig:
    """The prior of one model size (tiny and few steps with ``quick``)."""
    model = QUICK_MODEL_SIZES[size] if quick else MODEL_SIZES[size]
    return PriorConfig(model_config=dict(model), **(QUICK_PRIOR if quick else PRIOR))


def bon_sets(work: Path, sizes: dict[str, int]) -> dict[str, Path]:
    """Best-of-N candidate sets (in distribution, sample seeds 50000+; shifted, 60000+) as pair files for the scorer.

    Each prompt's N distinct responses are written as N/2 pairs ``(r_2j, r_2j+1)`` (so every response is scored
    once); prompts whose N responses are not all distinct are skipped and redrawn. Shared by every run.
    """
    from training.synthetic import SyntheticTask, write_jsonl

    task = SyntheticTask(seed=0)
    n, k = sizes["bon_prompts"], sizes["bon_n"]
    if k < 2 or k % 2:
        raise ValueError(f"bon_n must be an even number >= 2, got {k}")
    paths = {}
    for split, seed, shift in (("bon", 5, False), ("bon_shift", 6, True)):
        path = work / "data" / f"{split}_s{10_000 * seed}_p{n}_n{k}.jsonl"
        paths[split] = path
        if path.exists():
            continue
        rows: list[dict[str, Any]] = []
        draw = 0
        while len(rows) < n * k // 2:
            for cand in task.unlabelled(n, k=k, seed=10_000 * seed + draw, shift=shift):
                if len(set(cand["responses"])) < k or len(rows) >= n * k // 2:
                    continue
                rs, ts = cand["responses"], cand["true_rewards"]
                for j in range(0, k, 2):
                    rows.append(
                        dict(
                            prompt=cand["prompt"],
                            chosen=rs[j],
                            rejected=rs[j + 1],
                            true_reward_chosen=ts[j],
                            true_reward_rejected=ts[j + 1],
                        )
                    )
            draw += 1
        write_jsonl(rows, path)
    return paths


def _per_response(chosen, rejected, k: int) -> list[list[float]]:
    """``[P][N]`` from per-pair chosen/rejected values of the ``(r_2j, r_2j+1)`` layout."""
    flat: list[float] = []
    for c, r in zip(chosen.tolist(), rejected.tolist()):
        flat += [c, r]
    return [flat[i : i + k] for i in range(0, len(flat), k)]


def evaluate(run_dir: Path, paths: dict[str, str], scored_by: str, bon_n: int) -> dict[str, float]:
    """Pairwise accuracy against the true order (``test``, ``shift``) and Best-of-N recall / regret (``bon``,
    ``bon_shift``) of one trained run, scored by its reward head or (``implicit``) β·log π/π_ref."""
    import torch

    from training.ensemble import load_member
    from training.methods.scoring import score_pairs
    from training.model import frozen_copy
    from training.trainer import build_model

    model, tok, cfg = load_member(run_dir)
    reference = None
    if scored_by == "implicit":
        with torch.random.fork_rng():  # the initial weights: the prior, or the seeded random init without one
            reference = frozen_copy(build_model(cfg, tok))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    kw = dict(pad_token_id=pad, beta=cfg.beta, backend=cfg.backend)
    out: dict[str, float] = {}
    for split in ("test", "shift"):
        ds = v1.load_split(paths[split], tok, cfg)
        sc = score_pairs(model, ds, reference=reference, **kw)
        margin = sc.reward_margin if scored_by == "reward" else sc.implicit_margin
        out[f"{split}_acc"] = v1.true_accuracy(margin, ds)
    for split in ("bon", "bon_shift"):
        ds = v1.load_split(paths[split], tok, cfg)
        sc = score_pairs(model, ds, **kw)
        if scored_by == "reward":
            scores = _per_response(sc.reward_chosen, sc.reward_rejected, bon_n)
        else:
            ref = score_pairs(reference, ds, **kw)
            scores = _per_response(
                cfg.beta * (sc.logp_chosen - ref.logp_chosen), cfg.beta * (sc.logp_rejected - ref.logp_rejected), bon_n
            )
        tc = [ex.columns["true_reward_chosen"] for ex in ds.examples]
        tr = [ex.columns["true_reward_rejected"] for ex in ds.examples]
        true: list[list[float]] = []
        flat = [x for pair in zip(tc, tr) for x in pair]
        true = [flat[i : i + bon_n] for i in range(0, len(flat), bon_n)]
        res = best_of_n(scores, true)
        out[f"{split}_recall"] = res["recall"]
        out[f"{split}_regret"] = res["regret"]
    return out


def evaluate_prior(folder: str, paths: dict[str, str], bon_n: int) -> dict[str, float]:
    """The same metrics for the SFT prior alone, scored by its per-token mean log-likelihood (no reward training).

    One deterministic value per prior (no seeds): what the policy prior knows about the true reward."""
    import torch

    from training.config import TrainConfig
    from training.data import load_tokenizer
    from training.methods.scoring import score_pairs
    from training.trainer import build_model

    cfg = TrainConfig.from_dict(dict(base_config(folder, None), train_data=paths["train"], run_dir=folder))
    tok = load_tokenizer(cfg)
    with torch.random.fork_rng():
        model = build_model(cfg, tok).eval()
    kw = dict(pad_token_id=tok.pad_token_id, backend=cfg.backend, averaged=True)
    out: dict[str, float] = {}
    for split in ("test", "shift"):
        ds = v1.load_split(paths[split], tok, cfg)
        sc = score_pairs(model, ds, **kw)
        out[f"{split}_acc"] = v1.true_accuracy(sc.logp_chosen - sc.logp_rejected, ds)
    for split in ("bon", "bon_shift"):
        ds = v1.load_split(paths[split], tok, cfg)
        sc = score_pairs(model, ds, **kw)
        flat = [x for ex in ds.examples for x in (ex.columns["true_reward_chosen"], ex.columns["true_reward_rejected"])]
        res = best_of_n(
            _per_response(sc.logp_chosen, sc.logp_rejected, bon_n),
            [flat[i : i + bon_n] for i in range(0, len(flat), bon_n)],
        )
        out[f"{split}_recall"], out[f"{split}_regret"] = res["recall"], res["regret"]
    return out


def prior_markdown(zero_shot: dict[str, dict[str, float]]) -> str:
    """One row per prior size: its metrics scored by the SFT policy's per-token mean log-likelihood."""
    cols = [m for m, _, _ in METRICS]
    lines = [
        "**SFT prior alone** (per-token mean log-likelihood as the reward, no reward training; one value per prior)",
        "",
        "| prior | " + " | ".join(cols) + " |",
        "|" + " --- |" * (1 + len(cols)),
    ]
    for size, res in zero_shot.items():
        cells = [f"{s * res[m]:.1f}" if s == 100.0 else f"{res[m]:.3f}" for m, _, s in METRICS]
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def base_config(prior: str | None, size_model: dict[str, Any] | None) -> dict[str, Any]:
    """The trainer config shared by every run: ``secrets_rlhf.BASE``, from the prior folder when given."""
    base = dict(v1.BASE)
    if prior is not None:
        base.update(FINETUNE, model=prior, tokenizer="", model_config={})
    elif size_model is not None:
        base.update(model_config=dict(size_model))
    return base


def run_unit(args: tuple) -> dict[str, Any]:
    """Every variant of one (noise, seed) unit: train, evaluate; returns the records (job order, seeded)."""
    work_s, noise, seed, sizes, var, priors = args
    import torch

    torch.set_num_threads(1)
    from training.config import TrainConfig
    from training.trainer import train

    work = Path(work_s)
    paths = v1.write_data(work, sizes, noise, seed)
    paths.update({k: str(v) for k, v in bon_sets(work, sizes).items()})
    unit = work / f"noise{noise}_seed{seed}"
    t0 = time.time()

    def unit_base(size: str) -> dict[str, Any]:
        prior = priors.get(size)
        base = base_config(prior, None if prior is not None else priors.get("__no_prior_model__"))
        base.update(
            max_steps=sizes.get("max_steps", base["max_steps"]),
            warmup_steps=sizes.get("warmup_steps", base["warmup_steps"]),
            eval_data=paths["val"],
            ref_cache_dir=str(unit / f"ref_cache_{size}"),
        )
        return base

    strength: dict[str, Any] = {}
    for size in dict.fromkeys(v["size"] for n, v in var.items() if n.split("@")[0] in v1.STRENGTH_METHODS):
        strength[size] = v1.strength_ensemble(unit_base(size), unit / f"strength_{size}", paths["train"], seed, sizes)
        print(
            f"[rm_quality] noise {noise} seed {seed} strength ensemble ({size}, M={sizes['members']}): AUROC "
            f"{strength[size].get('auroc_flipped', math.nan):.3f} in {strength[size]['wall_s']:.0f} s",
            flush=True,
        )
    records = []
    for name, v in var.items():
        t1 = time.time()
        base = unit_base(v["size"])
        method = name.split("@")[0]
        extra = dict(metarm_data=paths["pool"]) if method == "haf_metarm" else {}
        data = strength[v["size"]]["out_path"] if method in v1.STRENGTH_METHODS else paths["train"]
        run_dir = unit / name.replace("@", "_at_")
        cfg = TrainConfig.from_dict(
            dict(base, run_dir=str(run_dir), train_data=data, seed=seed, **v["changes"], **extra)
        )
        train(cfg)
        t2 = time.time()
        rec = dict(noise=noise, seed=seed, method=name, label=v["label"], scored_by=v["scored_by"], size=v["size"])
        rec.update(evaluate(run_dir, paths, v["scored_by"], sizes["bon_n"]))
        rec["train_s"], rec["eval_s"] = t2 - t1, time.time() - t2
        records.append(rec)
        print(
            f"[rm_quality] noise {noise} seed {seed} {name}: test {100 * rec['test_acc']:.1f} shift "
            f"{100 * rec['shift_acc']:.1f} BoN {100 * rec['bon_recall']:.1f} "
            f"({rec['train_s']:.0f} s train + {rec['eval_s']:.0f} s eval)",
            flush=True,
        )
    return dict(noise=noise, seed=seed, records=records, strength=strength, wall_s=time.time() - t0)


# ---------------------------------------------------------------------------------------------- reporting
METRICS = (
    ("test_acc", "pairwise acc, test (%)", 100.0),
    ("shift_acc", "pairwise acc, shift (%)", 100.0),
    ("bon_recall", "BoN top-1 recall, in distribution (%)", 100.0),
    ("bon_shift_recall", "BoN top-1 recall, shifted (%)", 100.0),
    ("bon_regret", "BoN mean true-reward regret, in distribution", 1.0),
    ("bon_shift_regret", "BoN mean true-reward regret, shifted", 1.0),
)


def summarise(
    units: list[dict[str, Any]], names: list[str], base_of: dict[str, str], noises: list[float], seeds: list[int]
) -> dict[str, Any]:
    """Per variant, noise and metric: ``mean_ci`` over seeds, and ``paired_diff`` against its baseline; per model
    size and noise, the strength ensemble's AUROC (flipped labels) and share of pairs with ``strength_mean < 0``."""

    def values(name: str, noise: float, metric: str) -> list[float]:
        by_seed = {
            r["seed"]: r[metric] for u in units if u["noise"] == noise for r in u["records"] if r["method"] == name
        }
        return [by_seed.get(s, math.nan) for s in seeds]

    cells: dict[str, Any] = {}
    diffs: dict[str, Any] = {}
    strength: dict[str, Any] = {}
    for size in dict.fromkeys(size for u in units for size in u.get("strength", {})):
        for noise in noises:  # per model size and noise: AUROC of −strength_mean vs flipped, share of mean < 0
            by_seed = {
                u["seed"]: u["strength"][size] for u in units if u["noise"] == noise and size in u.get("strength", {})
            }
            rows = [by_seed.get(s, {}) for s in seeds]
            members = {r["members"] for r in rows if "members" in r}
            entry = strength.setdefault(size, dict(members=sorted(members), by_noise={}))
            entry["members"] = sorted(set(entry["members"]) | members)
            entry["by_noise"][str(noise)] = {
                k: mean_ci([r.get(k, math.nan) for r in rows])
                for k in ("auroc_flipped", "frac_negative", "frac_flipped")
            }
    for name in names:
        for noise in noises:
            for metric, _, _ in METRICS:
                key = f"{metric}@{noise}"
                cells.setdefault(name, {})[key] = mean_ci(values(name, noise, metric))
                base = base_of.get(name)
                if base and base != name and base in names:
                    d = paired_diff(values(name, noise, metric), values(base, noise, metric))
                    diffs.setdefault(name, {})[key] = dict(d, baseline=base)
    return dict(cells=cells, diffs=diffs, strength=strength)


def _fmt(c: dict[str, Any], scale: float, digits: int, signed: bool = False) -> str:
    """``mean ± half`` of a cell (× ``scale``), ``*`` when significant; ``n/a`` without values."""
    if c["mean"] != c["mean"]:
        return "n/a"
    m = f"{scale * c['mean']:+.{digits}f}" if signed else f"{scale * c['mean']:.{digits}f}"
    half = "" if c["half"] != c["half"] else f" ± {scale * c['half']:.{digits}f}"
    return m + half + ("*" if c.get("significant") else "")


def markdown(summary: dict[str, Any], names: list[str], labels: dict[str, str], noises: list[float]) -> str:
    """Tables: each metric (mean ± 95% CI), then the paired differences against the baseline (and against HaF in
    the ``secrets`` sweep); then the strength ensemble's AUROC per model size when a unit built one."""
    lines: list[str] = []
    for metric, title, scale in METRICS:
        digits = 1 if scale == 100.0 else 3
        lines += [f"**{title}**, mean ± 95% CI over seeds", ""]
        lines += ["| method | " + " | ".join(f"ρ={n}" for n in noises) + " |", "|" + " --- |" * (1 + len(noises))]
        for name in names:
            cells = [_fmt(summary["cells"][name][f"{metric}@{n}"], scale, digits) for n in noises]
            lines.append(f"| {labels[name]} | " + " | ".join(cells) + " |")
        for diffs in (summary["diffs"], summary.get("diffs_vs_haf", {})):
            lines += _diff_table(diffs, names, labels, noises, metric, scale, digits)
        lines.append("")
    for size, entry in summary.get("strength", {}).items():
        by_noise, members = entry["by_noise"], "/".join(str(m) for m in entry["members"])
        lines += [
            f"**Preference strength** ({size} prior, M={members} members per unit): AUROC of −strength_mean vs the "
            "flipped labels, the share of pairs with strength_mean < 0 and the share the annotator flipped, "
            "mean ± 95% CI over seeds",
            "",
            "| | " + " | ".join(f"ρ={n}" for n in noises) + " |",
            "|" + " --- |" * (1 + len(noises)),
        ]
        for key, title in (
            ("auroc_flipped", "AUROC"),
            ("frac_negative", "strength_mean < 0"),
            ("frac_flipped", "flipped"),
        ):
            lines.append(f"| {title} | " + " | ".join(_fmt(by_noise[str(n)][key], 1.0, 3) for n in noises) + " |")
        lines.append("")
    return "\n".join(lines)


def _diff_table(
    diffs: dict[str, Any], names: list[str], labels: dict[str, str], noises: list[float], metric: str, scale, digits
) -> list[str]:
    """Markdown lines: the paired differences of ``metric`` against each row's baseline (none without rows)."""
    rows = [n for n in names if n in diffs]
    if not rows:
        return []
    bases = list(dict.fromkeys(diffs[r][f"{metric}@{noises[0]}"]["baseline"] for r in rows))
    vs = labels.get(bases[0], bases[0]) if len(bases) == 1 else "the baseline of its row"
    lines = ["", f"paired difference vs {vs} (same seeds), ± 95% CI, * : CI excludes 0", ""]
    lines += ["| method | " + " | ".join(f"ρ={n}" for n in noises) + " |", "|" + " --- |" * (1 + len(noises))]
    for name in rows:
        cells = [_fmt(diffs[name][f"{metric}@{n}"], scale, digits, signed=True) for n in noises]
        base = diffs[name][f"{metric}@{noises[0]}"]["baseline"]
        row = labels[name] if len(bases) == 1 else f"{labels[name]} − {labels.get(base, base)}"
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


def plot(summary: dict[str, Any], names: list[str], noises: list[float], path: Path) -> None:
    """Bars with 95% CI error bars: pairwise accuracy (test, shift) and BoN recall (in distribution, shifted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5), dpi=110)
    width = 0.8 / len(names)
    for ax, (metric, title, scale) in zip(axes.flat, METRICS[:4]):
        lo = 100.0
        for i, name in enumerate(names):
            cs = [summary["cells"][name][f"{metric}@{n}"] for n in noises]
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(noises))]
            err = [0.0 if c["half"] != c["half"] else scale * c["half"] for c in cs]
            ax.bar(xs, [scale * c["mean"] for c in cs], width, yerr=err, label=name, capsize=2)
            lo = min([lo] + [scale * c["mean"] for c in cs if c["mean"] == c["mean"]])
        ax.set_xticks(range(len(noises)), [f"noise {n}" for n in noises])
        ax.set_title(title, fontsize=9)
        ax.set_ylim(max(0.0, lo - 15.0), 100.0)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, ncol=min(len(names), 6), loc="lower center", frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the options, build the prior(s), run every (noise, seed) unit, write the JSON, Markdown and plot."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny end-to-end run (CI): 2 seeds, noise 0.2, few steps")
    ap.add_argument("--no-prior", action="store_true", help="the old setting: secrets_rlhf's model from random init")
    ap.add_argument(
        "--sweep", choices=("", "alpha", "beta", "size", "secrets"), default="", help="a sweep instead of methods"
    )
    ap.add_argument("--size", default="base", help="model size(s) of the prior: " + "|".join(MODEL_SIZES))
    ap.add_argument("--out", default=None, help="results folder (default training/experiments/results)")
    ap.add_argument("--work", default=None, help="run folders and the prior cache (default runs/experiments)")
    ap.add_argument("--workers", type=int, default=1, help="parallel (noise, seed) units (each single-threaded)")
    ap.add_argument("--methods", default=None, help="comma-separated subset of " + ",".join(SUPPORTED))
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default 0..4; quick: 0,1)")
    ap.add_argument("--noise", default=None, help="noise rates (default 0,0.2,0.4; sweeps 0.2; quick 0.2)")
    ap.add_argument(
        "--portable",
        action="store_true",
        help="pin MKL/ATen/oneDNN/haf row kernels to their AVX2 paths: bitwise the same records on any x86-64 AVX2 "
        "CPU (see training/experiments/numerics.py)",
    )
    args = ap.parse_args(argv)
    numerics: dict[str, str] | str = "native"
    if args.portable:  # before any tensor operation of this process (the spawned workers inherit the environment)
        from training.experiments.numerics import pin_portable_numerics

        numerics = pin_portable_numerics()
    if args.workers < 1:
        raise SystemExit(f"--workers must be >= 1, got {args.workers}")
    sizes_list = [s for s in args.size.split(",") if s]
    if args.sweep == "size" and args.size == "base":
        sizes_list = list(MODEL_SIZES)
    bad = sorted(set(sizes_list) - set(MODEL_SIZES))
    if bad or not sizes_list:
        raise SystemExit(f"unknown --size {bad or args.size!r}; choose from {list(MODEL_SIZES)}")
    if args.no_prior and args.sweep == "size":
        raise SystemExit("--sweep size needs the prior (drop --no-prior)")
    default_methods = SECRETS_METHODS if args.sweep == "secrets" else (QUICK_METHODS if args.quick else DEFAULT_METHODS)
    methods = [m for m in (args.methods or ",".join(default_methods)).split(",") if m]
    unknown = sorted(set(methods) - set(SUPPORTED))
    if unknown:
        raise SystemExit(f"unknown or unsupported methods {unknown}; choose from {list(SUPPORTED)}")
    if "bt" not in methods:
        methods = ["bt"] + methods  # the paired baseline
    sizes = dict(v1.SIZES, **SIZES, **STRENGTH)
    if args.quick:
        sizes.update(QUICK, **QUICK_STRENGTH)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else ([0, 1] if args.quick else list(SEEDS))
    default_noise = [0.2] if (args.quick or args.sweep) else list(NOISE_RATES)
    if args.sweep == "secrets" and not args.quick:
        default_noise = list(SECRETS_NOISE)
    noises = [float(n) for n in args.noise.split(",")] if args.noise else default_noise
    tag = "rm_quality" + (f"_{args.sweep}" if args.sweep else "") + ("_noprior" if args.no_prior else "")
    work = Path(args.work or "runs/experiments") / (tag + ("_quick" if args.quick else ""))
    out = Path(args.out or ("runs/experiments/results_quick" if args.quick else "training/experiments/results"))
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    t0 = time.time()
    var, base_of = variants(args.sweep, methods, sizes_list)
    priors: dict[str, Any] = {}
    prior_records: dict[str, Any] = {}
    if args.no_prior:
        priors["__no_prior_model__"] = QUICK_MODEL if args.quick else v1.MODEL
    else:
        from training.experiments.prior import BUILDS, build_prior

        root = Path(args.work or "runs/experiments")
        for size in sizes_list:
            built = BUILDS["count"]
            folder, rec = build_prior(prior_config(size, args.quick), root)
            priors[size], prior_records[size] = str(folder), rec
            how = "built" if BUILDS["count"] > built else "cached, built earlier"
            print(f"[rm_quality] prior {size}: {folder} ({how} in {rec['wall_s']:.0f} s)", flush=True)
    zero_shot: dict[str, dict[str, float]] = {}
    if not args.no_prior:
        paths = v1.write_data(work, sizes, noises[0], seeds[0])  # the shared splits (the unit rewrites its own)
        paths.update({k: str(v) for k, v in bon_sets(work, sizes).items()})
        for size in sizes_list:
            zero_shot[size] = evaluate_prior(priors[size], paths, sizes["bon_n"])
            print(f"[rm_quality] SFT prior {size} alone: {zero_shot[size]}", flush=True)
    jobs = [(str(work), n, s, sizes, var, priors) for n in noises for s in seeds]
    units = []

    def done(u: dict[str, Any]) -> None:
        units.append(u)
        print(
            f"[rm_quality] unit noise {u['noise']} seed {u['seed']} done in {u['wall_s']:.0f} s "
            f"({len(units)}/{len(jobs)}, elapsed {time.time() - t0:.0f} s)",
            flush=True,
        )

    if args.workers > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as ex:
            for u in ex.map(run_unit, jobs):  # in job order, so the JSON does not depend on timing
                done(u)
    else:
        for job in jobs:
            done(run_unit(job))
    wall = time.time() - t0
    names = list(var)
    summary = summarise(units, names, base_of, noises, seeds)
    haf_of = haf_baselines(args.sweep, names)
    if haf_of:
        summary["diffs_vs_haf"] = summarise(units, names, haf_of, noises, seeds)["diffs"]
    labels = {k: v["label"] for k, v in var.items()}
    meta = dict(
        command="python -m training.experiments.rm_quality " + " ".join(argv if argv is not None else sys.argv[1:]),
        seeds=seeds,
        noise_rates=noises,
        sizes=sizes,
        sweep=args.sweep,
        prior=None if args.no_prior else prior_records,
        prior_zero_shot=zero_shot or None,
        base_config=base_config(None if args.no_prior else "<prior>", priors.get("__no_prior_model__")),
        variants=var,
        baseline_of=base_of,
        haf_baseline_of=haf_of or None,
        wall_s=wall,
        workers=args.workers,
        num_threads=1,
        numerics=numerics,
    )
    result = dict(meta=meta, summary=summary, units=units)
    (out / f"{tag}.json").write_text(json.dumps(result, indent=1, sort_keys=True))
    md = markdown(summary, names, labels, noises) + ("\n" + prior_markdown(zero_shot) if zero_shot else "")
    head = (
        f"RM quality v2{' (' + args.sweep + ' sweep)' if args.sweep else ''}"
        f"{', no prior' if args.no_prior else ', from the SFT prior'}: seeds {seeds}, wall time {wall:.0f} s "
        f"with --workers {args.workers}.\n\n"
    )
    (out / f"{tag}.md").write_text(head + md)
    plot(summary, names, noises, out / f"{tag}.png")
    print(md)
    print(f"[rm_quality] wall time {wall:.0f} s; results in {out}/{tag}.*")
    return result


if __name__ == "__main__":
    from training.cli import run_cli

    run_cli("rm_quality", main)
