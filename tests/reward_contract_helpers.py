"""Offline tokenizers and HH-style data for the reward-contract tests (no network)."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

WORDS = (
    "the a cat dog sat on mat why is sky blue because light scatters what time it now sorry I do not know "
    "please help me write poem about sea here one waves crash shore thanks you welcome how are fine good bad"
).split()

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + rng.choice(".?!")


def hh_rows(n: int, seed: int = 0, long_every: int = 0) -> list[dict]:
    """HH-style implicit-prompt rows: ``\\n\\nHuman: … \\n\\nAssistant: …`` transcripts sharing the prompt.

    Every ``long_every``-th row has a long multi-turn prompt (for truncation)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        turns = 1 + (rng.random() < 0.4)
        if long_every and i % long_every == long_every - 1:
            turns = 6
        prompt = ""
        for t in range(turns):
            prompt += f"\n\nHuman: {_sentence(rng, 3, 9)}\n\nAssistant:"
            if t < turns - 1:
                prompt += f" {_sentence(rng, 3, 9)}"
        a, b = _sentence(rng, 2, 10), _sentence(rng, 2, 10)
        while a == b:
            b = _sentence(rng, 2, 10)
        rows.append({"chosen": f"{prompt} {a}", "rejected": f"{prompt} {b}"})
    return rows


def hh_to_messages(row: dict) -> dict:
    """The same pair as conversational rows (lists of ``{role, content}``)."""

    def msgs(text: str) -> list[dict]:
        out = []
        for part in text.split("\n\nHuman: ")[1:]:
            human, _, rest = part.partition("\n\nAssistant:")
            out.append({"role": "user", "content": human})
            out.append({"role": "assistant", "content": rest.strip()})
        return out

    return {"chosen": msgs(row["chosen"]), "rejected": msgs(row["rejected"])}


def write_rows(path: Path, rows: list, bad_lines: dict[int, str] | None = None) -> Path:
    """JSON lines (gzip-compressed when ``path`` ends in ``.gz``); ``bad_lines`` maps 1-based line → raw text."""
    lines = [json.dumps(r) for r in rows]
    for line_no, raw in sorted((bad_lines or {}).items()):
        lines.insert(line_no - 1, raw)
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def _corpus() -> list[str]:
    rows = hh_rows(200, seed=123, long_every=5)
    return [r["chosen"] for r in rows] + [r["rejected"] for r in rows]


def llama_style_tokenizer(chat: bool = False):
    """SentencePiece-like (Metaspace) BPE whose default special tokens are BOS only; ``</s>`` EOS.

    Plain: a ``<pad>`` distinct from EOS (like many Llama fine-tunes). ``chat``: no pad token (the trainer
    pads with EOS), role tokens and a chat template that renders ``bos_token`` itself (like Llama 3)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"] + (["<|user|>", "<|assistant|>", "<|end|>"] if chat else ["<pad>"])
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False)
    tk.train_from_iterator(_corpus(), trainer)
    bos = tk.token_to_id("<s>")
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if not chat:
        tok.pad_token = "<pad>"
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def gpt2_style_tokenizer():
    """Byte-level BPE with no special tokens at all (no BOS, EOS, pad or unk)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tk.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk)


TOKENIZERS = {
    "llama_bos": lambda: llama_style_tokenizer(),
    "gpt2_nospecial": gpt2_style_tokenizer,
    "chat_template": lambda: llama_style_tokenizer(chat=True),
}
