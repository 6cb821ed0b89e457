"""Bad input to ``haf-train``: each row is a command line (or a corrupted run file) and the one-line error it must
give, naming the key or the file: ``SystemExit`` with exit status 2 and the message on stderr, never a traceback.

Config rows fail in ``build_config`` before any model is built; resume rows before the data is loaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from haf_kernels import objectives
from training.cli import train_main
from training.synthetic import write_task

ROOT = Path(__file__).resolve().parents[1]
MODEL = json.dumps(
    dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64)
)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli_data")
    write_task(d, n_train=32, n_test=8, n_shift=2)
    return d


def base_args(data: Path, run: Path) -> list[str]:
    return [
        "--train_data",
        str(data / "train.jsonl"),
        "--eval_data",
        str(data / "test.jsonl"),
        "--tokenizer",
        "synthetic",
        "--model_config",
        MODEL,
        "--max_length",
        "32",
        "--max_prompt_length",
        "8",
        "--batch_size",
        "8",
        "--micro_batch_size",
        "4",
        "--max_steps",
        "2",
        "--log_every",
        "1",
        "--lr",
        "1e-3",
        "--num_threads",
        "1",
        "--run_dir",
        str(run),
        "--no-progress",
        "--no-plots",
        "--no-tensorboard",
    ]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    """A finished 2-step run (base_args), trained once through the CLI."""
    run = tmp_path_factory.mktemp("cli_run") / "run"
    train_main(base_args(data, run))
    return run


@dataclass
class Ctx:
    data: Path
    tmp: Path
    trained: Callable[[], Path]

    @property
    def run(self) -> Path:
        return self.tmp / "run"

    def args(self, *extra: str, run: Path | None = None) -> list[str]:
        return base_args(self.data, run or self.run) + list(extra)

    def file(self, name: str, text: str) -> str:
        path = self.tmp / name
        path.write_text(text)
        return str(path)

    def copy_of_trained(self) -> Path:
        return Path(shutil.copytree(self.trained(), self.run))


def resume_with(*extra: str) -> Callable[[Ctx], list[str]]:
    def argv(c: Ctx) -> list[str]:
        c.copy_of_trained()
        return c.args("--resume", *extra)

    return argv


def truncated_checkpoint(c: Ctx) -> list[str]:
    run = c.copy_of_trained()
    blob = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(blob[:1000])
    return c.args("--resume")


class MakesAFile:
    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def malicious_checkpoint(c: Ctx) -> list[str]:
    run = c.copy_of_trained()
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    torch.save(dict(state, x=MakesAFile(c.tmp / "pwned")), run / "checkpoint.pt")
    return c.args("--resume")


def torn_metrics_middle_line(c: Ctx) -> list[str]:
    run = c.copy_of_trained()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][: len(lines[1]) // 2]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return c.args("--resume", "--max_steps", "3")


def edited_data(c: Ctx) -> list[str]:
    c.copy_of_trained()
    data = c.tmp / "data"
    shutil.copytree(c.data, data)
    # the run's checkpoint fingerprinted the original files: point the copy's fingerprint at the new copy
    state = torch.load(c.run / "checkpoint.pt", weights_only=True)
    for key, name in (("train_data", "train.jsonl"), ("eval_data", "test.jsonl")):
        state["data"][key]["path"] = state["user_config"][key] = str(data / name)
    torch.save(state, c.run / "checkpoint.pt")
    with open(data / "train.jsonl", "a") as f:
        f.write((c.data / "train.jsonl").read_text().splitlines()[0] + "\n")
    return c.args("--resume", "--train_data", str(data / "train.jsonl"), "--eval_data", str(data / "test.jsonl"))


A = Callable[[Ctx], list[str]]


def flags(*extra: str) -> A:
    return lambda c: c.args(*extra)


# (id, argv, regex the message must match)
ROWS: list[tuple[str, A, str]] = [
    ("lr-negative", flags("--lr", "-0.003"), r"^lr: must be > 0\.0, got -0\.003$"),
    ("lr-zero", flags("--lr", "0"), r"^lr: must be > 0\.0, got 0\.0$"),
    ("lr-nan", flags("--lr", "nan"), r"^lr: must be finite, got nan$"),
    ("max-steps-negative", flags("--max_steps", "-5"), r"^max_steps: must be >= 0, got -5$"),
    ("batch-size-zero", flags("--batch_size", "0"), r"^batch_size: must be >= 1, got 0$"),
    ("micro-batch-negative", flags("--micro_batch_size", "-4"), r"^micro_batch_size: must be >= 1, got -4$"),
    ("eval-batch-zero", flags("--eval_batch_size", "0"), r"^eval_batch_size: must be >= 1, got 0$"),
    ("grad-accumulation", flags("--batch_size", "10"), r"^batch_size: must be a multiple of micro_batch_size \(10 %"),
    ("beta-zero", flags("--beta", "0"), r"^beta: must be > 0\.0, got 0\.0$"),
    ("beta-negative", flags("--beta", "-0.1"), r"^beta: must be > 0\.0, got -0\.1$"),
    ("alpha-negative", flags("--alpha", "-0.5"), r"^alpha: must be >= 0\.0, got -0\.5$"),
    ("zero-loss", flags("--alpha", "0", "--reward_weight", "0"), r"^reward_weight: alpha and reward_weight are both 0"),
    (
        "policy-loss",
        flags("--policy_loss", "kto"),
        rf"^policy_loss: must be one of {re.escape('|'.join(objectives.names()))}, got 'kto'$",
    ),
    (
        "reference-mode",
        flags("--reference", "frozen"),
        r"^reference: must be one of auto\|lora\|copy\|precomputed\|none",
    ),
    ("reference-lora-no-r", flags("--reference", "lora"), r"^reference: reference='lora' needs lora_r > 0"),
    ("label-smoothing", flags("--label_smoothing", "0.5"), r"^label_smoothing: must be < 0\.5, got 0\.5"),
    ("prompt-ge-length", flags("--max_prompt_length", "32"), r"^max_prompt_length: must be < max_length \(32 >= 32\)"),
    ("prompt-zero", flags("--max_prompt_length", "0"), r"^max_prompt_length: must be >= 1, got 0$"),
    ("dtype", flags("--dtype", "fp16"), r"^dtype: must be one of auto\|bf16\|fp32, got 'fp16'$"),
    ("device", flags("--device", "cuda:1"), r"^device: must be one of auto\|cpu\|cuda, got 'cuda:1'$"),
    ("log-every-zero", flags("--log_every", "0"), r"^log_every: must be >= 1, got 0$"),
    ("nonfinite-mode", flags("--nonfinite", "ignore"), r"^nonfinite: must be one of stop\|skip, got 'ignore'$"),
    ("train-data-required", lambda c: c.args()[2:], r"^train_data: required"),
    ("train-data-missing", flags("--train_data", "nope/pairs.jsonl"), r"^train_data: no such file or folder: 'nope/"),
    (
        "train-data-gz-missing",
        flags("--train_data", "nope.jsonl.gz"),
        r"^train_data: no such file or folder: 'nope\.jsonl\.gz'$",
    ),
    ("check-finite-negative", flags("--check_finite_steps", "-1"), r"^check_finite_steps: must be >= 0, got -1$"),
    ("eval-data-missing", flags("--eval_data", "/no/such/val.jsonl"), r"^eval_data: no such file or folder: '/no/such"),
    ("metarm-data-missing", flags("--metarm_data", "./pool.jsonl"), r"^metarm_data: no such file: '\./pool\.jsonl'$"),
    ("noisy-needs-eval", flags("--noisy_mode", "flip", "--eval_data", ""), r"^eval_data: required with noisy_mode"),
    ("model-missing", flags("--model", "/no/such/model"), r"^model: no such model folder: '/no/such/model'$"),
    ("unknown-option", flags("--nope", "1"), r"^unknown option --nope"),
    (
        "unknown-config-key",
        lambda c: c.args(c.file("c.yaml", "lrr: 0.1\n")),
        r"^lrr: unknown config key \(did you mean lr\?\)$",
    ),
    ("bad-yaml", lambda c: c.args(c.file("bad.yaml", "lr: [0.1\n")), r"bad\.yaml: invalid YAML at line 2, column 1"),
    (
        "bad-json",
        lambda c: c.args("--config", c.file("c.json", "{lr: 1}")),
        r"c\.json: invalid JSON at line 1, column 2",
    ),
    ("config-missing", flags("--config", "nope.yaml"), r"^config: no such file: 'nope\.yaml'$"),
    ("bad-type-flag", flags("--lr", "fast"), r"^lr: expected a number, got 'fast'$"),
    (
        "bad-type-yaml",
        lambda c: c.args(c.file("t.yaml", "eval_every: [3]\n")),
        r"^eval_every: expected an integer, got \[3\] \(list\)$",
    ),
    ("bad-type-bool", flags("--plots", "maybe"), r"^plots: expected a boolean \(true/false\), got 'maybe'$"),
    ("bad-model-config", flags("--model_config", "{hidden"), r"^model_config: expected a mapping \(JSON object\)"),
    ("resume-bad-value", flags("--resume", "later"), r'^resume: expected true, false or "auto", got \'later\'$'),
    ("resume-no-checkpoint", flags("--resume"), r"^resume: no checkpoint to resume from at .*run/checkpoint\.pt: drop"),
    (
        "resume-changed-lr",
        resume_with("--lr", "2e-3"),
        r"changed since the checkpoint: lr: 0\.001 in the checkpoint, 0\.002 now;",
    ),
    ("resume-changed-data", edited_data, r"train_data: .*train\.jsonl changed since the checkpoint \(size \d+ -> \d+"),
    ("truncated-checkpoint", truncated_checkpoint, r"run/checkpoint\.pt: truncated or corrupted checkpoint"),
    ("malicious-checkpoint", malicious_checkpoint, r"run/checkpoint\.pt: refusing to load this checkpoint.*GLOBAL"),
    ("torn-metrics-middle", torn_metrics_middle_line, r"run/metrics\.jsonl: line 2 is corrupted"),
]


@pytest.mark.parametrize("row_id, argv, pattern", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input(row_id, argv, pattern, data, trained, tmp_path, capsys):
    ctx = Ctx(data, tmp_path, lambda: trained)
    args = argv(ctx)
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:
        train_main(args)
    message = str(err.value)
    assert err.value.code == 2, message
    assert re.search(pattern, message), message
    assert "\n" not in message  # one problem: one line
    out = capsys.readouterr()
    assert out.err == f"haf-train: error: {message}\n" and "Traceback" not in out.err
    assert not (tmp_path / "pwned").exists()  # nothing in a run file is executed


def test_every_problem_is_listed_one_line_each(data, tmp_path, capsys):
    args = base_args(data, tmp_path / "run") + ["--lr", "-1", "--beta", "0", "--batch_size", "0", "--nope_key=1"]
    with pytest.raises(SystemExit, match="unknown option --nope_key"):  # option names are checked first
        train_main(args)
    with pytest.raises(SystemExit) as err:
        train_main(args[:-1])
    lines = str(err.value).splitlines()
    assert err.value.code == 2 and lines[0] == "invalid config (3 problems):"
    assert [ln.split(":")[0].strip() for ln in lines[1:]] == ["beta", "batch_size", "lr"]
    assert not (tmp_path / "run").exists()  # nothing was done


def test_torn_last_metrics_line_is_dropped_with_a_warning(data, trained, tmp_path, capsys):
    run = Path(shutil.copytree(trained, tmp_path / "run"))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "split": "tr')  # killed mid-write
    n = len((run / "metrics.jsonl").read_text().splitlines())
    train_main(base_args(data, run) + ["--resume", "--max_steps", "3"])
    assert f"metrics.jsonl: line {n} is incomplete" in capsys.readouterr().out
    rec = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rec if r["split"] == "train"] == [1, 2, 3]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "training", *args], cwd=ROOT, env=env, capture_output=True, text=True)


@pytest.mark.parametrize(
    "args, line",
    [
        (["--lr", "-0.003", "--max_steps", "5"], "haf-train: error: lr: must be > 0.0, got -0.003"),
        (["--resume"], "haf-train: error: resume: no checkpoint to resume from at "),
    ],
    ids=["negative-lr", "resume-without-checkpoint"],
)
def test_subprocess_exit_status_2_and_one_line(data, tmp_path, args, line):
    out = run_cli(*base_args(data, tmp_path / "run"), *args)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(line) and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert out.stdout == "" and not (tmp_path / "run").exists()


def test_bad_data_row_is_one_line_exit_1(data, tmp_path, capsys):
    bad = tmp_path / "train.jsonl"
    lines = (data / "train.jsonl").read_text().splitlines()
    bad.write_text("\n".join(lines[:3] + ['{"prompt": "a", "chosen": '] + lines[3:]) + "\n")
    with pytest.raises(SystemExit) as err:
        train_main(base_args(data, tmp_path / "run") + ["--train_data", str(bad)])
    assert err.value.code == 1 and re.search(r"train\.jsonl: row 4: .*--skip-bad-rows", str(err.value))
    assert capsys.readouterr().err.count("\n") == 1
