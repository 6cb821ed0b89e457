"""Preference data: loading (files, ``load_from_disk`` folders, hub names), formats, tokenisation, batching.

Formats (detected per row):

- explicit prompt: ``prompt``, ``chosen``, ``rejected`` strings;
- implicit prompt: full ``chosen`` / ``rejected`` transcripts (Anthropic HH ``\\n\\nHuman: … \\n\\nAssistant: …``);
  the shared prefix (up to the last shared ``\\n\\nAssistant:``, else a word boundary) becomes the prompt;
- conversational: ``chosen`` / ``rejected`` (and optionally ``prompt``) as lists of ``{role, content}``
  messages, rendered with the tokenizer's chat template.

Optional per-pair columns: ``margin``, ``strength``, ``weight`` (numbers) and ``subset`` (string); any other
numeric / boolean scalar column (e.g. ``true_reward_chosen``, ``flipped``, ``strength_std``) is carried along
in ``PairExample.columns`` for the loss, evaluation and RM methods.

A bad row (missing field, empty response, chosen == rejected, undecodable) raises ``BadRowError`` naming the
file and the 1-based row number, or, with ``skip_bad_rows``, is counted in ``LoadReport`` (never silently
dropped).

Sequences are ``prompt_ids + response_ids (+ EOS)``; truncation keeps the end of the prompt and the start of
the response. ``labels[t] = input_ids[t + 1]`` where ``t + 1`` is a response token, else ``ignore_index``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

RESERVED = {"prompt", "chosen", "rejected", "subset"}
HH_ASSISTANT = "\n\nAssistant:"


class BadRowError(ValueError):
    """A data row that cannot be used; the message names the source and the 1-based row number."""


@dataclass
class LoadReport:
    """What loading did: rows read, rows kept, bad rows by reason (and the first few messages)."""

    source: str
    n_rows: int = 0
    n_kept: int = 0
    bad: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    @property
    def n_bad(self) -> int:
        return sum(self.bad.values())

    def summary(self) -> str:
        s = f"{self.source}: {self.n_kept}/{self.n_rows} rows kept"
        if self.n_bad:
            s += f", {self.n_bad} bad rows skipped ({dict(self.bad)}); e.g. {self.examples[0]}"
        return s


@dataclass
class PairExample:
    """One tokenised pair. ``index`` is the row's position among the kept rows of its dataset."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    index: int
    subset: str | None = None
    columns: dict[str, float] = field(default_factory=dict)


@dataclass
class PairBatch:
    """``B`` pairs concatenated as ``[2B, T]``: rows ``0..B-1`` chosen, ``B..2B-1`` rejected.

    ``columns`` maps per-pair column names to ``[B]`` float tensors; ``index [B]`` are dataset indices.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    columns: dict[str, torch.Tensor]
    subsets: list[str | None]

    @property
    def n_pairs(self) -> int:
        return self.index.shape[0]

    def to(self, device: torch.device | str) -> PairBatch:
        return PairBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.labels.to(device),
            self.index.to(device),
            {k: v.to(device) for k, v in self.columns.items()},
            self.subsets,
        )


# ---------------------------------------------------------------------------------------------- reading
def read_rows(source: str | os.PathLike, split: str = "train") -> list[tuple[int, Any]]:
    """``(row_number, row)`` of a ``.jsonl/.json/.parquet/.csv`` file, a ``load_from_disk`` folder or a hub name.

    Undecodable JSON lines are returned as ``BadRowError`` instances (raised or counted later).
    """
    path = Path(source)
    if path.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{path}: no split {split!r} (has {list(ds)})")
            ds = ds[split]
        return [(i + 1, row) for i, row in enumerate(ds)]
    suffix = path.suffix.lower()
    if path.exists() and suffix == ".jsonl":
        rows: list[tuple[int, Any]] = []
        with open(path, "rb") as f:
            for i, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    rows.append((i, json.loads(raw.decode("utf-8"))))
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    rows.append((i, BadRowError(f"{path}: row {i}: undecodable ({type(exc).__name__}: {exc})")))
        return rows
    if path.exists() and suffix == ".json":
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, dict):
            data = data.get(split, data.get("data", data))
        if isinstance(data, dict):  # column-oriented
            keys = list(data)
            data = [dict(zip(keys, vals)) for vals in zip(*(data[k] for k in keys))]
        return [(i + 1, row) for i, row in enumerate(data)]
    if path.exists() and suffix == ".parquet":
        import pandas as pd

        return [(i + 1, row) for i, row in enumerate(pd.read_parquet(path).to_dict(orient="records"))]
    if path.exists() and suffix == ".csv":
        import csv
        import io

        # invalid UTF-8 survives as lone surrogates and is reported per row by normalise_row
        text = path.read_bytes().decode("utf-8", "surrogateescape")
        reader = csv.DictReader(io.StringIO(text, newline=""))
        return [
            (i + 1, {k: v if k in RESERVED else _csv_value(v) for k, v in row.items()}) for i, row in enumerate(reader)
        ]
    if path.exists() or suffix in (".jsonl", ".json", ".parquet", ".csv"):
        raise FileNotFoundError(f"{path}: not found or unsupported format (use .jsonl/.json/.parquet/.csv or a folder)")
    import datasets  # a hub name (needs network)

    ds = datasets.load_dataset(str(source), split=split)
    return [(i + 1, row) for i, row in enumerate(ds)]


def _csv_value(v: str | None) -> Any:
    """CSV cell → int / float / bool where it parses as one (numeric per-pair columns), else the string."""
    if v is None:
        return None
    if v in ("True", "true", "False", "false"):
        return v.lower() == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


# ---------------------------------------------------------------------------------------------- formats
def _is_messages(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in x)


def split_shared_prefix(chosen: str, rejected: str) -> tuple[str, str, str]:
    """``(prompt, chosen_response, rejected_response)`` of two full transcripts with a shared prefix.

    The prompt ends after the last ``"\\n\\nAssistant:"`` inside the common prefix (HH style); otherwise at
    the last whitespace of the common prefix (so no word is split).
    """
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    common = chosen[:n]
    cut = common.rfind(HH_ASSISTANT)
    if cut >= 0:
        cut += len(HH_ASSISTANT)
    else:
        ws = max(common.rfind(" "), common.rfind("\n"))
        cut = ws if ws >= 0 and n < min(len(chosen), len(rejected)) else n
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _render_messages(tokenizer: Any, prompt: Any, chosen: Any, rejected: Any) -> tuple[str, str, str]:
    """Render conversational rows with the chat template; the prompt is the shared message prefix."""
    if prompt is None:
        k = 0
        while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
            k += 1
        prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
    elif isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not prompt:
        raise ValueError("conversation has no prompt messages")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("conversational data needs a tokenizer with a chat template")
    p_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    out = []
    for resp in (chosen, rejected):
        if not resp:
            raise ValueError("empty response")
        full = tokenizer.apply_chat_template(list(prompt) + list(resp), tokenize=False)
        if not full.startswith(p_text):  # templates that differ with/without a generation prompt
            p0 = tokenizer.apply_chat_template(prompt, tokenize=False)
            if not full.startswith(p0):
                raise ValueError("chat template does not render the prompt as a prefix of the conversation")
            out.append(full[len(p0) :])
        else:
            out.append(full[len(p_text) :])
    return p_text, out[0], out[1]


def normalise_row(row: Any, tokenizer: Any) -> tuple[str, str, str, str | None, dict[str, float]]:
    """``(prompt, chosen, rejected, subset, numeric_columns)`` of one raw row; ``ValueError`` if unusable."""
    if not isinstance(row, dict):
        raise ValueError(f"row is a {type(row).__name__}, not a mapping")
    for key in ("chosen", "rejected"):
        if key not in row or row[key] is None:
            raise ValueError(f"missing field {key!r}")
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    if _is_messages(chosen) and _is_messages(rejected):
        if prompt is not None and not (isinstance(prompt, str) or _is_messages(prompt)):
            raise ValueError("prompt must be a string or a list of messages")
        prompt, chosen, rejected = _render_messages(tokenizer, prompt, chosen, rejected)
    else:
        for key, val in (("chosen", chosen), ("rejected", rejected)):
            if not isinstance(val, str):
                raise ValueError(f"field {key!r} must be a string or a list of {{role, content}} messages")
        if prompt is None:
            if chosen == rejected:
                raise ValueError("chosen == rejected")
            prompt, chosen, rejected = split_shared_prefix(chosen, rejected)
        elif not isinstance(prompt, str):
            raise ValueError("field 'prompt' must be a string")
    for key, val in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        try:
            val.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"undecodable text in {key!r} ({exc.reason})") from exc
    if not chosen.strip() or not rejected.strip():
        raise ValueError("empty response")
    if chosen == rejected:
        raise ValueError("chosen == rejected")
    subset = row.get("subset")
    columns: dict[str, float] = {}
    for key, val in row.items():
        if key in RESERVED or isinstance(val, (str, list, dict)) or val is None:
            continue
        try:
            f = float(val)
        except (TypeError, ValueError):
            continue
        if key in ("margin", "strength", "weight") and not math.isfinite(f):
            raise ValueError(f"column {key!r} is not finite: {val!r}")
        columns[key] = f
    if "weight" in columns and columns["weight"] < 0:
        raise ValueError(f"column 'weight' must be >= 0, got {columns['weight']}")
    return prompt, chosen, rejected, None if subset is None else str(subset), columns


# ---------------------------------------------------------------------------------------------- tokenising
def load_tokenizer_dir(name_or_path: str | os.PathLike) -> Any:
    """``AutoTokenizer.from_pretrained``, except that a saved generic fast tokenizer (``tokenizer_class``
    ``TokenizersBackend`` / ``PreTrainedTokenizerFast``, e.g. the synthetic word-level one) is loaded as such:
    transformers 5 otherwise rebuilds it as the model type's tokenizer class when a ``config.json`` sits beside it.
    """
    import transformers

    cfg_path = Path(name_or_path) / "tokenizer_config.json"
    if cfg_path.exists():
        cls = json.loads(cfg_path.read_text(encoding="utf-8")).get("tokenizer_class")
        if cls in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return transformers.PreTrainedTokenizerFast.from_pretrained(str(name_or_path))
    return transformers.AutoTokenizer.from_pretrained(str(name_or_path))


def _eos_to_append(tokenizer: Any) -> int | None:
    """EOS id appended to responses, unless it equals the pad id (then the last real token would look padded)."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    return eos if eos is not None and eos != pad else None


def tokenize_pair(tokenizer: Any, prompt: str, chosen: str, rejected: str) -> tuple[list[int], list[int], list[int]]:
    """Token ids of the prompt (with the tokenizer's special tokens) and of both responses (+ EOS)."""
    p = list(tokenizer(prompt, add_special_tokens=True)["input_ids"]) if prompt else []
    eos = _eos_to_append(tokenizer)
    out = []
    for resp in (chosen, rejected):
        ids = list(tokenizer(resp, add_special_tokens=False)["input_ids"])
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        out.append(ids)
    return p, out[0], out[1]


def truncate(prompt: list[int], response: list[int], max_length: int, max_prompt_length: int):
    """Keep the end of the prompt (≤ ``max_prompt_length``) and the start of the response (total ≤ ``max_length``)."""
    if max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must be < max_length ({max_length})")
    prompt = prompt[-max_prompt_length:] if len(prompt) > max_prompt_length else prompt
    return prompt, response[: max_length - len(prompt)]


class PreferenceDataset(torch.utils.data.Dataset):
    """Tokenised pairs of one source; ``report`` says how many rows were read, kept and skipped."""

    def __init__(self, examples: list[PairExample], report: LoadReport) -> None:
        self.examples = examples
        self.report = report

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> PairExample:
        return self.examples[i]

    def fingerprint(self) -> str:
        """Hash of the tokenised content and columns (keys reference-log-prob caches)."""
        h = hashlib.sha256()
        for ex in self.examples:
            h.update(json.dumps([ex.prompt_ids, ex.chosen_ids, ex.rejected_ids]).encode())
        return h.hexdigest()[:16]

    @property
    def column_names(self) -> list[str]:
        names: set[str] = set()
        for ex in self.examples:
            names.update(ex.columns)
        return sorted(names)


def load_preferences(
    source: str | os.PathLike,
    tokenizer: Any,
    *,
    max_length: int = 512,
    max_prompt_length: int = 128,
    split: str = "train",
    skip_bad_rows: bool = False,
    limit: int | None = None,
) -> PreferenceDataset:
    """Read, normalise, tokenise and truncate a preference source (see the module docstring)."""
    report = LoadReport(str(source))
    examples: list[PairExample] = []
    for row_no, row in read_rows(source, split):
        if limit is not None and len(examples) >= limit:
            break
        report.n_rows += 1
        try:
            if isinstance(row, BadRowError):
                raise row
            try:
                prompt, chosen, rejected, subset, cols = normalise_row(row, tokenizer)
                p, c, r = tokenize_pair(tokenizer, prompt, chosen, rejected)
            except BadRowError:
                raise
            except (ValueError, TypeError, KeyError) as exc:
                raise BadRowError(f"{source}: row {row_no}: {exc}") from exc
            pc, c = truncate(p, c, max_length, max_prompt_length)
            _, r = truncate(p, r, max_length, max_prompt_length)
            if c == r:
                raise BadRowError(f"{source}: row {row_no}: chosen == rejected after tokenisation/truncation")
        except BadRowError as exc:
            if not skip_bad_rows:
                raise
            reason = str(exc).split(": ", 2)[-1].split(" (")[0]
            report.bad[reason] += 1
            if len(report.examples) < 5:
                report.examples.append(str(exc))
            continue
        examples.append(PairExample(pc, c, r, index=len(examples), subset=subset, columns=cols))
        report.n_kept += 1
    if not examples:
        raise ValueError(f"{source}: no usable rows ({report.summary()})")
    return PreferenceDataset(examples, report)


# ---------------------------------------------------------------------------------------------- batching
def collate_pairs(
    examples: list[PairExample], pad_token_id: int, ignore_index: int = -100, pad_to_multiple_of: int = 1
) -> PairBatch:
    """Right-padded ``[2B, T]`` batch: chosen rows then rejected rows; labels mask prompt and padding."""
    seqs = [ex.prompt_ids + ex.chosen_ids for ex in examples] + [ex.prompt_ids + ex.rejected_ids for ex in examples]
    n_prompt = [len(ex.prompt_ids) for ex in examples] * 2
    t = max(len(s) for s in seqs)
    t = -(-t // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(seqs), t), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    labels = torch.full((len(seqs), t), ignore_index, dtype=torch.long)
    for i, (s, np_) in enumerate(zip(seqs, n_prompt)):
        n = len(s)
        ids[i, :n] = torch.tensor(s, dtype=torch.long)
        mask[i, :n] = 1
        start = max(np_ - 1, 0)  # hidden at t predicts token t+1; first target is the first response token
        if n - 1 > start:
            labels[i, start : n - 1] = ids[i, start + 1 : n]
    names = sorted({k for ex in examples for k in ex.columns})
    columns = {
        k: torch.tensor([ex.columns.get(k, float("nan")) for ex in examples], dtype=torch.float32) for k in names
    }
    index = torch.tensor([ex.index for ex in examples], dtype=torch.long)
    return PairBatch(ids, mask, labels, index, columns, [ex.subset for ex in examples])
