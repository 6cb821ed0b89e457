"""Metrics: JSON lines, TensorBoard event files and PNG plots of the curves (main process only)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .errors import UserError


class MetricsFileError(UserError, ValueError):
    """A ``metrics.jsonl`` that cannot be read: names the file and the line."""


def read_metrics(path: str | Path, *, warn=print) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``.

    A torn last line (a run killed mid-write) is dropped with a warning; any other line that is not a JSON
    object with a ``step`` is a ``MetricsFileError`` naming the file and the line.
    """
    path = Path(path)
    lines = path.read_bytes().split(b"\n")
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    out: list[dict[str, Any]] = []
    for i, raw in enumerate(lines[: last + 1]):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                raise ValueError("not a record with an integer step")
        except (UnicodeDecodeError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
            if i == last:
                warn(f"[haf-train] warning: {path}: line {i + 1} is incomplete (a run killed mid-write?); dropped")
                break
            raise MetricsFileError(
                f"{path}: line {i + 1} is corrupted ({exc}); delete or fix that line (later lines are kept)"
            ) from None
        out.append(rec)
    return out


class MetricsLogger:
    """Appends ``{"step", "split", **metrics}`` to ``metrics.jsonl`` and TensorBoard; ``history`` keeps them.

    On resume from ``step``, records after it are dropped from the JSONL (they are recomputed) and
    TensorBoard purges them.
    """

    def __init__(
        self, run_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True, resume_step: int | None = None
    ) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.history: list[dict[str, Any]] = []
        self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step and r.get("split") != "final"]
            tmp = self.path.with_name(self.path.name + ".tmp")
            try:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
                os.replace(tmp, self.path)  # a kill while rewriting never loses the history
            finally:
                tmp.unlink(missing_ok=True)
            self.history = kept
        elif self.path.exists():
            self.path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_step)
            except Exception as exc:  # tensorboard missing: JSONL and plots still work
                print(f"[haf-train] TensorBoard disabled: {exc}")

    def log(self, step: int, split: str, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        rec = {"step": step, "split": split, **metrics}
        self.history.append(rec)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


EVAL_KEYS = ("reward_accuracy", "implicit_accuracy", "reward_margin", "implicit_margin", "reward_ece", "n_pairs")


def format_metrics(step: int, split: str, metrics: dict[str, Any], keys: tuple[str, ...] = EVAL_KEYS) -> str:
    """One stdout line of (evaluation) metrics: ``[haf-train] step 50 eval: reward_accuracy 0.8125, ...``."""
    parts = []
    for k in keys:
        v = metrics.get(k)
        if isinstance(v, (int, float)):
            parts.append(f"{k} {int(v)}" if k == "n_pairs" else f"{k} {v:.4f}")
    return f"[haf-train] step {step} {split}: " + ", ".join(parts)


def plot_curves(history: list[dict[str, Any]], path: str | Path) -> Path | None:
    """PNG of training loss, train/eval accuracies and learning rate against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in history if r["split"] == "train"]
    evals = [r for r in history if r["split"] in ("eval", "final")]
    if not train and not evals:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for key in ("loss", "reward_loss", "policy_loss"):
        pts = [(r["step"], r[key]) for r in train if key in r]
        if pts:
            axes[0].plot(*zip(*pts), label=key)
    axes[0].set_title("training loss")
    for split, rows in (("train", train), ("eval", evals)):
        for key in ("reward_accuracy", "implicit_accuracy"):
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                axes[1].plot(*zip(*pts), marker="o" if split == "eval" else None, label=f"{split} {key}")
    axes[1].set_title("pairwise accuracy")
    axes[1].set_ylim(0, 1.02)
    pts = [(r["step"], r["lr"]) for r in train if "lr" in r]
    if pts:
        axes[2].plot(*zip(*pts))
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
