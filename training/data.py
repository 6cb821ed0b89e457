"""Preference data: loading (files, ``load_from_disk`` folders, hub names), formats, tokenisation, batching.

Sources (``read_rows``): ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` files, also compressed as they ship
(``.jsonl.gz``, ``.json.gz``, ``.bz2``, ``.xz``, ``.zst`` with Python >= 3.14 or ``zstandard``), a ``load_from_disk``
folder, or a Hub dataset name. A missing local path is ``DataNotFoundError`` at once (no Hub lookup); a Hub-like
name that is neither local nor loadable says both in one message.

Formats (detected per row):

- explicit prompt: ``prompt``, ``chosen``, ``rejected`` strings;
- implicit prompt: full ``chosen`` / ``rejected`` transcripts (Anthropic HH ``\\n\\nHuman: … \\n\\nAssistant: …``);
  the shared prefix (up to the last shared ``\\n\\nAssistant:``, else a word boundary) becomes the prompt;
- conversational: ``chosen`` / ``rejected`` (and optionally ``prompt``) as lists of ``{role, content}``
  messages, rendered with the tokenizer's chat template.

Optional per-pair columns: ``margin``, ``strength``, ``weight`` (numbers) and ``subset`` (string); any other
numeric / boolean scalar column (e.g. ``true_reward_chosen``, ``flipped``, ``strength_std``) is carried along
in ``PairExample.columns`` for the loss, evaluation and RM methods.

A bad row (missing field, empty response, e.g. an implicit-prompt transcript that is the start of the other one,
chosen == rejected, undecodable, a failing chat template) raises ``BadRowError`` naming the file, the 1-based row
number (the line number for JSON lines) and the reason, or, with ``skip_bad_rows``, is counted in ``LoadReport``
(never silently dropped). The CLIs print it as one line with the ``--skip-bad-rows`` hint (``cli.run_cli``).

The reward contract (one definition, ``haf_kernels.contract``, used by the trainer, its evaluation, ``haf-score``,
the export's ``haf_reward.json`` and ``haf_kernels.integrations.trl``; its functions are re-exported here): the
reward of ``(prompt, response)`` is read at the last token of ``encode_for_reward(tokenizer, reward_text(prompt,
response))``, i.e. of ``tokenizer(prompt + response)`` with the tokenizer's default special tokens (a space joins a
plain-text prompt and response that meet without whitespace; conversational rows are the chat template's
rendering, whose own BOS is not duplicated). Prompt and responses are tokenised *together*; the prompt/response
boundary is the longest common prefix with the tokenised prompt.

Sequences are ``prompt_ids + response_ids``: exactly those contract ids. The tokenizer's EOS is a policy target
*after* the last token (a label at the last position, never an input), so the reward position is untouched.
Truncation keeps the prompt's leading special tokens (BOS, a chat template's leading special tokens) and its end
(≤ ``max_prompt_length``) and the start of the response (total ≤ ``max_length``); a truncated response gets no
EOS target. ``labels[t] = input_ids[t + 1]`` where ``t + 1`` is a response token (and ``EOS`` at the last
position of an untruncated response), else ``ignore_index``.

Packing (``collate_packed``, ``pack: true``): the same batch plus a ``PackedLayout``, the sequences several to a row
with their own positions; the model body runs on those rows and gathers its hidden states back into the batch's
``[2B, T]`` layout, so labels, rewards (last token of each sequence) and the loss are those of ``collate_pairs``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from haf_kernels.contract import (  # the reward contract's one definition; re-exported as training.data's names
    CONTRACT_VERSION,  # noqa: F401
    HH_ASSISTANT,  # noqa: F401
    check_lengths,
    encode_for_reward,  # noqa: F401
    is_messages,
    leading_specials,
    pad_pairs,
    policy_eos,  # noqa: F401
    preference_texts,
    reward_contract,  # noqa: F401
    reward_text,  # noqa: F401
    special_ids,
    split_shared_prefix,  # noqa: F401
    tokenize_pair,
    tokenize_preference,
    truncate,
)

from .errors import BadRowError, DataFormatError, DataNotFoundError

RESERVED = {"prompt", "chosen", "rejected", "subset"}
DEFAULT_MAX_LENGTH = 1024  # fits multi-turn conversational data (HH-RLHF) with room for the response
DEFAULT_MAX_PROMPT_LENGTH = 768


@dataclass
class LoadReport:
    """What loading did: rows read, rows kept, bad rows by reason (and the first few messages)."""

    source: str
    n_rows: int = 0
    n_kept: int = 0
    bad: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    truncated_prompts: int = 0  # kept pairs whose prompt was cut to max_prompt_length (from the left)
    truncated_responses: int = 0  # kept responses (chosen and rejected counted apart) cut to fit max_length

    @property
    def n_bad(self) -> int:
        return sum(self.bad.values())

    def summary(self) -> str:
        s = f"{self.source}: {self.n_kept}/{self.n_rows} rows kept"
        if self.truncated_prompts or self.truncated_responses:
            s += (
                f", truncated {self.truncated_prompts} prompts (max_prompt_length) and "
                f"{self.truncated_responses}/{2 * self.n_kept} responses (max_length)"
            )
        if self.n_bad:
            s += f", {self.n_bad} bad rows skipped ({dict(self.bad)}); e.g. {self.examples[0]}"
        return s


@dataclass
class PairExample:
    """One tokenised pair. ``index`` is the row's position among the kept rows of its dataset; ``source_row`` its
    1-based row number in the source file (as in bad-row messages), kept through filtering and splits.

    ``prompt_ids + chosen_ids`` are the contract ids of ``prompt + chosen`` (reward at the last one);
    ``end_labels`` the policy targets after the last chosen / rejected token (EOS, or None: none, or truncated).
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    index: int
    subset: str | None = None
    columns: dict[str, float] = field(default_factory=dict)
    source_row: int = 0
    end_labels: tuple[int | None, int | None] = (None, None)


@dataclass
class PairBatch:
    """``B`` pairs concatenated as ``[2B, T]``: rows ``0..B-1`` chosen, ``B..2B-1`` rejected.

    ``columns`` maps per-pair column names to ``[B]`` float tensors; ``index [B]`` are dataset indices,
    ``source_rows`` the pairs' 1-based row numbers in their source file. The reward of a row is read at its last
    non-padding token (the contract's last token; an EOS policy target lives only in ``labels``).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    columns: dict[str, torch.Tensor]
    subsets: list[str | None]
    source_rows: list[int] = field(default_factory=list)
    packing: PackedLayout | None = None  # set by ``collate_packed``: the rows the model body runs on

    def __post_init__(self) -> None:
        if self.labels.device.type == "cpu":  # where batches are built (collate); no device sync
            check_shifted_labels(self.input_ids, self.labels)

    @property
    def n_pairs(self) -> int:
        return self.index.shape[0]

    def to(self, device: torch.device | str) -> PairBatch:
        if self.input_ids.device == torch.device(device):
            return self  # already there: no copy, and no second label check
        return PairBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.labels.to(device),
            self.index.to(device),
            {k: v.to(device) for k, v in self.columns.items()},
            self.subsets,
            self.source_rows,
            None if self.packing is None else self.packing.to(device),
        )


@dataclass
class PackedLayout:
    """Where the ``S = 2B`` sequences of a ``PairBatch`` sit when packed several to a row of ``R × L`` tokens.

    ``input_ids [R, L]`` the packed tokens (``pad_token_id`` after the last sequence of a row); ``position_ids
    [R, L]`` each sequence's own positions ``0..n-1`` (0 on padding); ``segment_ids [R, L]`` the sequence index
    ``0..S-1`` of each token (``-1`` on padding): a token attends only to earlier tokens of its own segment.
    ``row / start / length [S]`` each sequence's place; ``gather_index [S, T]`` the flat ``R·L`` index of
    position ``t`` of sequence ``s`` in the unpacked ``[S, T]`` layout (its last token for ``t >= length``, where
    the labels are ``ignore_index``); ``last_index [S]`` the flat index of each sequence's last token (the reward).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    row: torch.Tensor
    start: torch.Tensor
    length: torch.Tensor
    gather_index: torch.Tensor
    last_index: torch.Tensor

    @property
    def n_tokens(self) -> int:
        """Real (non-padding) tokens; a host value (call on the CPU layout)."""
        return int(self.length.sum())

    def padding_fraction(self) -> float:
        """Share of the ``R × L`` packed positions that are padding."""
        return 1.0 - self.n_tokens / max(1, self.input_ids.numel())

    def to(self, device: torch.device | str) -> PackedLayout:
        return PackedLayout(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing bin packing: rows of sequence indices whose lengths sum to at most ``capacity``.

    Deterministic (ties keep index order); every index appears once. ``ValueError`` when a length exceeds
    ``capacity`` or is not positive."""
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    bad = [(i, n) for i, n in enumerate(lengths) if n < 1 or n > capacity]
    if bad:
        i, n = bad[0]
        raise ValueError(f"lengths[{i}] must be in [1, capacity={capacity}], got {n}")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def collate_packed(
    examples: list[PairExample],
    pad_token_id: int,
    pack_length: int,
    ignore_index: int = -100,
    pad_to_multiple_of: int = 1,
) -> PairBatch:
    """``collate_pairs`` plus a ``PackedLayout``: the ``2B`` sequences packed into rows of at most ``pack_length``
    tokens (first-fit decreasing), rows right-padded to the longest (a multiple of ``pad_to_multiple_of``).

    The unpacked ``input_ids / attention_mask / labels [2B, T]`` are kept: the labels are the loss's, the model
    body runs on the packed rows and its hidden states are gathered back into ``[2B, T, D]``
    (``HafRewardModel.forward(packing=...)``), so the loss and the reward positions are those of the unpacked batch.
    """
    batch = collate_pairs(examples, pad_token_id, ignore_index)
    lengths = batch.attention_mask.sum(1).tolist()
    rows = pack_rows(lengths, pack_length)
    fill = max(sum(lengths[i] for i in r) for r in rows)
    width = -(-fill // pad_to_multiple_of) * pad_to_multiple_of
    s, t = batch.input_ids.shape
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    seg = torch.full((len(rows), width), -1, dtype=torch.long)
    row_of, start_of = torch.zeros(s, dtype=torch.long), torch.zeros(s, dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            n = lengths[i]
            ids[r, at : at + n] = batch.input_ids[i, :n]
            pos[r, at : at + n] = torch.arange(n)
            seg[r, at : at + n] = i
            row_of[i], start_of[i] = r, at
            at += n
    length = torch.tensor(lengths, dtype=torch.long)
    first = row_of * width + start_of  # flat index of each sequence's first token
    offs = torch.minimum(torch.arange(t).expand(s, t), (length - 1).unsqueeze(1))
    gather = first.unsqueeze(1) + offs
    batch.packing = PackedLayout(ids, pos, seg, row_of, start_of, length, gather, first + length - 1)
    return batch


def padding_fraction(batches: list[list[PairExample]], pack_length: int | None = None) -> float:
    """Share of the token positions the model body runs on that are padding, over ``batches`` (lists of pairs).

    ``pack_length None``: ``collate_pairs`` rows (each of the ``2B`` sequences padded to the batch's longest);
    else ``collate_packed`` rows of at most ``pack_length`` tokens. Lengths only: no tensors are built."""
    real = total = 0
    for examples in batches:
        lengths = [len(ex.prompt_ids) + len(ex.chosen_ids) for ex in examples]
        lengths += [len(ex.prompt_ids) + len(ex.rejected_ids) for ex in examples]
        if not lengths:
            continue
        real += sum(lengths)
        if pack_length is None:
            total += len(lengths) * max(lengths)
        else:
            rows = pack_rows(lengths, pack_length)
            total += len(rows) * max(sum(lengths[i] for i in r) for r in rows)
    return 1.0 - real / total if total else 0.0


def check_shifted_labels(input_ids: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> None:
    """``ValueError`` when ``labels`` are visibly not next-token targets: ``labels[t] == input_ids[t]`` at every
    scored position (the Hugging Face ``labels=input_ids`` convention, which shifts inside the model). Every loss
    here reads ``labels[t]`` as the token *after* ``input_ids[t]``, so such labels give a silently wrong loss."""
    if tuple(labels.shape) != tuple(input_ids.shape):
        raise ValueError(f"labels must have the shape of input_ids {list(input_ids.shape)}, got {list(labels.shape)}")
    scored = labels != ignore_index
    n = int(scored.sum())
    if n >= 2 and bool((labels[scored] == input_ids[scored]).all()):
        raise ValueError(
            f"labels look unshifted: labels[t] == input_ids[t] at all {n} scored positions, but they must be "
            "next-token targets (labels[t] = input_ids[t + 1], ignore_index elsewhere), as collate_pairs builds "
            "them; shift Hugging Face-style labels by one: labels = torch.cat([labels[:, 1:], "
            f"torch.full_like(labels[:, :1], {ignore_index})], dim=1)"
        )


# ---------------------------------------------------------------------------------------------- reading
DATA_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".lzma": "xz", ".zst": "zstd", ".zstd": "zstd"}
FORMATS_HELP = ".jsonl/.json/.parquet/.csv (optionally .gz/.bz2/.xz/.zst) or a load_from_disk folder"


def _data_suffix(path: Path) -> tuple[str | None, str | None]:
    """``(format, compression)`` from the file name: ``x.jsonl.gz`` → ``("jsonl", "gzip")``."""
    suffixes = [x.lower() for x in path.suffixes]
    comp = COMPRESSIONS.get(suffixes.pop()) if suffixes and suffixes[-1] in COMPRESSIONS else None
    return (DATA_FORMATS.get(suffixes[-1]) if suffixes else None), comp


def _open_data(path: Path, compression: str | None):
    """A binary file object over the decompressed content of ``path``."""
    import io

    if compression is None:
        return open(path, "rb")
    if compression == "gzip":
        import gzip

        return gzip.open(path, "rb")
    if compression == "bz2":
        import bz2

        return bz2.open(path, "rb")
    if compression == "xz":
        import lzma

        return lzma.open(path, "rb")
    try:  # zstd: the standard library from Python 3.14, else the zstandard package
        from compression import zstd  # type: ignore[import-not-found]

        return zstd.open(path, "rb")
    except ImportError:
        pass
    try:
        import zstandard
    except ImportError:
        raise DataFormatError(f"{path}: reading .zst files needs Python >= 3.14 or `pip install zstandard`") from None
    with open(path, "rb") as f:
        return io.BytesIO(zstandard.ZstdDecompressor().stream_reader(f).readall())


def _looks_like_path(source: str) -> bool:
    """Whether ``source`` can only be a local path (never a Hub dataset name such as ``org/name``)."""
    s = str(source)
    if s.startswith(("/", ".", "~")) or "\\" in s or s.endswith("/") or s.count("/") > 1:
        return True
    fmt, comp = _data_suffix(Path(s))
    if fmt or comp:
        return True
    return "/" in s and Path(s.split("/", 1)[0]).is_dir()


def read_records(source: str | os.PathLike, split: str = "train") -> list[dict[str, Any]]:
    """The rows of any source ``read_rows`` reads, as dicts (the RM methods' data: pools, strength files).

    An undecodable row or one that is not a JSON object raises ``BadRowError`` naming the file and row."""
    out = []
    for row_no, row in read_rows(source, split):
        if isinstance(row, BadRowError):
            raise row
        if not isinstance(row, dict):
            raise BadRowError(f"{source}: row {row_no}: a {type(row).__name__}, not an object")
        out.append(row)
    return out


def read_rows(source: str | os.PathLike, split: str = "train") -> list[tuple[int, Any]]:
    """``(row_number, row)`` of a data file, a ``load_from_disk`` folder or a Hub dataset name.

    Files: ``.jsonl`` (``.ndjson``), ``.json`` (a list, ``{split: [...]}`` / ``{"data": [...]}``, columns, or JSON
    lines), ``.parquet``, ``.csv``, each optionally compressed (``.gz``, ``.bz2``, ``.xz``, ``.zst``); row numbers are
    the 1-based line number in the (decompressed) file for JSON lines, else the record's 1-based position.
    Undecodable JSON lines are returned as ``BadRowError`` instances (raised or counted later). A missing local path
    raises ``DataNotFoundError`` without any Hub lookup; a name that could be a Hub dataset is tried with
    ``datasets.load_dataset`` and, when that fails too, the error says both what was looked for locally and why
    the Hub load failed.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataFormatError(f"{path}: no split {split!r} (has {list(ds)})")
            ds = ds[split]
        return [(i + 1, row) for i, row in enumerate(ds)]
    fmt, comp = _data_suffix(path)
    if path.is_file():
        if fmt is None:
            raise DataFormatError(f"{path}: unsupported data format (use {FORMATS_HELP})")
        with _open_data(path, comp) as f:
            if fmt == "jsonl":
                return _jsonl_rows(f, path)
            data = f.read()
        if fmt == "json":
            return _json_rows(data, path, split)
        if fmt == "parquet":
            import io

            import pyarrow.parquet as pq

            return [(i + 1, row) for i, row in enumerate(pq.read_table(io.BytesIO(data)).to_pylist())]
        import csv
        import io

        # invalid UTF-8 survives as lone surrogates and is reported per row by normalise_row
        reader = csv.DictReader(io.StringIO(data.decode("utf-8", "surrogateescape"), newline=""))
        return [
            (i + 1, {k: v if k in RESERVED else _csv_value(v) for k, v in row.items()}) for i, row in enumerate(reader)
        ]
    if path.exists():
        raise DataFormatError(f"{path}: not a regular file or folder")
    if _looks_like_path(str(source)):
        raise DataNotFoundError(f"{source}: not found (no such file or folder)")
    import datasets  # a Hub name (needs network)

    try:
        ds = datasets.load_dataset(str(source), split=split)
    except OSError as exc:  # ConnectionError, DatasetNotFoundError, offline mode
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise DataNotFoundError(
            f"{source}: not found: no such local file or folder, and loading it as a Hugging Face Hub dataset "
            f"failed ({type(exc).__name__}: {first})"
        ) from exc
    return [(i + 1, row) for i, row in enumerate(ds)]


def _jsonl_rows(f: Any, path: Path) -> list[tuple[int, Any]]:
    rows: list[tuple[int, Any]] = []
    for i, raw in enumerate(f, start=1):
        if not raw.strip():
            continue
        try:
            rows.append((i, json.loads(raw.decode("utf-8"))))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            rows.append((i, BadRowError(f"{path}: row {i}: undecodable ({type(exc).__name__}: {exc})")))
    return rows


def _json_rows(data: bytes, path: Path, split: str) -> list[tuple[int, Any]]:
    import io

    try:
        obj = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"{path}: not UTF-8 JSON ({exc})") from None
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON lines under a .json name
            return _jsonl_rows(io.BytesIO(data), path)
        raise DataFormatError(f"{path}: not valid JSON ({exc})") from None
    if isinstance(obj, dict):
        obj = obj.get(split, obj.get("data", obj))
    if isinstance(obj, dict):  # column-oriented
        keys = list(obj)
        if not all(isinstance(obj[k], list) for k in keys):
            raise DataFormatError(f"{path}: a JSON object must hold a list of rows (under {split!r} or 'data')")
        obj = [dict(zip(keys, vals)) for vals in zip(*(obj[k] for k in keys))]
    if not isinstance(obj, list):
        raise DataFormatError(f"{path}: expected a list of rows, got {type(obj).__name__}")
    return [(i + 1, row) for i, row in enumerate(obj)]


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
def normalise_row(row: Any, tokenizer: Any) -> tuple[str, str, str, str | None, dict[str, float]]:
    """``(prompt, chosen, rejected, subset, numeric_columns)`` of one raw row; ``ValueError`` if unusable.

    The texts are ``haf_kernels.contract.preference_texts``'s (the reward contract's formats)."""
    prompt, chosen, rejected, _ = preference_texts(row, tokenizer)
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
def load_tokenizer(cfg: Any, saved: str | os.PathLike | None = None) -> Any:
    """The tokenizer of a ``TrainConfig``: the synthetic task's word-level one (``cfg.tokenizer == "synthetic"``)
    or ``load_tokenizer_dir(cfg.tokenizer or cfg.model)``, padded on the right (pad = EOS / unk if missing).

    ``saved``: a run's ``base_model`` folder, used when ``cfg.tokenizer`` / ``cfg.model`` is not a local folder
    (moved, deleted, or a hub name) and the run saved a copy.
    """
    if cfg.tokenizer == "synthetic":
        from .synthetic import SyntheticTask

        return SyntheticTask().tokenizer()
    source = cfg.tokenizer or cfg.model
    if saved is not None and not Path(source).exists() and (Path(saved) / "tokenizer_config.json").exists():
        source = str(saved)
    tok = load_tokenizer_dir(source)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = "right"
    return tok


TOKENIZER_FILE = "haf_tokenizer.json"  # beside a tokenizer this package saved: the class training used
_GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer_dir(name_or_path: str | os.PathLike) -> Any:
    """The tokenizer of a folder (or Hub name) as training uses it.

    A folder this package saved (a run's ``base_model/``, an export) records the class training used in
    ``haf_tokenizer.json``, and is loaded as exactly that class. Anything else: ``AutoTokenizer.from_pretrained``,
    what every other tool loads. transformers 5 loads some model types' tokenizers (``qwen2``, ``phi3``, ... beside
    their ``config.json``) as the model type's own class even when ``tokenizer_config.json`` declares a generic
    fast tokenizer, which then tokenizes differently from ``tokenizer.json``: training follows ``AutoTokenizer``
    there too, and warns.
    """
    import warnings

    import transformers

    folder = Path(name_or_path)
    info_path = folder / TOKENIZER_FILE
    if info_path.exists():
        cls = getattr(transformers, json.loads(info_path.read_text(encoding="utf-8")).get("class", ""), None)
        if isinstance(cls, type) and hasattr(cls, "from_pretrained"):
            return cls.from_pretrained(str(folder))
    tok = transformers.AutoTokenizer.from_pretrained(str(name_or_path))
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.exists():
        declared = json.loads(cfg_path.read_text(encoding="utf-8")).get("tokenizer_class")
        if declared in _GENERIC_TOKENIZERS and type(tok).__name__ not in _GENERIC_TOKENIZERS:
            warnings.warn(
                f"{name_or_path}: transformers loads this tokenizer as {type(tok).__name__} (from the model type in "
                f"config.json), not as the declared {declared}, so it may tokenize differently from tokenizer.json; "
                "training uses what AutoTokenizer.from_pretrained gives, as every tool scoring the export will. "
                "To train on tokenizer.json as is, save it with its own tokenizer class or without config.json beside",
                UserWarning,
                stacklevel=2,
            )
    return tok


def save_tokenizer(tokenizer: Any, folder: str | os.PathLike) -> dict[str, Any]:
    """``tokenizer.save_pretrained(folder)`` plus ``haf_tokenizer.json``: the class training used and whether
    ``AutoTokenizer.from_pretrained(folder)`` (with the ``config.json`` already in ``folder``) gives the same ids.

    Returns that record: ``{"class", "auto_tokenizer_class", "auto_tokenizer_matches"}``."""
    import transformers

    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    info: dict[str, Any] = {"class": type(tokenizer).__name__}
    try:
        auto = transformers.AutoTokenizer.from_pretrained(str(folder))
        probes = [
            tokenizer.decode(list(range(min(len(tokenizer), 512)))),
            "\n\nHuman: Why is the sky blue? Explain, briefly.\n\nAssistant: Rayleigh scattering: 42 is 6 × 7.",
        ]
        same = all(list(auto(t)["input_ids"]) == list(tokenizer(t)["input_ids"]) for t in probes)
        info.update(auto_tokenizer_class=type(auto).__name__, auto_tokenizer_matches=bool(same))
    except Exception as exc:  # AutoTokenizer cannot load it at all
        info.update(auto_tokenizer_class=None, auto_tokenizer_matches=False, auto_tokenizer_error=str(exc)[:300])
    (folder / TOKENIZER_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def encode_reward_input(
    tokenizer: Any,
    prompt: str,
    response: str,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    max_prompt_length: int = DEFAULT_MAX_PROMPT_LENGTH,
    conversational: bool = False,
) -> list[int]:
    """The ids whose last token carries the reward of one ``(prompt, response)``, truncated like training."""
    p, r, _ = tokenize_pair(tokenizer, prompt, response, response, conversational=conversational)
    p2, r2 = truncate(p, r, max_length, max_prompt_length, keep=leading_specials(p, special_ids(tokenizer)))
    return p2 + r2


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
            h.update(json.dumps([ex.prompt_ids, ex.chosen_ids, ex.rejected_ids, list(ex.end_labels)]).encode())
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
    max_length: int = DEFAULT_MAX_LENGTH,
    max_prompt_length: int = DEFAULT_MAX_PROMPT_LENGTH,
    split: str = "train",
    skip_bad_rows: bool = False,
    limit: int | None = None,
) -> PreferenceDataset:
    """Read, normalise, tokenise and truncate a preference source (see the module docstring)."""
    report = LoadReport(str(source))
    examples: list[PairExample] = []
    check_lengths(max_length, max_prompt_length)
    for row_no, row in read_rows(source, split):
        if limit is not None and len(examples) >= limit:
            break
        report.n_rows += 1
        try:
            if isinstance(row, BadRowError):
                raise row
            try:
                prompt, chosen, rejected, subset, cols = normalise_row(row, tokenizer)
                chat = isinstance(row, dict) and is_messages(row.get("chosen")) and is_messages(row.get("rejected"))
                pair = tokenize_preference(
                    tokenizer,
                    prompt,
                    chosen,
                    rejected,
                    conversational=chat,
                    max_length=max_length,
                    max_prompt_length=max_prompt_length,
                )
            except BadRowError:
                raise
            except (ValueError, TypeError, KeyError) as exc:
                raise BadRowError(f"{source}: row {row_no}: {exc}") from exc
        except BadRowError as exc:
            if not skip_bad_rows:
                raise
            reason = str(exc).split(": ", 2)[-1].split(" (")[0]
            report.bad[reason] += 1
            if len(report.examples) < 5:
                report.examples.append(str(exc))
            continue
        pc, c, r = pair.prompt_ids, pair.chosen_ids, pair.rejected_ids
        examples.append(
            PairExample(pc, c, r, len(examples), subset, cols, source_row=row_no, end_labels=pair.end_labels)
        )
        n_p, n_c, n_r = pair.full_lengths
        report.n_kept += 1
        report.truncated_prompts += len(pc) < n_p
        report.truncated_responses += (len(c) < n_c) + (len(r) < n_r)
    if not examples:
        raise ValueError(f"{source}: no usable rows ({report.summary()})")
    return PreferenceDataset(examples, report)


# ---------------------------------------------------------------------------------------------- batching
def collate_pairs(
    examples: list[PairExample], pad_token_id: int, ignore_index: int = -100, pad_to_multiple_of: int = 1
) -> PairBatch:
    """Right-padded ``[2B, T]`` batch: chosen rows then rejected rows; labels mask prompt and padding.

    The response's EOS target (``end_labels``) is the label of its last position: the hidden state of the last
    token predicts it, and the token itself is never an input (the reward stays at the last real token).
    """
    ids, mask, labels = pad_pairs(
        [ex.prompt_ids for ex in examples],
        [ex.chosen_ids for ex in examples],
        [ex.rejected_ids for ex in examples],
        [ex.end_labels for ex in examples],
        pad_token_id,
        ignore_index,
        pad_to_multiple_of,
    )
    names = sorted({k for ex in examples for k in ex.columns})
    columns = {
        k: torch.tensor([ex.columns.get(k, float("nan")) for ex in examples], dtype=torch.float32) for k in names
    }
    index = torch.tensor([ex.index for ex in examples], dtype=torch.long)
    return PairBatch(
        ids, mask, labels, index, columns, [ex.subset for ex in examples], [ex.source_row for ex in examples]
    )
