"""Main job: train a small Llama-style HaF reward model on the bundled synthetic task, on CPU, in minutes.

``python -m training.demo [--small] [--run-dir DIR] [any haf-train flag]`` writes the synthetic splits
(clean labels) and trains from a config-built model with the local word-level tokenizer, then prints the
held-out accuracy of the reward head and of the implicit (DPO) reward and where the run directory is.
``--small`` is a reduced run (used by the tests).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .cli import score_pairs
from .config import build_config
from .synthetic import write_task
from .trainer import train

CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"  # the demo's settings, one place
SMALL = dict(n_train=800, n_test=200)
SMALL_FLAGS = ["--max_steps", "60", "--warmup_steps", "8"]
FULL = dict(n_train=2500, n_test=500)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    small = "--small" in argv
    if small:
        argv.remove("--small")
    sizes = SMALL if small else FULL
    run_dir = "runs/demo-small" if small else "runs/demo"
    cfg = build_config([str(CONFIG), *(SMALL_FLAGS if small else []), *argv], run_dir=run_dir)
    t0 = time.time()
    paths = write_task(f"{cfg.run_dir}/data", seed=0, n_train=sizes["n_train"], n_test=sizes["n_test"], n_shift=200)
    cfg = cfg.replace(train_data=cfg.train_data or str(paths["train"]), eval_data=cfg.eval_data or str(paths["test"]))
    metrics = train(cfg)
    shift = score_pairs(metrics["run_dir"], str(paths["shift"]), batch_size=cfg.eval_batch_size)
    wall = time.time() - t0
    print(
        f"\nheld-out reward-head accuracy:     {metrics['reward_accuracy']:.3f}"
        f"  (ambiguous pairs {metrics.get('subset/ambiguous/reward_accuracy', float('nan')):.3f},"
        f" clear {metrics.get('subset/clear/reward_accuracy', float('nan')):.3f})"
    )
    print(f"held-out implicit-reward accuracy: {metrics['implicit_accuracy']:.3f}")
    print(f"calibration (ECE of σ(r_c − r_r)):  {metrics['reward_ece']:.3f}")
    print(f"shifted split (longer responses, other generator), reward head: {shift['accuracy']:.3f}")
    print(
        f"wall time {wall:.1f} s; run directory: {metrics['run_dir']} (metrics.jsonl, tb/, curves.png, checkpoint.pt)"
    )
    return dict(metrics, demo_wall_s=wall, shift_reward_accuracy=shift["accuracy"])


if __name__ == "__main__":
    main()
