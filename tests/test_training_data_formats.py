"""Data files as they ship (compressed JSON lines / JSON / CSV, parquet), "not found" without a Hub lookup, and bad
rows: a ``BadRowError`` with file, line number and reason, reported by every CLI as one line with the
``--skip-bad-rows`` hint (and honoured by haf-train, haf-strength and the Secrets-of-RLHF experiment)."""

from __future__ import annotations

import bz2
import copy
import gzip
import json
import lzma
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from training.cli import run_cli
from training.data import BadRowError, load_preferences, read_rows
from training.errors import SKIP_HINT, DataNotFoundError
from training.synthetic import build_tokenizer, write_task

ROOT = Path(__file__).resolve().parent.parent
WORDS = [f"w{i:02d}" for i in range(48)] + ["Human:", "Assistant:"]
ROWS = [
    {"prompt": "w01 w02", "chosen": "w03 w04", "rejected": "w05", "margin": 0.5},
    {"prompt": "w06", "chosen": "w07", "rejected": "w08 w09"},
    {"chosen": "\n\nHuman: w01\n\nAssistant: w02", "rejected": "\n\nHuman: w01\n\nAssistant: w03 w04"},
]
# HH-style transcript pair whose chosen side is the start of the rejected one: empty chosen response
HH_PREFIX = {"chosen": "\n\nHuman: w01 w02\n\nAssistant:", "rejected": "\n\nHuman: w01 w02\n\nAssistant: w03"}
MODEL = '{"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}'


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(WORDS)


def jsonl_bytes(rows, blank_after: int | None = None) -> bytes:
    lines = [json.dumps(r) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "")
    return ("\n".join(lines) + "\n").encode()


def compress(data: bytes, suffix: str) -> bytes:
    if suffix == "gz":
        return gzip.compress(data)
    if suffix == "bz2":
        return bz2.compress(data)
    if suffix == "xz":
        return lzma.compress(data)
    if suffix == "zst":
        try:
            from compression import zstd  # Python >= 3.14

            return zstd.compress(data)
        except ImportError:
            zstandard = pytest.importorskip("zstandard")
            return zstandard.ZstdCompressor().compress(data)
    return data


def csv_bytes(rows) -> bytes:
    import pandas as pd

    return (
        pd.DataFrame([{k: r.get(k, "") for k in ("prompt", "chosen", "rejected")} for r in rows[:2]])
        .to_csv(index=False)
        .encode()
    )


@pytest.mark.parametrize(
    "name",
    ["d.jsonl.gz", "d.jsonl.bz2", "d.jsonl.xz", "d.jsonl.zst", "d.json.gz", "d.csv.gz", "d.ndjson", "d.JSONL.GZ"],
)
def test_compressed_files_read(tmp_path, tok, name):
    fmt, comp = (name.lower().split(".") + [""])[1:3]
    data = {"jsonl": jsonl_bytes(ROWS), "ndjson": jsonl_bytes(ROWS), "json": json.dumps(ROWS).encode()}.get(fmt)
    data = csv_bytes(ROWS) if fmt == "csv" else data
    path = tmp_path / name
    path.write_bytes(compress(data, comp))
    ds = load_preferences(path, tok, max_length=32, max_prompt_length=16)
    assert len(ds) == (2 if fmt == "csv" else 3)
    assert tok.convert_ids_to_tokens(ds[1].chosen_ids)[0] == "w07"
    if fmt != "csv":
        assert ds[0].columns["margin"] == 0.5
        assert tok.convert_ids_to_tokens(ds[2].prompt_ids)[-1] == "Assistant:"


def test_parquet_keeps_conversations_and_nulls(tmp_path, tok):
    conv = {
        "chosen": [{"role": "user", "content": "w01"}, {"role": "assistant", "content": "w02 w03"}],
        "rejected": [{"role": "user", "content": "w01"}, {"role": "assistant", "content": "w04"}],
    }
    path = tmp_path / "conv.parquet"
    pq.write_table(pa.Table.from_pylist([conv, copy.deepcopy(conv)]), path)
    ds = load_preferences(path, tok, max_length=32, max_prompt_length=16)  # lists stay lists of messages
    assert len(ds) == 2 and "w04" in tok.convert_ids_to_tokens(ds[0].rejected_ids)
    path = tmp_path / "explicit.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS[:2]), path)  # row 2 has no margin: null, not NaN
    ds = load_preferences(path, tok, max_length=32, max_prompt_length=16)
    assert ds[0].columns == {"margin": 0.5} and ds[1].columns == {}


def test_json_file_holding_json_lines(tmp_path, tok):
    path = tmp_path / "d.json"
    path.write_bytes(jsonl_bytes(ROWS))
    assert len(load_preferences(path, tok, max_length=32, max_prompt_length=16)) == 3


def test_row_numbers_are_line_numbers_in_compressed_files(tmp_path, tok):
    rows = ROWS[:2] + [HH_PREFIX]
    path = tmp_path / "hh.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl_bytes(rows, blank_after=1)))  # line 2 blank: the bad row is on line 4
    with pytest.raises(BadRowError, match=r"hh\.jsonl\.gz: row 4: empty response"):
        load_preferences(path, tok, max_length=32, max_prompt_length=16)
    assert [n for n, _ in read_rows(path)] == [1, 3, 4]


def _no_hub(*a, **k):
    raise AssertionError("a missing local path must not be looked up on the Hub")


@pytest.mark.parametrize("name", ["missing.jsonl.gz", "missing.parquet", "sub/dir/missing", "./missing", "~/nope.json"])
def test_missing_local_path_is_not_found_without_hub_lookup(tmp_path, tok, monkeypatch, name):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets, "load_dataset", _no_hub)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        load_preferences(name, tok)
    assert isinstance(err.value, DataNotFoundError)
    assert str(err.value) == f"{name}: not found (no such file or folder)"


def test_unreachable_hub_name_says_both(tok, monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    calls = []

    def offline(name, split=None, **k):
        calls.append(name)
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (OfflineModeIsEnabled)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataNotFoundError) as err:
        load_preferences("someorg/somedata", tok)
    msg = str(err.value)
    assert calls == ["someorg/somedata"] and "\n" not in msg
    assert msg.startswith("someorg/somedata: not found: no such local file or folder, and loading it as a ")
    assert "Hub dataset failed (ConnectionError: Couldn't reach 'someorg/somedata'" in msg


def test_existing_file_with_unknown_suffix(tmp_path, tok):
    path = tmp_path / "d.txt"
    path.write_text("x")
    with pytest.raises(ValueError, match=r"d\.txt: unsupported data format"):
        load_preferences(path, tok)


# ---------------------------------------------------------------------------------------------- bad rows
def test_hh_empty_response_is_a_bad_row_with_reason(tmp_path, tok):
    path = tmp_path / "hh.jsonl"
    path.write_bytes(jsonl_bytes([ROWS[2], HH_PREFIX, ROWS[0]]))
    with pytest.raises(BadRowError) as err:
        load_preferences(path, tok, max_length=32, max_prompt_length=16)
    msg = str(err.value)
    assert msg.startswith(f"{path}: row 2: empty response (chosen is empty after splitting off the prompt"), msg
    ds = load_preferences(path, tok, max_length=32, max_prompt_length=16, skip_bad_rows=True)
    assert len(ds) == 2 and dict(ds.report.bad) == {"empty response": 1}
    swapped = {"chosen": HH_PREFIX["rejected"], "rejected": HH_PREFIX["chosen"]}
    path.write_bytes(jsonl_bytes([swapped]))
    with pytest.raises(BadRowError, match=r"row 1: empty response \(rejected is empty after splitting"):
        load_preferences(path, tok, max_length=32, max_prompt_length=16)


def test_failing_chat_template_is_a_bad_row(tmp_path, tok):
    strict = copy.deepcopy(tok)
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ m['content'] }} {% endfor %}"
    )
    conv = [{"role": "system", "content": "w01"}, {"role": "user", "content": "w02"}]
    rows = [
        {"prompt": [{"role": "user", "content": "w01"}], "chosen": [{"role": "assistant", "content": "w02"}],
         "rejected": [{"role": "assistant", "content": "w03"}]},
        {"chosen": conv + [{"role": "assistant", "content": "w03"}],
         "rejected": conv + [{"role": "assistant", "content": "w04"}]},
    ]  # fmt: skip
    path = tmp_path / "conv.jsonl"
    path.write_bytes(jsonl_bytes(rows))
    with pytest.raises(BadRowError, match=r"conv\.jsonl: row 2: chat template failed \(TemplateError: no system role"):
        load_preferences(path, strict, max_length=32, max_prompt_length=16)
    assert len(load_preferences(path, strict, max_length=32, max_prompt_length=16, skip_bad_rows=True)) == 1


def test_cli_errors_one_line(capsys):
    def fail(exc):
        def work():
            raise exc

        return work

    with pytest.raises(SystemExit) as ex:
        run_cli("prog", fail(BadRowError("d.jsonl: row 7: empty response (chosen is blank)")))
    assert ex.value.code == 1
    err = capsys.readouterr().err
    assert err == f"prog: error: d.jsonl: row 7: empty response (chosen is blank) ({SKIP_HINT})\n"
    with pytest.raises(SystemExit):
        run_cli("prog", fail(DataNotFoundError("x.jsonl: not found (no such file or folder)")))
    assert capsys.readouterr().err == "prog: error: x.jsonl: not found (no such file or folder)\n"
    with pytest.raises(KeyError):  # anything else is a real bug: traceback as usual
        run_cli("prog", fail(KeyError("x")))


@pytest.fixture(scope="module")
def bad_task(tmp_path_factory):
    """Synthetic train/test files with one HH-style bad row on line 3 of the training file."""
    d = tmp_path_factory.mktemp("badtask")
    paths = write_task(d, n_train=16, n_test=8, n_shift=2)
    lines = paths["train"].read_text().splitlines()
    lines.insert(2, json.dumps(HH_PREFIX))
    bad = d / "train_bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    return d, bad, paths


def common_args(d: Path, bad: Path, paths: dict, run: Path) -> list[str]:
    return [
        "--train_data", str(bad), "--eval_data", str(paths["test"]), "--tokenizer", "synthetic",
        "--model_config", MODEL, "--max_length", "32", "--max_prompt_length", "8", "--batch_size", "4",
        "--micro_batch_size", "4", "--max_steps", "2", "--run_dir", str(run), "--no-progress", "--no-tensorboard",
        "--no-plots", "--backend", "torch",
    ]  # fmt: skip


def expected_line(bad: Path) -> str:
    """The last stderr line of a CLI that meets this bad row (a ``<prog>: `` prefix before it is allowed)."""
    return (
        f"error: {bad}: row 3: empty response (chosen is empty after splitting off the prompt it shares with "
        f"rejected: no explicit prompt, and the chosen transcript is the start of the rejected one) ({SKIP_HINT})"
    )


def test_haf_train_bad_row_is_one_line_error(bad_task, tmp_path, capsys):
    from training.cli import train_main

    d, bad, paths = bad_task
    with pytest.raises(SystemExit) as ex:
        train_main(common_args(d, bad, paths, tmp_path / "run"))
    assert ex.value.code not in (0, None)
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(expected_line(bad))


def test_haf_train_skip_bad_rows_then_haf_score(bad_task, tmp_path, capsys):
    from training.cli import score_main, train_main

    d, bad, paths = bad_task
    train_main(common_args(d, bad, paths, tmp_path / "run") + ["--skip-bad-rows"])
    out = capsys.readouterr().out
    assert "16/17 rows kept" in out and "1 bad rows skipped" in out
    # haf-score on the same file: one line without the flag, the 16 usable pairs with it
    with pytest.raises(SystemExit) as ex:
        score_main([str(tmp_path / "run"), str(bad)])
    assert ex.value.code not in (0, None)
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(expected_line(bad))
    score_main([str(tmp_path / "run"), str(bad), "--skip-bad-rows"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n_pairs"] == 16


def test_haf_strength_bad_row_is_one_line_error_without_traceback(bad_task, tmp_path):
    d, bad, paths = bad_task
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    argv = common_args(d, bad, paths, tmp_path / "strength") + ["--members", "2"]
    code = "import sys; from training.cli import strength_main; strength_main(sys.argv[1:])"
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith(expected_line(bad))


def test_haf_strength_skip_bad_rows(bad_task, tmp_path, capsys):
    from training.cli import strength_main

    d, bad, paths = bad_task
    gz = d / "train_bad.jsonl.gz"  # compressed input works too
    gz.write_bytes(gzip.compress(bad.read_bytes()))
    out = tmp_path / "strength" / "out.jsonl"
    argv = common_args(d, gz, paths, tmp_path / "strength") + ["--members", "2", "--skip-bad-rows"]
    summary = strength_main(argv + ["--output", str(out)])
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    good = [json.loads(x) for x in paths["train"].read_text().splitlines()]
    assert summary["bad_rows_skipped"] == 1 and len(rows) == 16
    assert [r["chosen"] for r in rows] == [r["chosen"] for r in good]
    assert all("strength_mean" in r and "strength_std" in r for r in rows)
    with pytest.raises(SystemExit):  # without the flag: the one-line error
        strength_main(argv[:-1])
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(expected_line(gz))


def test_secrets_experiment_readers_honour_skip_bad_rows(bad_task, tok, monkeypatch):
    from training.config import TrainConfig
    from training.experiments import secrets_rlhf as X

    d, bad, _ = bad_task
    cfg = TrainConfig(max_length=32, max_prompt_length=8)
    with pytest.raises(BadRowError, match="row 3: empty response"):
        X.load_split(str(bad), tok, cfg)
    assert len(X.load_split(str(bad), tok, cfg, skip_bad_rows=True)) == 16

    seen = []

    class Stop(Exception):
        pass

    def fake_unit(args):
        seen.append(args)
        raise Stop

    monkeypatch.setattr(X, "run_unit", fake_unit)
    for flag in ([], ["--skip-bad-rows"]):
        with pytest.raises(Stop):
            X.main(["--quick", "--work", str(d / "work"), "--out", str(d / "out"), *flag])
    assert [args[-1] for args in seen] == [False, True]
