"""The reward contract: the trainer, its evaluation, haf-score (run directory and export) and plain transformers
(``AutoModelForSequenceClassification`` on ``tokenizer(prompt + response)``) give the same reward.

Also: empty prompts (BOS, every response token scored), left truncation keeping BOS / template specials, file
row numbers through ``--skip-bad-rows`` and the train/eval split, both CLI flag spellings, eval metrics on stdout
and the throughput of the last log window.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
import transformers
from reward_contract_helpers import TOKENIZERS, hh_rows, hh_to_messages, write_rows

from training import cli
from training.config import TrainConfig, parse_overrides
from training.data import (
    collate_pairs,
    encode_for_reward,
    encode_reward_input,
    load_preferences,
    reward_text,
    truncate,
)
from training.distributed import DistInfo
from training.evaluate import evaluate
from training.reference import ReferenceLogps
from training.synthetic import SyntheticTask, write_task
from training.trainer import load_data, load_trained, train

MAX_LENGTH, MAX_PROMPT_LENGTH = 128, 64  # not the defaults: the export must carry them
BAD_LINE = 3  # a chosen == rejected row at this line of the file, skipped with skip_bad_rows


def model_args(name: str) -> dict:
    if name == "gpt2_nospecial":
        return dict(model_type="gpt2", model_config=dict(n_embd=32, n_layer=2, n_head=4, n_positions=128))
    return dict(
        model_type="llama",
        model_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
        ),
    )


def data_file(tmp_path, name: str):
    rows = hh_rows(20, seed=1, long_every=7)  # rows 7 and 14 have long multi-turn prompts (truncated)
    if name == "chat_template":
        rows = [hh_to_messages(r) for r in rows]
    bad = json.dumps({"chosen": rows[0]["chosen"], "rejected": rows[0]["chosen"]})
    # gzip-compressed JSON lines, as HH-RLHF ships
    return write_rows(tmp_path / "hh.jsonl.gz", rows, bad_lines={BAD_LINE: bad}), rows


def file_line(i: int) -> int:
    """1-based line in the file of ``rows[i]`` (the bad row sits at BAD_LINE)."""
    return i + 1 + (i + 1 >= BAD_LINE)


def pretrained_qwen2(folder, tok) -> dict:
    """A tiny Qwen2 saved as a pretrained folder (config.json beside a generic tokenizer: transformers 5 loads
    that tokenizer as Qwen2Tokenizer); the TrainConfig fields that train from it."""
    cfg = transformers.Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return dict(model=str(folder), tokenizer="")


@pytest.mark.parametrize("name", [*TOKENIZERS, "qwen2_pretrained"])
def test_four_scorers_agree(tmp_path, name):
    tok = TOKENIZERS.get(name, TOKENIZERS["llama_bos"])()
    tok.save_pretrained(tmp_path / "tok")
    data, rows = data_file(tmp_path, name)
    if name == "qwen2_pretrained":
        with pytest.warns(UserWarning, match="loads this tokenizer as Qwen2Tokenizer"):
            model_kw = pretrained_qwen2(tmp_path / "base", tok)
            from training.data import load_tokenizer_dir

            load_tokenizer_dir(tmp_path / "base")
    else:
        model_kw = dict(tokenizer=str(tmp_path / "tok"), **model_args(name))
    cfg = TrainConfig(
        run_dir=str(tmp_path / "run"),
        train_data=str(data),
        skip_bad_rows=True,
        eval_fraction=0.3,
        max_length=MAX_LENGTH,
        max_prompt_length=MAX_PROMPT_LENGTH,
        batch_size=4,
        micro_batch_size=4,
        eval_batch_size=4,
        max_steps=4,
        lr=1e-2,
        head_lr=5e-2,
        reference="none",
        export=True,
        progress=False,
        tensorboard=False,
        plots=False,
        device="cpu",
        dtype="fp32",
        num_threads=1,
        **model_kw,
    )
    final = train(cfg)
    run, export = tmp_path / "run", tmp_path / "run" / "export"

    # the export carries what scoring needs
    contract = json.loads((export / "haf_reward.json").read_text())
    assert contract["contract_version"] == 1
    assert (contract["max_length"], contract["max_prompt_length"]) == (MAX_LENGTH, MAX_PROMPT_LENGTH)
    assert contract["chat_template"] == (name == "chat_template")
    assert contract["policy_eos_appended"] == (name != "gpt2_nospecial")

    # haf-score on the run directory and on the export (lengths from haf_reward.json), row = line in the file
    by_run = cli.score_pairs(str(run), str(data), skip_bad_rows=True, batch_size=5)
    by_export = cli.score_pairs(str(export), str(data), skip_bad_rows=True, batch_size=5)
    assert [r["row"] for r in by_run["rows"]] == [file_line(i) for i in range(len(rows))]
    assert [r["row"] for r in by_export["rows"]] == [r["row"] for r in by_run["rows"]]
    assert "1 bad rows skipped" in by_run["report"] and "truncated 2 prompts" in by_run["report"]

    # the trainer's own evaluation on its held-out split (file rows survive the split)
    model, ttok, tcfg = load_trained(run)
    _, eval_ds = load_data(tcfg, ttok)
    eval_rows: list[dict] = []
    metrics = evaluate(
        model,
        model,
        eval_ds,
        reference=ReferenceLogps("none"),
        split="eval",
        pad_token_id=ttok.pad_token_id if ttok.pad_token_id is not None else 0,
        batch_size=3,
        beta=tcfg.beta,
        averaged=False,
        info=DistInfo(),
        autocast=contextlib.nullcontext,
        rows_out=eval_rows,
    )
    assert metrics["reward_accuracy"] == pytest.approx(final["reward_accuracy"])
    assert len(eval_rows) == len(eval_ds) >= 4

    # plain transformers, the standard way, on untruncated text
    seq = transformers.AutoModelForSequenceClassification.from_pretrained(export).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(export)
    run_scores = {r["row"]: r for r in by_run["rows"]}
    exp_scores = {r["row"]: r for r in by_export["rows"]}
    deltas = {"hf": 0.0, "export": 0.0, "eval": 0.0}
    n_hf = 0
    for i, row in enumerate(rows):
        line = file_line(i)
        for key in ("chosen", "rejected"):
            want = run_scores[line][f"reward_{key}"]
            deltas["export"] = max(deltas["export"], abs(exp_scores[line][f"reward_{key}"] - want))
            if name == "chat_template":
                enc = hf_tok.apply_chat_template(row[key], tokenize=True, return_dict=True, return_tensors="pt")
                text = hf_tok.apply_chat_template(row[key], tokenize=False)
                assert enc["input_ids"][0].tolist() == encode_for_reward(hf_tok, text)  # BOS not duplicated
            else:
                enc = hf_tok(row[key], return_tensors="pt")
            if enc["input_ids"].shape[1] > MAX_LENGTH or i % 7 == 6:
                continue  # truncated for training: only the haf scorers apply the training truncation
            with torch.no_grad():
                hf = float(seq(**enc).logits[0, 0])
            deltas["hf"] = max(deltas["hf"], abs(hf - want))
            n_hf += 1
    for rec in eval_rows:
        for key in ("chosen", "rejected"):
            deltas["eval"] = max(deltas["eval"], abs(rec[f"reward_{key}"] - run_scores[rec["row"]][f"reward_{key}"]))
    assert n_hf >= 30
    assert max(deltas.values()) <= 1e-4, deltas


@pytest.mark.parametrize("name", ["llama_bos", "gpt2_nospecial", "chat_template"])
def test_pair_ids_are_the_tokenizer_ids_of_the_joined_text(tmp_path, name):
    tok = TOKENIZERS[name]()
    rows = hh_rows(12, seed=3)
    if name == "chat_template":
        rows = [hh_to_messages(r) for r in rows]
    ds = load_preferences(write_rows(tmp_path / "d.jsonl", rows), tok, max_length=512, max_prompt_length=256)
    for ex, row in zip(ds, rows):
        for ids, key in ((ex.chosen_ids, "chosen"), (ex.rejected_ids, "rejected")):
            if name == "chat_template":
                want = tok.apply_chat_template(row[key], tokenize=True, return_dict=True)["input_ids"]
            else:
                want = tok(row[key])["input_ids"]
            assert ex.prompt_ids + ids == want
        bos = tok.bos_token_id
        assert (ex.prompt_ids[:1] == [bos]) == (bos is not None) and ex.prompt_ids[1:2] != [bos]
        assert ex.end_labels == (tok.eos_token_id, tok.eos_token_id)


def test_reward_text_joins_plain_texts_with_one_space():
    assert reward_text("w01 w02", "w03") == "w01 w02 w03"
    assert reward_text("Q:\n", "A") == "Q:\nA" and reward_text("\n\nAssistant:", " Hi") == "\n\nAssistant: Hi"
    assert reward_text("", "w03") == "w03" and reward_text("<|a|>", "x", conversational=True) == "<|a|>x"
    tok = SyntheticTask().tokenizer()
    assert tok.convert_ids_to_tokens(encode_reward_input(tok, "w01 w02", "w03")) == ["[BOS]", "w01", "w02", "w03"]


@pytest.mark.parametrize("name", ["llama_bos", "gpt2_nospecial"])
def test_empty_prompt_starts_with_bos_and_scores_every_response_token(tmp_path, name):
    tok = TOKENIZERS[name]()
    rows = [{"prompt": "", "chosen": "The cat sat on the mat.", "rejected": "Why is the sky blue?"}]
    ex = load_preferences(write_rows(tmp_path / "e.jsonl", rows), tok, max_length=64, max_prompt_length=16)[0]
    resp = tok(rows[0]["chosen"])["input_ids"]
    if tok.bos_token_id is None:  # nothing can predict the first token of a sequence without BOS
        assert ex.prompt_ids == [] and ex.chosen_ids == resp
        return
    assert ex.prompt_ids == [tok.bos_token_id] and ex.prompt_ids + ex.chosen_ids == resp
    b = collate_pairs([ex], pad_token_id=tok.pad_token_id)
    n = len(resp)
    # every response token is a target (the first one predicted from BOS), then EOS
    assert b.labels[0, : n - 1].tolist() == resp[1:] and b.labels[0, n - 1].item() == tok.eos_token_id


def test_left_truncation_keeps_bos_and_template_specials(tmp_path):
    assert truncate([1, 5, 6, 7, 8, 9], [20, 21], max_length=8, max_prompt_length=4, keep=1) == ([1, 7, 8, 9], [20, 21])
    assert truncate([1, 2, 6, 7, 8, 9], [20], max_length=8, max_prompt_length=4, keep=2) == ([1, 2, 8, 9], [20])
    assert truncate([1, 2, 3, 7, 8, 9], [20], max_length=8, max_prompt_length=4, keep=3)[0] == [1, 2, 8, 9]
    tok = TOKENIZERS["chat_template"]()
    rows = [hh_to_messages(r) for r in hh_rows(7, seed=1, long_every=7)]
    ds = load_preferences(write_rows(tmp_path / "c.jsonl", rows), tok, max_length=96, max_prompt_length=48)
    long = ds[6]
    assert tok.convert_ids_to_tokens(long.prompt_ids[:2]) == ["<s>", "<|user|>"] and len(long.prompt_ids) == 48
    assert ds.report.truncated_prompts == 1 and "truncated 1 prompts" in ds.report.summary()


def test_cli_flags_take_dashes_and_underscores(monkeypatch, capsys):
    for f in TrainConfig.__dataclass_fields__.values():
        value = "false" if f.type in (bool, "bool") else "1"
        a, _ = parse_overrides([f"--{f.name}", value])
        b, _ = parse_overrides([f"--{f.name.replace('_', '-')}", value])
        assert a == b == {f.name: value}, f.name
    assert parse_overrides(["--no-progress", "--no_plots"])[0] == {"progress": False, "plots": False}
    seen = []
    monkeypatch.setattr(
        cli, "score_pairs", lambda *a, **kw: seen.append(kw) or {"accuracy": 1, "n_pairs": 0, "report": ""}
    )
    cli.score_main(
        ["m", "d", "--max_length", "64", "--max-prompt-length", "32", "--batch_size", "3", "--skip_bad_rows"]
    )
    cli.score_main(
        ["m", "d", "--max-length", "64", "--max_prompt_length", "32", "--batch-size", "3", "--skip-bad-rows"]
    )
    assert seen[0] == seen[1] and seen[0]["max_length"] == 64 and seen[0]["max_prompt_length"] == 32
    assert seen[0]["batch_size"] == 3 and seen[0]["skip_bad_rows"] is True


def test_eval_metrics_printed_and_last_window_throughput(tmp_path, capsys):
    paths = write_task(tmp_path / "data", n_train=48, n_test=16, n_shift=4)
    sleep, batch = 0.3, 8
    cfg = TrainConfig(
        run_dir=str(tmp_path / "run"),
        train_data=str(paths["train"]),
        eval_data=str(paths["test"]),
        tokenizer="synthetic",
        model_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        max_length=32,
        max_prompt_length=8,
        batch_size=batch,
        micro_batch_size=batch,
        max_steps=3,
        log_every=2,
        eval_every=2,
        debug_step_sleep=sleep,
        reference="none",
        progress=False,
        tensorboard=False,
        plots=False,
        device="cpu",
        dtype="fp32",
        num_threads=1,
    )
    train(cfg)
    out = capsys.readouterr().out
    assert "[haf-train] step 2 eval: reward_accuracy" in out and "[haf-train] step 3 final: reward_accuracy" in out
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_recs = {r["step"]: r for r in recs if r["split"] == "train"}
    assert sorted(train_recs) == [2, 3]
    # every step sleeps `sleep` s: a window of k steps cannot exceed batch / sleep pairs/s (the last window has
    # 1 step, not log_every = 2; counting 2 would report about twice the real rate)
    tokens_per_step = 2 * batch * 32  # at most 2B sequences of max_length tokens
    for step, rec in train_recs.items():
        assert 0 < rec["pairs_per_s"] <= batch / sleep, (step, rec["pairs_per_s"])
        assert 0 < rec["tokens_per_s"] <= tokens_per_step / sleep, (step, rec["tokens_per_s"])
