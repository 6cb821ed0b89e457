"""Command-line entry points: ``haf-train``, ``haf-score`` (and ``haf-strength`` from ``training.methods``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

USAGE = """usage: haf-train [CONFIG.yaml|--config CONFIG.(yaml|json)] [--key value ...]

Trains a HaF reward model (haf_kernels.fused_haf_loss every step). Flags override the config file, which
overrides the defaults. Booleans: --flag / --no-flag. Lists: comma-separated. Multi-process: launch with
torchrun (--distributed ddp|fsdp). Options (default):
"""


def train_main(argv: list[str] | None = None) -> None:
    """``haf-train``: config file + ``--key value`` overrides → ``training.trainer.train``."""
    from .config import build_config, help_text
    from .trainer import train

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(USAGE + help_text())
        return
    cfg = build_config(argv)
    if not cfg.train_data:
        raise SystemExit("haf-train: --train_data is required (see --help)")
    metrics = train(cfg)
    if metrics:
        keys = ("reward_accuracy", "implicit_accuracy", "reward_margin", "implicit_margin", "reward_ece")
        print(json.dumps({k: metrics[k] for k in keys if k in metrics} | {"run_dir": metrics.get("run_dir")}))


@torch.no_grad()
def score_pairs(
    model_path: str,
    data: str,
    *,
    batch_size: int = 32,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    skip_bad_rows: bool = False,
    device: str = "cpu",
) -> dict:
    """Rewards of every pair of ``data`` under a run directory or an exported sequence classifier.

    Returns ``{"accuracy", "n_pairs", "rows": [{"row", "reward_chosen", "reward_rejected"}, ...]}``.
    """
    from .data import collate_pairs, load_preferences

    path = Path(model_path)
    if (path / "checkpoint.pt").exists():
        from .trainer import load_trained

        model, tok, cfg = load_trained(path, device)
        max_length = max_length or cfg.max_length
        max_prompt_length = max_prompt_length or cfg.max_prompt_length

        def rewards(batch):
            return model(batch.input_ids, batch.attention_mask).rewards
    else:
        from transformers import AutoModelForSequenceClassification

        from .data import load_tokenizer_dir

        model = AutoModelForSequenceClassification.from_pretrained(model_path).to(device).eval()
        tok = load_tokenizer_dir(model_path)
        max_length = max_length or 512
        max_prompt_length = max_prompt_length or min(128, max_length // 2)

        def rewards(batch):
            return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, 0]

    ds = load_preferences(
        data, tok, max_length=max_length, max_prompt_length=max_prompt_length, skip_bad_rows=skip_bad_rows, split="test"
    )
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    rows = []
    for i in range(0, len(ds), batch_size):
        batch = collate_pairs([ds[j] for j in range(i, min(i + batch_size, len(ds)))], pad).to(device)
        r = rewards(batch).float().cpu()
        b = batch.n_pairs
        rows += [
            {"row": int(batch.index[k]), "reward_chosen": float(r[k]), "reward_rejected": float(r[b + k])}
            for k in range(b)
        ]
    acc = sum(r["reward_chosen"] > r["reward_rejected"] for r in rows) / len(rows)
    return {"accuracy": acc, "n_pairs": len(rows), "report": ds.report.summary(), "rows": rows}


def score_main(argv: list[str] | None = None) -> None:
    """``haf-score MODEL DATA``: per-pair rewards (``--output`` JSONL) and pairwise accuracy."""
    p = argparse.ArgumentParser(prog="haf-score", description=score_main.__doc__)
    p.add_argument("model", help="a haf-train run directory or an exported AutoModelForSequenceClassification")
    p.add_argument("data", help="preference data (.jsonl/.json/.parquet/.csv or a load_from_disk folder)")
    p.add_argument("--output", help="write per-pair rewards as JSON lines here")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int)
    p.add_argument("--max-prompt-length", type=int)
    p.add_argument("--skip-bad-rows", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    res = score_pairs(
        a.model,
        a.data,
        batch_size=a.batch_size,
        max_length=a.max_length,
        max_prompt_length=a.max_prompt_length,
        skip_bad_rows=a.skip_bad_rows,
        device=a.device,
    )
    if a.output:
        with open(a.output, "w", encoding="utf-8") as f:
            for r in res["rows"]:
                f.write(json.dumps(r) + "\n")
    print(json.dumps({"accuracy": res["accuracy"], "n_pairs": res["n_pairs"], "data": res["report"]}))


def strength_main(argv: list[str] | None = None) -> None:
    """``haf-strength``: preference strength from an ensemble of reward models (``training.methods.strength``)."""
    from .methods import strength

    strength.main(argv)
