"""Command-line entry points: ``haf-train``, ``haf-score`` (and ``haf-strength`` from ``training.methods``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

USAGE = """usage: haf-train [CONFIG.yaml|--config CONFIG.(yaml|json)] [--key value ...]

Trains a HaF reward model (haf_kernels.fused_haf_loss every step). Flags override the config file, which
overrides the defaults. Every option takes dashes or underscores (--max-length = --max_length) and
--key value or --key=value. Booleans: --flag / --no-flag. Lists: comma-separated. Multi-process: launch with
torchrun (--distributed ddp|fsdp). Options (default):
"""


class CLIError(SystemExit):
    """A command-line error: its message (one line per problem) is printed on stderr; exit status 2 (1: the run
    itself failed). ``str(exc)`` is the message."""

    def __init__(self, prog: str, message: str, code: int = 2) -> None:
        super().__init__(code)
        self.message = message
        print(f"{prog}: error: {message}", file=sys.stderr)

    def __str__(self) -> str:
        return self.message


def run_cli(prog: str, work):
    """``work()``, with every user-facing failure turned into a one-line ``CLIError``: option parsing, configs,
    resume conflicts and unusable run files exit 2; a non-finite loss, a bad data row or a missing data file
    exit 1. Anything else is a bug and keeps its traceback."""
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .errors import cli_message
    from .tracking import MetricsFileError
    from .trainer import NonFiniteError

    try:
        return work()
    except SystemExit as exc:  # option parsing: "unknown option --x", "--x needs a value"
        if isinstance(exc.code, str) and not isinstance(exc, CLIError):
            raise CLIError(prog, exc.code.removeprefix(f"{prog}: ")) from None
        raise
    except (ConfigError, CheckpointError, MetricsFileError) as exc:
        raise CLIError(prog, str(exc)) from None
    except NonFiniteError as exc:
        raise CLIError(prog, str(exc), code=1) from None
    except Exception as exc:  # a bad data row, a missing data file (training.errors): one line, exit 1
        msg = cli_message(exc)
        if msg is None:
            raise
        raise CLIError(prog, msg.removeprefix("error: "), code=1) from None


def train_main(argv: list[str] | None = None) -> None:
    """``haf-train``: config file + ``--key value`` overrides → ``training.trainer.train``.

    Bad configs, resume conflicts and unusable run files end with a one-line message per problem (exit 2); a
    non-finite loss, a bad data row or a missing data file with one line (exit 1); never a traceback.
    """
    from .config import build_config, help_text
    from .trainer import train

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(USAGE + help_text())
        return
    metrics = run_cli("haf-train", lambda: train(build_config(argv, need_data=True)))
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

    Both are scored under the reward contract (``training.data``): the same ids as training, the reward at the
    last token; lengths default to the run's config or the export's ``haf_reward.json``.
    Returns ``{"accuracy", "n_pairs", "report", "rows": [{"row", "reward_chosen", "reward_rejected"}, ...]}`` where
    ``row`` is the pair's 1-based row number in ``data`` (as in bad-row messages, also with ``skip_bad_rows``).
    """
    from .data import DEFAULT_MAX_LENGTH, DEFAULT_MAX_PROMPT_LENGTH, collate_pairs, load_preferences
    from .model import last_token_index

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

        from .data import CONTRACT_VERSION, load_tokenizer_dir
        from .export import CONTRACT_FILE

        model = AutoModelForSequenceClassification.from_pretrained(model_path).to(device).eval()
        tok = load_tokenizer_dir(model_path)
        contract_path = path / CONTRACT_FILE
        contract = json.loads(contract_path.read_text(encoding="utf-8")) if contract_path.exists() else {}
        if not contract:
            print(
                f"haf-score: {model_path} has no {CONTRACT_FILE} (not a haf-train export?): lengths default to "
                f"{DEFAULT_MAX_LENGTH}/{DEFAULT_MAX_PROMPT_LENGTH} unless given",
                file=sys.stderr,
            )
        elif contract.get("contract_version", CONTRACT_VERSION) > CONTRACT_VERSION:
            raise SystemExit(
                f"haf-score: {contract_path} is reward contract v{contract['contract_version']}, newer "
                f"than this haf-score (v{CONTRACT_VERSION}); upgrade haf_kernels"
            )
        max_length = max_length or contract.get("max_length") or DEFAULT_MAX_LENGTH
        max_prompt_length = max_prompt_length or contract.get("max_prompt_length") or DEFAULT_MAX_PROMPT_LENGTH
        max_prompt_length = min(max_prompt_length, max_length - 1)

        def rewards(batch):
            if not isinstance(getattr(model, "score", None), torch.nn.Linear):  # not a haf-train export
                return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, 0]
            # the classifier's own body and score head, read at the last attended token: the same position HF's
            # pad-id pooling finds, but also right for tokenizers without a pad token (batched, right-padded)
            hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)[0]
            idx = last_token_index(batch.attention_mask)
            return model.score(hidden[torch.arange(hidden.shape[0], device=hidden.device), idx])[:, 0]

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
            {"row": batch.source_rows[k], "reward_chosen": float(r[k]), "reward_rejected": float(r[b + k])}
            for k in range(b)
        ]
    acc = sum(r["reward_chosen"] > r["reward_rejected"] for r in rows) / len(rows)
    return {"accuracy": acc, "n_pairs": len(rows), "report": ds.report.summary(), "rows": rows}


def score_main(argv: list[str] | None = None) -> None:
    """``haf-score MODEL DATA``: per-pair rewards (``--output`` JSONL) and pairwise accuracy.

    Every option takes either spelling: ``--max-length`` or ``--max_length``."""
    p = argparse.ArgumentParser(prog="haf-score", description=score_main.__doc__)
    p.add_argument("model", help="a haf-train run directory or an exported AutoModelForSequenceClassification")
    p.add_argument("data", help="preference data (.jsonl/.json/.parquet/.csv or a load_from_disk folder)")
    p.add_argument("--output", help="write per-pair rewards as JSON lines here (row: 1-based row in DATA)")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=32)
    p.add_argument(
        "--max-length", "--max_length", dest="max_length", type=int, help="default: the run's / haf_reward.json"
    )
    p.add_argument("--max-prompt-length", "--max_prompt_length", dest="max_prompt_length", type=int)
    p.add_argument("--skip-bad-rows", "--skip_bad_rows", dest="skip_bad_rows", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    res = run_cli(
        "haf-score",
        lambda: score_pairs(
            a.model,
            a.data,
            batch_size=a.batch_size,
            max_length=a.max_length,
            max_prompt_length=a.max_prompt_length,
            skip_bad_rows=a.skip_bad_rows,
            device=a.device,
        ),
    )
    if a.output:
        with open(a.output, "w", encoding="utf-8") as f:
            for r in res["rows"]:
                f.write(json.dumps(r) + "\n")
    print(json.dumps({"accuracy": res["accuracy"], "n_pairs": res["n_pairs"], "data": res["report"]}))


def strength_main(argv: list[str] | None = None) -> dict:
    """``haf-strength``: preference strength from an ensemble of reward models (``training.methods.strength``).

    Returns the run summary; a bad row or a missing data file is one ``error: …`` line and exit status 1.
    """
    from .ensemble import main

    return run_cli("haf-strength", lambda: main(argv))
