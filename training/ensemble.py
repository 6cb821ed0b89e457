"""``haf-strength``: train M reward models through the trainer and write preference-strength columns.

Members differ by seed (initialisation and data order; the paper's setting, ``member_mode="seed"``) or also by
their training rows (``"bootstrap"`` / ``"subsample"``). Every member scores every training pair;
``strength_mean`` / ``strength_std`` (see ``strength.py``) are added as columns of a copy of the training file,
and a histogram PNG is written (stacked by the ``flipped`` column when the data has one, e.g. synthetic data).

Choices left open by the paper, exposed: M, member mode, whether only out-of-bag votes count (``oob``), the
members' own config (any ``TrainConfig`` field: small models / few steps keep M = 8 affordable on CPU).

The training data is any source the trainer reads (``.jsonl``, ``.jsonl.gz``, ``.parquet``, ...). A bad row stops
the run with its file and row number; with ``skip_bad_rows`` (``--skip-bad-rows``) bad rows are left out: the
members train on, and the output holds, the usable rows only.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from .config import TrainConfig, build_config, help_text
from .data import load_preferences, load_tokenizer, read_rows
from .methods import strength as S
from .methods.scoring import score_pairs
from .trainer import build_model, train

METHOD_FIELDS = dict(noisy_mode="", adaptive_margin=0.0, contrastive="", metarm_data="")


def member_config(cfg: Any, m: int, run_dir: Path, train_data: str) -> Any:
    """Config of member ``m``: methods off, seed ``cfg.seed + m``, quiet, no plots/export."""
    changes: dict[str, Any] = dict(
        seed=int(cfg.seed) + m,
        run_dir=str(run_dir),
        train_data=train_data,
        eval_data=cfg.eval_data or cfg.train_data,
        progress=False,
        tensorboard=False,
        plots=False,
        export=False,
        resume=False,
        max_eval_rows=cfg.max_eval_rows or 256,
    )
    changes.update({k: v for k, v in METHOD_FIELDS.items() if hasattr(cfg, k)})
    return cfg.replace(**changes)


def load_member(run_dir: Path, device: str = "cpu"):
    """The trained member model (checkpoint), ignoring auxiliary method modules."""

    state = ckpt.load(run_dir / ckpt.CHECKPOINT)
    cfg = TrainConfig.from_dict(state["config"])
    tok = load_tokenizer(cfg)
    model = build_model(cfg, tok)
    model.load_state_dict({k: v for k, v in state["model"].items() if not k.startswith("rm_methods.")})
    return model.to(device).eval(), tok, cfg


ROW_TAG = "_haf_strength_row"


def usable_rows(cfg: Any, tokenizer: Any, work_dir: Path) -> tuple[list[dict[str, Any]], Any, int]:
    """``(rows, dataset, n_bad)``: the raw rows of ``cfg.train_data`` that the trainer can use, their tokenised
    pairs (same order) and the number of bad rows skipped.

    A bad row raises ``BadRowError`` (file and row number) unless ``cfg.skip_bad_rows``; then the kept rows are
    found by tagging every row with its position and loading the tagged copy exactly as the trainer loads data.
    """

    kw = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length, split=cfg.train_split)
    skip = bool(getattr(cfg, "skip_bad_rows", False))
    ds = load_preferences(cfg.train_data, tokenizer, skip_bad_rows=skip, **kw)
    raw = [row for _, row in read_rows(cfg.train_data, cfg.train_split)]
    if ds.report.n_bad == 0 and len(ds) == len(raw):
        return raw, ds, 0
    tagged = work_dir / "train_tagged.jsonl"
    S.write_jsonl(({**row, ROW_TAG: j} for j, row in enumerate(raw) if isinstance(row, dict)), tagged)
    tagged_ds = load_preferences(tagged, tokenizer, skip_bad_rows=True, **kw)
    keep = [int(ex.columns.pop(ROW_TAG)) for ex in tagged_ds.examples]
    tagged.unlink()
    if len(keep) != len(ds):
        raise RuntimeError(f"{cfg.train_data}: {len(ds)} usable pairs but {len(keep)} usable rows found")
    return [raw[j] for j in keep], ds, len(raw) - len(keep)


def run_strength_ensemble(
    cfg: Any,
    *,
    members: int = 8,
    member_mode: str = "seed",
    member_fraction: float = 0.5,
    oob: bool = False,
    ddof: int = 0,
    out_path: str | Path | None = None,
    hist_path: str | Path | None = None,
    log=print,
) -> dict[str, Any]:
    """Train ``members`` models from ``cfg`` and write ``out_path`` (train rows + strength columns).

    Returns a summary: paths, per-member wall time, and (when the data has ``flipped``) the AUROC of
    ``−strength_mean`` for detecting flipped labels and the fraction of pairs with ``strength_mean < 0``.
    """

    root = Path(cfg.run_dir)
    out_path = Path(out_path) if out_path else root / "train_strength.jsonl"
    hist_path = Path(hist_path) if hist_path else out_path.with_suffix(".png")
    tok = load_tokenizer(cfg)
    rows, ds, n_bad = usable_rows(cfg, tok, root)
    if n_bad:
        log(f"[haf-strength] {ds.report.summary()}; the output has the {len(rows)} usable rows")
        cfg = cfg.replace(train_data=str(root / "train_usable.jsonl"))
        S.write_jsonl(rows, cfg.train_data)
    idx = S.member_indices(len(rows), members, mode=member_mode, seed=int(cfg.seed), fraction=member_fraction)
    chosen, rejected, times = [], [], []
    for m, ix in enumerate(idx):
        t0 = time.time()
        mdir = root / f"member_{m:02d}"
        data = cfg.train_data
        if member_mode != "seed":
            data = str(mdir / "train.jsonl")
            S.write_jsonl([rows[i] for i in ix], data)
        train(member_config(cfg, m, mdir, data))
        model, _, mcfg = load_member(mdir)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        sc = score_pairs(model, ds, pad_token_id=pad, batch_size=cfg.eval_batch_size, backend=cfg.backend)
        chosen.append(sc.reward_chosen)
        rejected.append(sc.reward_rejected)
        times.append(time.time() - t0)
        log(f"[haf-strength] member {m + 1}/{members} done in {times[-1]:.1f} s")
    diffs = S.reward_differences(torch.stack(chosen), torch.stack(rejected))
    mask = ~S.in_bag_mask(idx, len(rows)) if oob and member_mode != "seed" else None
    mean, std = S.preference_strength(diffs, ddof=ddof, mask=mask)
    S.write_jsonl(S.add_strength_columns(rows, torch.nan_to_num(mean), torch.nan_to_num(std)), out_path)
    flipped = [bool(r["flipped"]) for r in rows] if all("flipped" in r for r in rows) else None
    S.plot_strength_histogram(mean, hist_path, flipped=flipped)
    summary: dict[str, Any] = dict(
        out_path=str(out_path),
        hist_path=str(hist_path),
        members=members,
        member_mode=member_mode,
        oob=oob,
        member_wall_s=times,
        frac_negative=float((mean < 0).double().mean()),
        bad_rows_skipped=n_bad,
    )
    if flipped is not None:
        summary["auroc_flipped"] = S.auroc(-torch.nan_to_num(mean), flipped)
        summary["frac_flipped"] = sum(flipped) / len(flipped)
    torch.save(diffs, root / "strength_votes.pt")
    (root / "strength_summary.json").write_text(json.dumps(summary, indent=2))
    log(
        f"[haf-strength] wrote {out_path} and {hist_path}"
        + (f"; AUROC(−strength_mean, flipped) = {summary['auroc_flipped']:.3f}" if flipped is not None else "")
    )
    return summary


STRENGTH_USAGE = """usage: haf-strength [CONFIG] --train_data FILE [--members 8]
                    [--member-mode seed|bootstrap|subsample] [--member-fraction 0.5] [--oob] [--ddof 0]
                    [--output OUT.jsonl] [--histogram OUT.png] [--skip-bad-rows]
                    [any haf-train --key value: the members' config]

Trains M reward models on the same data (different seeds; or bootstrap / subsample splits), scores every
training pair with each, and writes the training rows with strength_mean / strength_std columns plus a
histogram. A bad row stops with its file and row number; with --skip-bad-rows it is left out of the output.
Then train with e.g. --train_data OUT.jsonl --noisy-mode flip --noisy-fraction 0.1, or
--adaptive-margin 1.
"""

_STRENGTH_FLAGS = {
    "members": int,
    "member_mode": str,
    "member_fraction": float,
    "ddof": int,
    "output": str,
    "histogram": str,
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``haf-strength`` entry point (``training.cli:strength_main``)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(STRENGTH_USAGE + "\nMember options (default):\n" + help_text())
        return {}
    opts: dict[str, Any] = {
        "members": 8,
        "member_mode": "seed",
        "member_fraction": 0.5,
        "ddof": 0,
        "output": None,
        "histogram": None,
        "oob": False,
    }
    rest: list[str] = []
    i = 0
    while i < len(argv):
        key, eq, val = argv[i][2:].partition("=") if argv[i].startswith("--") else ("", "", "")
        key = key.replace("-", "_")
        if key == "oob":
            opts["oob"] = True
        elif key in _STRENGTH_FLAGS:
            if not eq:
                i += 1
                if i >= len(argv):
                    raise SystemExit(f"--{key} needs a value")
                val = argv[i]
            opts[key] = _STRENGTH_FLAGS[key](val)
        else:
            rest.append(argv[i])
        i += 1
    cfg = build_config(rest, run_dir="runs/strength")
    if not cfg.train_data:
        raise SystemExit("haf-strength: --train_data is required (see --help)")
    summary = run_strength_ensemble(
        cfg,
        members=opts["members"],
        member_mode=opts["member_mode"],
        member_fraction=opts["member_fraction"],
        oob=opts["oob"],
        ddof=opts["ddof"],
        out_path=opts["output"],
        hist_path=opts["histogram"],
    )
    print(json.dumps({k: v for k, v in summary.items() if k != "member_wall_s"}))
    return summary
