"""``haf_kernels.contract``: the one definition of the reward contract that ``training.data`` and
``haf_kernels.integrations.trl`` both use (rows → texts → ids → padded batch with labels).

Offline tokenizers from ``reward_contract_helpers`` (no downloads). ``tests/test_reward_contract.py`` checks the
scorers end to end; here each step is checked on its own, against ids written out by hand or the tokenizer itself.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from reward_contract_helpers import gpt2_style_tokenizer, llama_style_tokenizer

from haf_kernels import contract as C


@pytest.fixture(scope="module")
def tok():
    return llama_style_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    return llama_style_tokenizer(chat=True)


def test_import_needs_neither_transformers_nor_training():
    code = (
        "import sys; import haf_kernels.contract; "
        "print(sorted(m for m in ('transformers', 'training', 'trl') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_three_formats_give_the_same_texts(tok, chat_tok):
    explicit = {"prompt": "\n\nHuman: why is sky blue\n\nAssistant:", "chosen": " light", "rejected": " sorry"}
    implicit = {k: explicit["prompt"] + explicit[k] for k in ("chosen", "rejected")}
    assert C.preference_texts(explicit, tok) == (*explicit.values(), False)
    assert C.preference_texts(implicit, tok) == (*explicit.values(), False)
    user = [{"role": "user", "content": "why"}]
    conv = {k: user + [{"role": "assistant", "content": v}] for k, v in (("chosen", "light"), ("rejected", "dog"))}
    p, c, r, chat = C.preference_texts(conv, chat_tok)
    assert chat and p == "<s><|user|>\nwhy<|end|>\n<|assistant|>\n"
    assert (c, r) == ("light<|end|>\n", "dog<|end|>\n")
    assert C.preference_texts({"prompt": "why", **{k: v[1:] for k, v in conv.items()}}, chat_tok) == (p, c, r, True)


@pytest.mark.parametrize(
    "row, message",
    [
        (["not", "a", "row"], "not a mapping"),
        ({"chosen": "a"}, "missing field 'rejected'"),
        ({"prompt": "x", "chosen": 3, "rejected": "b"}, "must be a string or a list"),
        ({"prompt": 3, "chosen": "a", "rejected": "b"}, "field 'prompt' must be a string"),
        ({"chosen": "w x", "rejected": "w x"}, "chosen == rejected"),
        ({"chosen": "\n\nAssistant:", "rejected": "\n\nAssistant: hi"}, "chosen is empty after splitting"),
        ({"prompt": "x", "chosen": " ", "rejected": "b"}, "empty response"),
        ({"prompt": "x", "chosen": "a\udcff", "rejected": "b"}, "undecodable"),
        ({"chosen": [], "rejected": [{"role": "user", "content": "x"}]}, "no prompt messages"),
    ],
)
def test_unusable_rows_say_why(tok, row, message):
    with pytest.raises(ValueError, match=message):
        C.preference_texts(row, tok)


def test_conversational_rows_need_a_template(tok):
    row = {"prompt": "why", "chosen": [{"role": "assistant", "content": "a"}], "rejected": []}
    with pytest.raises(ValueError, match="chat template"):
        C.preference_texts({**row, "rejected": [{"role": "assistant", "content": "b"}]}, tok)


def test_ids_are_the_tokenizer_ids_of_the_joined_text(tok):
    for prompt, resp in (("why is sky", "blue"), ("why is sky ", "blue"), ("", "the cat")):
        p, c, r = C.tokenize_pair(tok, prompt, resp, "dog")
        assert p + c == list(tok(C.reward_text(prompt, resp))["input_ids"])
        assert p + r == list(tok(C.reward_text(prompt, "dog"))["input_ids"])
        assert p[:1] == [tok.bos_token_id] and c and r
    assert C.reward_text("a", "b") == "a b" and C.reward_text("a", "b", conversational=True) == "ab"
    # a chat rendering that starts with BOS gets one BOS, not two
    text = tok.bos_token + "the cat"
    assert C.encode_for_reward(tok, text) == list(tok(text)["input_ids"])[1:]
    with pytest.raises(ValueError, match="empty response after tokenisation"):
        C.tokenize_pair(tok, "the cat", "", "dog")


def test_truncation_and_eos_targets(tok):
    prompt = " ".join(["the cat sat on the mat"] * 4)
    full = C.tokenize_preference(tok, prompt, "why is sky blue because light scatters", "sorry")
    n_p, n_c, n_r = full.full_lengths
    assert (len(full.prompt_ids), len(full.chosen_ids), len(full.rejected_ids)) == (n_p, n_c, n_r)
    assert full.end_labels == (tok.eos_token_id, tok.eos_token_id)  # nothing cut: both get EOS
    cut = C.tokenize_preference(
        tok, prompt, "why is sky blue because light scatters", "sorry", max_length=n_p + 2, max_prompt_length=n_p - 3
    )
    keep = C.leading_specials(full.prompt_ids, C.special_ids(tok))
    assert keep == 1 and cut.prompt_ids == full.prompt_ids[:1] + full.prompt_ids[-(n_p - 4) :]
    assert cut.chosen_ids == full.chosen_ids[:5] and len(cut.chosen_ids) < n_c
    assert cut.end_labels == (None, tok.eos_token_id if n_r <= 5 else None)  # a cut response gets no EOS target
    with pytest.raises(ValueError, match=r"max_prompt_length \(8\) must be < max_length \(8\)"):
        C.tokenize_preference(tok, prompt, "a", "b", max_length=8, max_prompt_length=8)
    with pytest.raises(ValueError, match="chosen == rejected after tokenisation/truncation"):
        C.tokenize_preference(tok, prompt, "the cat sat", "the cat dog", max_length=n_p + 1, max_prompt_length=n_p - 1)
    none = C.tokenize_preference(gpt2_style_tokenizer(), "why", " a", " b")
    assert none.end_labels == (None, None)  # no EOS in the tokenizer: no target


def test_pad_pairs_labels_are_next_tokens_of_the_response():
    ids, mask, labels = C.pad_pairs(
        [[1, 5], []], [[6, 7], [8]], [[9], [10, 11, 12]], [(2, None), (None, 2)], pad_token_id=0, pad_to_multiple_of=3
    )  # longest row 4 tokens → T = 6
    assert ids.tolist() == [[1, 5, 6, 7, 0, 0], [8, 0, 0, 0, 0, 0], [1, 5, 9, 0, 0, 0], [10, 11, 12, 0, 0, 0]]
    assert mask.sum(1).tolist() == [4, 1, 3, 3] and mask.dtype == ids.dtype == labels.dtype == torch.long
    x = -100
    assert labels.tolist() == [
        [x, 6, 7, 2, x, x],  # chosen 0: its EOS target at the last position
        [x, x, x, x, x, x],  # chosen 1 (no prompt): one token, no EOS target, nothing to predict
        [x, 9, x, x, x, x],  # rejected 0: no EOS target
        [11, 12, 2, x, x, x],  # rejected 1 (no prompt): from the first token on
    ]


def test_contract_record_allows_no_truncation(tok):
    rec = C.reward_contract(tok, max_length=None, max_prompt_length=None)
    assert rec["max_length"] is None and rec["contract_version"] == C.CONTRACT_VERSION
    assert rec["policy_eos_token_id"] == tok.eos_token_id and rec["pad_token_id"] == tok.pad_token_id
