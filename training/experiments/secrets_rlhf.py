"""The "Secrets of RLHF II" reward-modeling methods on the synthetic task with a known true reward.

``python -m training.experiments.secrets_rlhf [--quick] [--out DIR] [--work DIR] [--workers N]``

For every annotator noise rate ρ ∈ {0, 0.2, 0.4} and seed s ∈ {0, 1, 2}:

1. training pairs ``task.pairs(N, seed=1000+s, noise_rate=ρ)`` (Bradley–Terry annotator: ambiguous pairs flip
   more); held-out ``test`` (in distribution) and ``shift`` (longer responses from a shifted policy) splits with
   clean labels, the same for every run; a validation split for the trainer's own end-of-run eval;
2. preference strength: M small BT reward models (seeds s·100 + m) through the trainer (``haf-strength``'s
   code); AUROC of ``−strength_mean`` against the pairs the annotator flipped;
3. one run per method through the trainer, then accuracy against the TRUE order on ``test`` and ``shift``
   (reward head; the DPO run is scored by its implicit reward).

Every hyper-parameter below is fixed up front (from the demo config and the papers' defaults); nothing is
selected on the test or shift splits. Runs are single-threaded and seeded, so a rerun reproduces the table.
Results: ``<out>/secrets_rlhf.{json,md,png}`` and ``<out>/strength_hist.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

NOISE_RATES = (0.0, 0.2, 0.4)
SEEDS = (0, 1, 2)

MODEL = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
MEMBER_MODEL = dict(MODEL, hidden_size=16, intermediate_size=32)
BASE = dict(
    model_type="llama",
    model_config=MODEL,
    tokenizer="synthetic",
    max_length=32,
    max_prompt_length=8,
    batch_size=32,
    micro_batch_size=32,
    eval_batch_size=256,
    lr=3e-3,
    warmup_steps=20,
    max_steps=300,
    min_lr_ratio=0.05,
    weight_decay=0.0,
    grad_clip=1.0,
    log_every=50,
    eval_every=0,
    save_every=0,
    reference="auto",
    progress=False,
    tensorboard=False,
    plots=False,
    export=False,
    num_threads=1,
    backend="torch",
    beta=0.1,
    alpha=0.2,
    reward_weight=1.0,
)
SIZES = dict(n_train=1000, n_val=200, n_test=500, n_shift=500, n_pool=400, members=8, member_steps=100)
QUICK = dict(n_train=160, n_val=64, n_test=128, n_shift=128, n_pool=64, members=2, member_steps=10, max_steps=12)

# name → (label, config changes, scored by)
METHODS: dict[str, tuple[str, dict[str, Any], str]] = {
    "bt": ("BT baseline (alpha=0)", dict(alpha=0.0), "reward"),
    "dpo": ("DPO only (reward_weight=0, implicit reward)", dict(alpha=1.0, reward_weight=0.0), "implicit"),
    "haf": ("HaF (alpha=0.2)", {}, "reward"),
    "haf_ls": ("HaF + label smoothing ε=0.1", dict(label_smoothing=0.1), "reward"),
    "haf_flip": ("HaF + flip lowest 10% by strength", dict(noisy_mode="flip", noisy_fraction=0.1), "reward"),
    "haf_flip_neg": ("HaF + flip strength_mean<0", dict(noisy_mode="flip", noisy_threshold=0.0), "reward"),
    "haf_margin": ("HaF + adaptive margin λ=1", dict(adaptive_margin=1.0), "reward"),
    "haf_simcse": ("HaF + SimCSE (pair, w=1, τ=0.05)", dict(contrastive="simcse", contrastive_on="pair"), "reward"),
    "haf_metarm": ("HaF + MetaRM (k=4, η=0.3)", dict(metarm_k=4, metarm_inner_lr=0.3, metarm_prompts=8), "reward"),
}
STRENGTH_METHODS = ("haf_flip", "haf_flip_neg", "haf_margin")


def write_data(work: Path, sizes: dict[str, int], noise: float, seed: int) -> dict[str, str]:
    """The splits of one (noise, seed) unit as jsonl files; shared splits are rewritten identically."""
    from training.synthetic import SyntheticTask, write_jsonl

    task = SyntheticTask(seed=0)
    shared = work / "data"
    paths = {
        "val": shared / "val.jsonl",
        "test": shared / "test.jsonl",
        "shift": shared / "shift.jsonl",
        "pool": shared / f"pool_s{seed}.jsonl",
        "train": work / f"noise{noise}_seed{seed}" / "train.jsonl",
    }
    if not paths["test"].exists():
        write_jsonl(task.pairs(sizes["n_val"], seed=7), paths["val"])
        write_jsonl(task.pairs(sizes["n_test"], seed=2), paths["test"])
        write_jsonl(task.pairs(sizes["n_shift"], seed=3, shift=True), paths["shift"])
    if not paths["pool"].exists():
        write_jsonl(task.unlabelled(sizes["n_pool"], k=4, seed=4000 + seed, shift=True), paths["pool"])
    write_jsonl(task.pairs(sizes["n_train"], seed=1000 + seed, noise_rate=noise), paths["train"])
    return {k: str(v) for k, v in paths.items()}


def true_accuracy(margins, dataset) -> float:
    """Fraction of pairs whose predicted margin agrees with the TRUE order (true_reward columns)."""
    good = 0
    for m, ex in zip(margins.tolist(), dataset.examples):
        true = ex.columns["true_reward_chosen"] - ex.columns["true_reward_rejected"]
        good += (m > 0) == (true > 0)
    return good / len(dataset)


def load_split(path: str, tok: Any, cfg: Any, skip_bad_rows: bool = False) -> Any:
    """A held-out split as the trainer reads it; a bad row raises ``BadRowError`` unless ``skip_bad_rows``."""
    from training.data import load_preferences

    return load_preferences(
        path, tok, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length, skip_bad_rows=skip_bad_rows
    )


def evaluate_run(run_dir: Path, paths: dict[str, str], scored_by: str, skip_bad_rows: bool = False) -> dict[str, float]:
    """Reward-head and implicit-reward accuracy against the true order on ``test`` and ``shift``."""
    import torch

    from training.ensemble import load_member
    from training.methods.scoring import score_pairs
    from training.model import frozen_copy
    from training.trainer import build_model

    model, tok, cfg = load_member(run_dir)
    with torch.random.fork_rng():
        reference = frozen_copy(build_model(cfg, tok))  # the initial weights (build_model is seeded by cfg.seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out: dict[str, float] = {}
    for split in ("test", "shift"):
        ds = load_split(paths[split], tok, cfg, skip_bad_rows)
        sc = score_pairs(model, ds, pad_token_id=pad, reference=reference, beta=cfg.beta, backend=cfg.backend)
        out[f"{split}_reward_acc"] = true_accuracy(sc.reward_margin, ds)
        out[f"{split}_implicit_acc"] = true_accuracy(sc.implicit_margin, ds)
        out[f"{split}_acc"] = out[f"{split}_{scored_by}_acc"]
    return out


def run_unit(args: tuple[str, float, int, dict[str, Any], list[str], bool]) -> dict[str, Any]:
    """All runs of one (noise, seed): the strength ensemble, then every method. Returns records.

    ``args[5]`` (``--skip-bad-rows``): every reader of the unit (trainer, strength ensemble, evaluation) skips and
    counts bad rows instead of stopping at the first one.
    """
    work_s, noise, seed, sizes, methods, skip_bad_rows = args
    import torch

    torch.set_num_threads(1)
    from training.config import TrainConfig
    from training.data import read_records
    from training.trainer import train

    work = Path(work_s)
    paths = write_data(work, sizes, noise, seed)
    unit = work / f"noise{noise}_seed{seed}"
    base = {k: v for k, v in BASE.items()}
    base.update(
        max_steps=sizes.get("max_steps", BASE["max_steps"]),
        eval_data=paths["val"],
        ref_cache_dir=str(unit / "ref_cache"),
    )
    if skip_bad_rows:
        base["skip_bad_rows"] = True
    t0 = time.time()
    strength: dict[str, Any] = {}
    if any(m in STRENGTH_METHODS for m in methods):
        strength = strength_ensemble(
            dict(base, model_config=MEMBER_MODEL), unit / "strength", paths["train"], seed, sizes
        )
    records = []
    for name in methods:
        label, changes, scored_by = METHODS[name]
        t1 = time.time()
        run_dir = unit / name
        data = strength["out_path"] if name in STRENGTH_METHODS else paths["train"]
        extra = dict(metarm_data=paths["pool"]) if name == "haf_metarm" else {}
        cfg = TrainConfig.from_dict(dict(base, run_dir=str(run_dir), train_data=data, seed=seed, **changes, **extra))
        final = train(cfg)
        rec = dict(
            noise=noise,
            seed=seed,
            method=name,
            label=label,
            scored_by=scored_by,
            val_reward_true_acc=final.get("reward_true_accuracy", math.nan),
        )
        rec.update(evaluate_run(run_dir, paths, scored_by, skip_bad_rows))
        rec["wall_s"] = time.time() - t1
        records.append(rec)
    flipped = [bool(r["flipped"]) for r in read_records(paths["train"])]
    return dict(
        noise=noise,
        seed=seed,
        records=records,
        strength=strength,
        frac_flipped=sum(flipped) / len(flipped),
        wall_s=time.time() - t0,
    )


def strength_ensemble(base: dict[str, Any], folder: Path, train_data: str, seed: int, sizes: dict[str, Any]) -> dict:
    """The unit's preference strength: ``sizes["members"]`` BT members (alpha = 0) trained from ``base``'s model (v1:
    ``MEMBER_MODEL`` from random init; v2, ``rm_quality``: the prior), seeds ``100·seed + m``.

    Returns ``run_strength_ensemble``'s summary (``out_path``: the training rows with strength columns;
    ``auroc_flipped``: AUROC of −strength_mean vs the ``flipped`` flag) plus ``wall_s``.
    """
    from training.config import TrainConfig
    from training.ensemble import run_strength_ensemble

    t0 = time.time()
    steps = sizes["member_steps"]
    cfg = TrainConfig.from_dict(
        dict(
            base,
            run_dir=str(folder),
            train_data=train_data,
            max_steps=steps,
            warmup_steps=min(10, steps // 2),
            alpha=0.0,
            seed=100 * seed,
        )
    )
    out = run_strength_ensemble(cfg, members=sizes["members"], member_mode="seed", log=lambda *a, **k: None)
    out["wall_s"] = time.time() - t0
    return out


# ---------------------------------------------------------------------------------------------- reporting
def mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x == x]
    if not xs:
        return math.nan, math.nan
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def summarise(units: list[dict[str, Any]], methods: list[str], noises: list[float]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for name in methods:
        for noise in noises:
            recs = [r for u in units if u["noise"] == noise for r in u["records"] if r["method"] == name]
            for split in ("test", "shift"):
                m, sd = mean_std([r[f"{split}_acc"] for r in recs])
                table.setdefault(name, {})[f"{split}@{noise}"] = dict(mean=m, std=sd, n=len(recs))
    auroc = {}
    for noise in noises:
        vals = [u["strength"].get("auroc_flipped", math.nan) for u in units if u["noise"] == noise and u["strength"]]
        m, sd = mean_std(vals)
        auroc[str(noise)] = dict(mean=m, std=sd, n=len([v for v in vals if v == v]))
    return dict(table=table, auroc=auroc)


def fmt(cell: dict[str, float]) -> str:
    return "n/a" if cell["mean"] != cell["mean"] else f"{100 * cell['mean']:.1f} ± {100 * cell['std']:.1f}"


def markdown(summary: dict[str, Any], methods: list[str], noises: list[float], meta: dict[str, Any]) -> str:
    head = (
        "| method | "
        + " | ".join(f"test ρ={n}" for n in noises)
        + " | "
        + " | ".join(f"shift ρ={n}" for n in noises)
        + " |"
    )
    lines = [head, "|" + " --- |" * (1 + 2 * len(noises))]
    for name in methods:
        row = summary["table"][name]
        cells = [fmt(row[f"test@{n}"]) for n in noises] + [fmt(row[f"shift@{n}"]) for n in noises]
        lines.append(f"| {METHODS[name][0]} | " + " | ".join(cells) + " |")
    au = summary["auroc"]
    lines += [
        "",
        '| AUROC of −strength_mean vs "label was flipped" | ' + " | ".join(f"ρ={n}" for n in noises) + " |",
        "|" + " --- |" * (1 + len(noises)),
        "| "
        + f"M={meta['sizes']['members']} ensemble | "
        + " | ".join(
            "n/a (no flips)"
            if au[str(n)]["mean"] != au[str(n)]["mean"]
            else f"{au[str(n)]['mean']:.3f} ± {au[str(n)]['std']:.3f}"
            for n in noises
        )
        + " |",
    ]
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], methods: list[str], noises: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), dpi=110, sharey=True)
    width = 0.8 / len(methods)
    for ax, split in zip(axes, ("test", "shift")):
        for i, name in enumerate(methods):
            ms = [summary["table"][name][f"{split}@{n}"] for n in noises]
            xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(noises))]
            ax.bar(xs, [100 * c["mean"] for c in ms], width, yerr=[100 * c["std"] for c in ms], label=name, capsize=2)
        ax.set_xticks(range(len(noises)), [f"noise {n}" for n in noises])
        ax.set_title(f"{split}: accuracy vs true order (%)")
        lo = min(100 * summary["table"][n][f"{split}@{x}"]["mean"] for n in methods for x in noises)
        ax.set_ylim(max(0, lo - 10), 100)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, ncol=len(methods), loc="lower center", frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny end-to-end run (CI): 1 seed, noise 0.2, few steps")
    ap.add_argument("--out", default=None, help="results folder (default training/experiments/results)")
    ap.add_argument("--work", default=None, help="run folders (default runs/secrets_rlhf[_quick])")
    ap.add_argument("--workers", type=int, default=1, help="parallel (noise, seed) units (each single-threaded)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; quick: 0)")
    ap.add_argument("--noise", default=None, help="comma-separated noise rates (default 0,0.2,0.4; quick: 0.2)")
    ap.add_argument("--replot", action="store_true", help="only redraw <out>/secrets_rlhf.png from its JSON")
    ap.add_argument("--skip-bad-rows", action="store_true", help="skip and count bad data rows instead of stopping")
    args = ap.parse_args(argv)
    if args.replot:
        out = Path(args.out or "training/experiments/results")
        saved = json.loads((out / "secrets_rlhf.json").read_text())
        ms, ns = list(saved["meta"]["methods"]), saved["meta"]["noise_rates"]
        plot(saved["summary"], [m for m in METHODS if m in ms], ns, out / "secrets_rlhf.png")
        return saved
    sizes = dict(SIZES, **(QUICK if args.quick else {}))
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else ([0] if args.quick else list(SEEDS))
    noises = [float(n) for n in args.noise.split(",")] if args.noise else ([0.2] if args.quick else list(NOISE_RATES))
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {list(METHODS)}")
    tag = "secrets_rlhf_quick" if args.quick else "secrets_rlhf"
    work = Path(args.work or f"runs/{tag}")
    out = Path(args.out or ("runs/secrets_rlhf_quick/results" if args.quick else "training/experiments/results"))
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    t0 = time.time()
    jobs = [(str(work), n, s, sizes, methods, args.skip_bad_rows) for n in noises for s in seeds]
    if args.workers > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as ex:
            units = []
            for u in ex.map(run_unit, jobs):  # in job order, so the JSON does not depend on timing
                units.append(u)
                print(
                    f"[secrets_rlhf] noise {u['noise']} seed {u['seed']} done in {u['wall_s']:.0f} s "
                    f"(elapsed {time.time() - t0:.0f} s)",
                    flush=True,
                )
    else:
        units = []
        for job in jobs:
            units.append(run_unit(job))
            u = units[-1]
            print(
                f"[secrets_rlhf] noise {u['noise']} seed {u['seed']} done in {u['wall_s']:.0f} s "
                f"(elapsed {time.time() - t0:.0f} s)",
                flush=True,
            )
    wall = time.time() - t0
    summary = summarise(units, methods, noises)
    meta = dict(
        command="python -m training.experiments.secrets_rlhf"
        + (" --quick" if args.quick else "")
        + (" --skip-bad-rows" if args.skip_bad_rows else ""),
        seeds=seeds,
        noise_rates=noises,
        sizes=sizes,
        base_config=BASE,
        model=MODEL,
        member_model=MEMBER_MODEL,
        methods={k: dict(label=METHODS[k][0], changes=METHODS[k][1], scored_by=METHODS[k][2]) for k in methods},
        wall_s=wall,
        workers=args.workers,
    )
    result = dict(meta=meta, summary=summary, units=units)
    (out / "secrets_rlhf.json").write_text(json.dumps(result, indent=1, sort_keys=True))
    md = markdown(summary, methods, noises, meta)
    (out / "secrets_rlhf.md").write_text(
        f"Accuracy (%) against the TRUE order, mean ± std over seeds {seeds}; wall time {wall:.0f} s.\n\n" + md
    )
    plot(summary, methods, noises, out / "secrets_rlhf.png")
    # strength histogram of one unit (the middle noise rate, first seed)
    pick = next((u for u in units if u["strength"] and u["noise"] == noises[len(noises) // 2]), None)
    if pick is not None:
        import shutil

        shutil.copyfile(pick["strength"]["hist_path"], out / "strength_hist.png")
    print(md)
    print(f"[secrets_rlhf] wall time {wall:.0f} s; results in {out}")
    return result


if __name__ == "__main__":
    from training.cli import run_cli

    run_cli("secrets_rlhf", main)  # a bad data row: one line with the --skip-bad-rows hint, exit status 1
