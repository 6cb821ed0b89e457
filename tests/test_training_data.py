"""training.data: formats, bad rows (file + row in the error), truncation and label masking; synthetic task."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from training.data import BadRowError, collate_pairs, load_preferences, split_shared_prefix, truncate
from training.synthetic import SyntheticTask, build_tokenizer, calibrate_temperature

WORDS = [f"w{i:02d}" for i in range(48)] + ["Human:", "Assistant:"]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(WORDS)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


EXPLICIT = [
    {"prompt": "w01 w02", "chosen": "w03 w04", "rejected": "w05", "margin": 0.5, "subset": "a"},
    {"prompt": "w06", "chosen": "w07", "rejected": "w08 w09 w10", "weight": 2.0, "subset": "b"},
]


@pytest.mark.parametrize("suffix", ["jsonl", "json", "parquet", "csv"])
def test_explicit_prompt_file_formats(tmp_path, tok, suffix):
    path = tmp_path / f"d.{suffix}"
    if suffix == "jsonl":
        write_jsonl(path, EXPLICIT)
    elif suffix == "json":
        path.write_text(json.dumps(EXPLICIT))
    else:
        df = pd.DataFrame([{**r, "margin": r.get("margin", 0.0), "weight": r.get("weight", 1.0)} for r in EXPLICIT])
        df.to_parquet(path) if suffix == "parquet" else df.to_csv(path, index=False)
    ds = load_preferences(path, tok, max_length=16, max_prompt_length=4)
    assert len(ds) == 2
    ex = ds[0]
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert ex.prompt_ids == [bos] + tok.convert_tokens_to_ids(["w01", "w02"])
    # the contract ids of "w01 w02 w03 w04" (one text); EOS is a policy target after the last token, not an input
    assert ex.chosen_ids == tok.convert_tokens_to_ids(["w03", "w04"])
    assert ex.rejected_ids == tok.convert_tokens_to_ids(["w05"])
    assert ex.end_labels == (eos, eos) and ex.source_row == 1
    assert ex.subset == "a" and ex.columns["margin"] == 0.5
    assert ds[1].columns["weight"] == 2.0


def test_load_from_disk_folder(tmp_path, tok):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(EXPLICIT).save_to_disk(str(tmp_path / "ds"))
    ds = load_preferences(tmp_path / "ds", tok, max_length=16, max_prompt_length=4)
    assert len(ds) == 2 and ds[1].subset == "b"


def test_implicit_prompt_hh_style(tmp_path, tok):
    row = {"chosen": "\n\nHuman: w01 w02\n\nAssistant: w03 w04", "rejected": "\n\nHuman: w01 w02\n\nAssistant: w03 w05"}
    p, c, r = split_shared_prefix(row["chosen"], row["rejected"])
    assert p == "\n\nHuman: w01 w02\n\nAssistant:" and c == " w03 w04" and r == " w03 w05"
    p, c, r = split_shared_prefix("w01 w02 w03", "w01 w02 w04 w05")
    assert (p, c, r) == ("w01 w02", " w03", " w04 w05")
    ds = load_preferences(write_jsonl(tmp_path / "hh.jsonl", [row]), tok, max_length=16, max_prompt_length=8)
    assert tok.convert_ids_to_tokens(ds[0].prompt_ids) == ["[BOS]", "Human:", "w01", "w02", "Assistant:"]
    assert tok.convert_ids_to_tokens(ds[0].chosen_ids) == ["w03", "w04"]
    assert ds[0].end_labels == (tok.eos_token_id, tok.eos_token_id)


def test_conversational_chat_template(tmp_path, tok):
    rows = [
        {
            "chosen": [{"role": "user", "content": "w01"}, {"role": "assistant", "content": "w02 w03"}],
            "rejected": [{"role": "user", "content": "w01"}, {"role": "assistant", "content": "w04"}],
        },
        {
            "prompt": [{"role": "user", "content": "w05"}],
            "chosen": [{"role": "assistant", "content": "w06"}],
            "rejected": [{"role": "assistant", "content": "w07"}],
        },
    ]
    ds = load_preferences(write_jsonl(tmp_path / "c.jsonl", rows), tok, max_length=16, max_prompt_length=8)
    assert tok.convert_ids_to_tokens(ds[0].prompt_ids) == ["[BOS]", "<|user|>", "w01", "<|assistant|>"]
    assert tok.convert_ids_to_tokens(ds[0].chosen_ids) == ["w02", "w03"]
    assert tok.convert_ids_to_tokens(ds[1].rejected_ids) == ["w07"]


@pytest.mark.parametrize(
    "bad, reason",
    [
        ({"prompt": "w01", "chosen": "w02"}, "missing field 'rejected'"),
        ({"prompt": "w01", "chosen": "w02", "rejected": "  "}, "empty response"),
        ({"prompt": "w01", "chosen": "w02", "rejected": "w02"}, "chosen == rejected"),
        ({"prompt": "w01", "chosen": 3, "rejected": "w02"}, "must be a string"),
        ("RAW:{not json", "undecodable"),
        ("RAW:\xff\xfe", "undecodable"),
    ],
)
def test_bad_rows_name_file_and_row(tmp_path, tok, bad, reason):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(EXPLICIT[0]).encode(), json.dumps(EXPLICIT[1]).encode()]
    lines.insert(1, bad[4:].encode("latin-1") if isinstance(bad, str) else json.dumps(bad).encode())
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(BadRowError) as err:
        load_preferences(path, tok, max_length=16, max_prompt_length=4)
    msg = str(err.value)
    assert str(path) in msg and "row 2" in msg and reason in msg, msg
    ds = load_preferences(path, tok, max_length=16, max_prompt_length=4, skip_bad_rows=True)
    assert len(ds) == 2 and ds.report.n_bad == 1 and ds.report.n_rows == 3
    assert "row 2" in ds.report.examples[0] and "1 bad rows skipped" in ds.report.summary()


def test_bad_row_csv_row_number(tmp_path, tok):
    path = tmp_path / "bad.csv"
    pd.DataFrame(
        [
            {"prompt": "w01", "chosen": "w02", "rejected": "w03"},
            {"prompt": "w01", "chosen": "w02", "rejected": "w03"},
            {"prompt": "w01", "chosen": "w04", "rejected": "w04"},
        ]
    ).to_csv(path, index=False)
    with pytest.raises(BadRowError, match=r"bad\.csv: row 3: chosen == rejected"):
        load_preferences(path, tok, max_length=16, max_prompt_length=4)


def test_undecodable_csv_row(tmp_path, tok):
    path = tmp_path / "bad.csv"
    path.write_bytes(b"prompt,chosen,rejected\nw01,w02,w03\nw01,w02 \xff\xfe,w03\n")
    with pytest.raises(BadRowError, match=r"bad\.csv: row 2: undecodable text in 'chosen'"):
        load_preferences(path, tok, max_length=16, max_prompt_length=4)
    assert len(load_preferences(path, tok, max_length=16, max_prompt_length=4, skip_bad_rows=True)) == 1


def test_truncation_keeps_prompt_end_and_response_start(tok):
    p, r = truncate([1, 2, 3, 4, 5, 6], [10, 11, 12, 13, 14, 15], max_length=8, max_prompt_length=4)
    assert p == [3, 4, 5, 6] and r == [10, 11, 12, 13]
    p, r = truncate([1, 2], [10, 11, 12, 13, 14, 15, 16, 17], max_length=8, max_prompt_length=4)
    assert p == [1, 2] and r == [10, 11, 12, 13, 14, 15]
    with pytest.raises(ValueError):
        truncate([1], [2], max_length=4, max_prompt_length=4)


def test_labels_mask_prompt_and_padding(tmp_path, tok):
    rows = [{"prompt": "w01 w02 w03 w04 w05", "chosen": "w10 w11 w12 w13 w14 w15", "rejected": "w20"}]
    ds = load_preferences(write_jsonl(tmp_path / "t.jsonl", rows), tok, max_length=8, max_prompt_length=3)
    ex = ds[0]
    # left truncation keeps BOS; the chosen response is cut (no EOS target), the rejected one ends with EOS
    assert tok.convert_ids_to_tokens(ex.prompt_ids) == ["[BOS]", "w04", "w05"]
    assert tok.convert_ids_to_tokens(ex.chosen_ids) == ["w10", "w11", "w12", "w13", "w14"]
    assert ex.end_labels == (None, tok.eos_token_id)
    assert ds.report.truncated_prompts == 1 and ds.report.truncated_responses == 1
    assert "truncated 1 prompts" in ds.report.summary() and "1/2 responses" in ds.report.summary()
    b = collate_pairs([ex], pad_token_id=tok.pad_token_id)
    assert b.input_ids.shape == (2, 8)
    ids, lab, mask = b.input_ids, b.labels, b.attention_mask
    # chosen: hidden at the last prompt position predicts the first response token, ..., last position ignored
    assert lab[0].tolist() == [-100, -100] + ids[0, 3:].tolist() + [-100]
    # rejected: prompt(3) + w20, then padding; the hidden state of w20 predicts EOS (a label, not an input)
    assert mask[1].tolist() == [1] * 4 + [0] * 4
    assert lab[1].tolist() == [-100, -100, ids[1, 3].item(), tok.eos_token_id] + [-100] * 4
    assert tok.eos_token_id not in ids.tolist()[1] and ids[1, 4].item() == tok.pad_token_id
    for row in range(2):  # every other label is the next input token
        valid = lab[row, :-1] != -100
        valid[int(mask[row].sum()) - 1 :] = False
        assert (lab[row, :-1][valid] == ids[row, 1:][valid]).all()


def test_source_rows_survive_skipped_rows_and_the_split(tmp_path, tok):
    from training.config import TrainConfig
    from training.trainer import load_data

    rows = [{"prompt": f"w{i:02d}", "chosen": "w20 w21", "rejected": "w22"} for i in range(12)]
    rows[3] = {"prompt": "w03", "chosen": "w20", "rejected": "w20"}  # file row 4: chosen == rejected
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    ds = load_preferences(path, tok, max_length=16, max_prompt_length=4, skip_bad_rows=True)
    assert [ex.source_row for ex in ds] == [1, 2, 3] + list(range(5, 13))
    assert [ex.index for ex in ds] == list(range(11))
    cfg = TrainConfig(train_data=str(path), skip_bad_rows=True, eval_fraction=0.3, max_length=16, max_prompt_length=4)
    train, held = load_data(cfg, tok)
    for split in (train, held):
        assert [ex.index for ex in split] == list(range(len(split)))
        for ex in split:  # the prompt word w{i} sits on file row i + 1
            assert tok.convert_ids_to_tokens(ex.prompt_ids)[1] == f"w{ex.source_row - 1:02d}"
    assert sorted(ex.source_row for split in (train, held) for ex in split) == [1, 2, 3] + list(range(5, 13))
    assert collate_pairs(list(held), tok.pad_token_id).source_rows == [ex.source_row for ex in held]


def test_synthetic_task_deterministic_and_noise_calibrated():
    task = SyntheticTask(seed=0)
    a = task.pairs(400, seed=1, noise_rate=0.25)
    assert a == SyntheticTask(seed=0).pairs(400, seed=1, noise_rate=0.25)
    assert a != task.pairs(400, seed=2, noise_rate=0.25)
    flip = sum(r["flipped"] for r in a) / len(a)
    assert 0.19 < flip < 0.31
    for r in a:
        assert (r["true_reward_chosen"] > r["true_reward_rejected"]) != r["flipped"]
        assert abs(task.true_reward(r["chosen"]) - r["true_reward_chosen"]) < 1e-9
    clean = task.pairs(200, seed=1)
    assert not any(r["flipped"] for r in clean)
    # ambiguous pairs flip more often than clear ones
    amb = [r["flipped"] for r in a if r["subset"] == "ambiguous"]
    clear = [r["flipped"] for r in a if r["subset"] == "clear"]
    assert sum(amb) / len(amb) > sum(clear) / len(clear)
    shift = task.pairs(100, seed=3, shift=True)
    assert min(len(r["chosen"].split()) for r in shift) > max(len(r["chosen"].split()) for r in clean)
    assert all(r["subset"].startswith("shift/") for r in shift)
    pool = task.unlabelled(5, k=3, seed=4)
    assert len(pool) == 5 and all(len(r["responses"]) == 3 for r in pool)
    margins = [abs(r["true_reward_chosen"] - r["true_reward_rejected"]) for r in clean]
    tau = calibrate_temperature(margins, 0.1)
    assert tau > 0


def test_unshifted_labels_are_refused():
    """Hugging Face-style labels (labels == input_ids, shifted inside the model) are refused by name; the
    shifted labels of the same batch pass."""
    from training.data import PairBatch, check_shifted_labels

    ids = torch.tensor([[5, 6, 7, 8, 0], [5, 6, 9, 0, 0]])
    unshifted = ids.clone()
    unshifted[:, :2] = -100  # prompt masked, as HF users do
    unshifted[ids == 0] = -100
    with pytest.raises(ValueError, match=r"labels look unshifted: labels\[t\] == input_ids\[t\] at all 3 scored"):
        check_shifted_labels(ids, unshifted)
    mask = (ids != 0).long()
    with pytest.raises(ValueError, match="labels look unshifted"):
        PairBatch(ids, mask, unshifted, torch.arange(1), {}, [None])
    shifted = torch.cat([unshifted[:, 1:], torch.full_like(unshifted[:, :1], -100)], dim=1)
    check_shifted_labels(ids, shifted)
    PairBatch(ids, mask, shifted, torch.arange(1), {}, [None])
    with pytest.raises(ValueError, match=r"labels must have the shape of input_ids \[2, 5\]"):
        check_shifted_labels(ids, shifted[:, :4])
