"""The reward contract: how a preference row becomes token ids and labels, and where its reward is read.

One definition, used by ``training`` (``training.data``: the trainer, its evaluation, ``haf-score``, the export's
``haf_reward.json``) and by ``haf_kernels.integrations.trl`` (``HafTrainer``). Pure Python plus tokenizer calls;
torch is imported only by ``pad_pairs``.

- Text: the reward of ``(prompt, response)`` is read at the last token of
  ``encode_for_reward(tokenizer, reward_text(prompt, response))``, i.e. of ``tokenizer(prompt + response)`` with the
  tokenizer's default special tokens (one space joins a plain-text prompt and response that meet without whitespace;
  conversational rows are the chat template's rendering, whose own BOS is not doubled).
- Rows (``preference_texts``): explicit prompt (``prompt``/``chosen``/``rejected`` strings); implicit prompt (full
  transcripts, split after the last shared ``"\\n\\nAssistant:"``, else at a word boundary); conversational (lists of
  ``{role, content}`` messages, with or without ``prompt``).
- Ids (``tokenize_pair``): each sequence is tokenised as one text; the prompt is the longest prefix both share with
  the tokenised prompt (a token merged across the boundary counts as response).
- Truncation (``truncate``): the prompt's leading special tokens and its end (≤ ``max_prompt_length``), then the
  start of the response (total ≤ ``max_length``).
- EOS (``policy_eos``): a policy target after the last token of an untruncated response (a label, never an input),
  so the reward position is the one plain ``transformers`` reads (``pad_pairs`` builds those labels).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

HH_ASSISTANT = "\n\nAssistant:"
CONTRACT_VERSION = 1  # of the reward contract; written to haf_reward.json

__all__ = [
    "CONTRACT_VERSION",
    "HH_ASSISTANT",
    "TokenizedPair",
    "check_lengths",
    "encode_for_reward",
    "is_messages",
    "leading_specials",
    "pad_pairs",
    "policy_eos",
    "preference_texts",
    "render_messages",
    "reward_contract",
    "reward_text",
    "special_ids",
    "split_shared_prefix",
    "tokenize_pair",
    "tokenize_preference",
    "truncate",
]


# ---------------------------------------------------------------------------------------------- rows → texts
def is_messages(x: Any) -> bool:
    """Whether ``x`` is a list of ``{role, content}`` messages (an empty list counts: it is then an empty turn)."""
    return isinstance(x, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in x)


def split_shared_prefix(chosen: str, rejected: str) -> tuple[str, str, str]:
    """``(prompt, chosen_response, rejected_response)`` of two full transcripts with a shared prefix.

    The prompt ends after the last ``"\\n\\nAssistant:"`` inside the common prefix (HH style); otherwise at
    the last whitespace of the common prefix (so no word is split). A response can come out empty (one
    transcript is the other plus more turns, e.g. ``…\\n\\nAssistant:`` vs ``…\\n\\nAssistant: text``);
    ``preference_texts`` reports that as an unusable row.
    """
    n = _common_prefix(chosen, rejected)
    common = chosen[:n]
    cut = common.rfind(HH_ASSISTANT)
    if cut >= 0:
        cut += len(HH_ASSISTANT)
    else:
        ws = max(common.rfind(" "), common.rfind("\n"))
        cut = ws if ws >= 0 and n < min(len(chosen), len(rejected)) else n
    return chosen[:cut], chosen[cut:], rejected[cut:]


def render_messages(tokenizer: Any, prompt: Any, chosen: Any, rejected: Any) -> tuple[str, str, str]:
    """``(prompt_text, chosen_text, rejected_text)`` of conversational rows, rendered with the chat template.

    ``prompt``: messages, a string (one user message) or ``None`` (the shared message prefix of the two
    conversations). The prompt is rendered with the generation prompt; each response is what the whole
    conversation adds to it. ``ValueError`` when the template fails or does not render the prompt as a prefix.
    """
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

    def render(messages: list, **kw: Any) -> str:
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, **kw)
        except Exception as exc:  # jinja TemplateError (e.g. roles must alternate), bad message contents
            msg = " ".join(str(exc).split())
            raise ValueError(f"chat template failed ({type(exc).__name__}: {msg})") from exc

    p_text = render(prompt, add_generation_prompt=True)
    out = []
    for key, resp in (("chosen", chosen), ("rejected", rejected)):
        if not resp:
            raise ValueError(f"empty response ({key} has no messages after the prompt)")
        full = render(list(prompt) + list(resp))
        if not full.startswith(p_text):  # templates that differ with/without a generation prompt
            p0 = render(prompt)
            if not full.startswith(p0):
                raise ValueError("chat template does not render the prompt as a prefix of the conversation")
            out.append(full[len(p0) :])
        else:
            out.append(full[len(p_text) :])
    return p_text, out[0], out[1]


def preference_texts(row: Any, tokenizer: Any) -> tuple[str, str, str, bool]:
    """``(prompt, chosen, rejected, conversational)`` texts of one preference row (any of the three formats).

    ``ValueError`` naming what makes the row unusable: not a mapping, a missing field, wrong types, a failing chat
    template, an empty response (also one left empty by the implicit-prompt split), undecodable text, or
    ``chosen == rejected``.
    """
    if not isinstance(row, Mapping):
        raise ValueError(f"row is a {type(row).__name__}, not a mapping")
    for key in ("chosen", "rejected"):
        if key not in row or row[key] is None:
            raise ValueError(f"missing field {key!r}")
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    conversational = is_messages(chosen) and is_messages(rejected)
    if conversational:
        if prompt is not None and not (isinstance(prompt, str) or is_messages(prompt)):
            raise ValueError("prompt must be a string or a list of messages")
        prompt, chosen, rejected = render_messages(tokenizer, prompt, chosen, rejected)
    else:
        for key, val in (("chosen", chosen), ("rejected", rejected)):
            if not isinstance(val, str):
                raise ValueError(f"field {key!r} must be a string or a list of {{role, content}} messages")
        if prompt is None:
            if chosen == rejected:
                raise ValueError("chosen == rejected")
            prompt, chosen, rejected = split_shared_prefix(chosen, rejected)
            for key, val, other in (("chosen", chosen, "rejected"), ("rejected", rejected, "chosen")):
                if not val.strip():
                    raise ValueError(
                        f"empty response ({key} is empty after splitting off the prompt it shares with {other}: "
                        f"no explicit prompt, and the {key} transcript is the start of the {other} one)"
                    )
        elif not isinstance(prompt, str):
            raise ValueError("field 'prompt' must be a string")
    for key, val in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        try:
            val.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"undecodable text in {key!r} ({exc.reason})") from exc
    for key, val in (("chosen", chosen), ("rejected", rejected)):
        if not val.strip():
            raise ValueError(f"empty response ({key} is blank)")
    if chosen == rejected:
        raise ValueError("chosen == rejected")
    return prompt, chosen, rejected, conversational


# ---------------------------------------------------------------------------------------------- texts → ids
def reward_text(prompt: str, response: str, *, conversational: bool = False) -> str:
    """The text whose reward is read (the contract): ``prompt + response``.

    A plain-text prompt and response that meet without whitespace (``"w01 w02"`` + ``"w03"``) are joined with one
    space; conversational rows (``conversational=True``: chat-template renderings) are joined as they are.
    """
    if conversational or not prompt or not response or prompt[-1].isspace() or response[0].isspace():
        return prompt + response
    return prompt + " " + response


def encode_for_reward(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` under the contract: ``tokenizer(text)["input_ids"]`` with the tokenizer's default
    special tokens, except that a BOS the text already starts with (a chat template rendering ``bos_token``)
    is not duplicated. The reward is read at the last of these ids."""
    ids = list(tokenizer(text)["input_ids"])
    bos, bos_text = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "bos_token", None)
    if bos is not None and bos_text and len(ids) >= 2 and ids[0] == ids[1] == bos and text.startswith(bos_text):
        ids = ids[1:]
    return ids


def policy_eos(tokenizer: Any) -> int | None:
    """The policy's end-of-response target: the tokenizer's EOS, as a label after the last token (never an input,
    so the reward position and the export's pad handling are unaffected)."""
    return getattr(tokenizer, "eos_token_id", None)


def _common_prefix(a: Sequence, b: Sequence) -> int:
    """Length of the longest common prefix of two sequences (token ids or strings)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_pair(
    tokenizer: Any, prompt: str, chosen: str, rejected: str, *, conversational: bool = False
) -> tuple[list[int], list[int], list[int]]:
    """``(prompt_ids, chosen_ids, rejected_ids)`` with ``prompt_ids + chosen_ids`` the contract ids of
    ``reward_text(prompt, chosen)`` (likewise rejected): each sequence is tokenised as one text, and the prompt is
    the longest prefix both share with the tokenised prompt (so a token merged across the boundary counts as
    response). With an empty prompt the prompt ids are the tokenizer's leading special tokens (BOS), if any.
    """
    p = encode_for_reward(tokenizer, prompt)
    texts = [reward_text(prompt, x, conversational=conversational) for x in (chosen, rejected)]
    full = [encode_for_reward(tokenizer, t) for t in texts]
    k = min(_common_prefix(f, p) for f in full)
    if any(len(f) <= k for f in full):
        raise ValueError("empty response after tokenisation")
    return full[0][:k], full[0][k:], full[1][k:]


def special_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special tokens (BOS/EOS/…, and added tokens marked special, e.g. chat roles)."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for i, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    return ids


def leading_specials(ids: list[int], specials: set[int]) -> int:
    """How many leading ``ids`` are special tokens (kept when the prompt is truncated from the left)."""
    n = 0
    while n < len(ids) and ids[n] in specials:
        n += 1
    return n


def check_lengths(max_length: int, max_prompt_length: int) -> None:
    """``ValueError`` unless ``max_prompt_length < max_length`` (a truncated pair keeps a response token)."""
    if max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must be < max_length ({max_length})")


def truncate(prompt: list[int], response: list[int], max_length: int, max_prompt_length: int, keep: int = 0):
    """Keep the first ``keep`` prompt tokens (BOS, a chat template's leading special tokens; at most half of
    ``max_prompt_length``) and the end of the prompt (≤ ``max_prompt_length`` in all), then the start of the
    response (total ≤ ``max_length``)."""
    check_lengths(max_length, max_prompt_length)
    if len(prompt) > max_prompt_length:
        keep = max(0, min(keep, max_prompt_length, max(1, max_prompt_length // 2)))
        tail = max_prompt_length - keep
        prompt = prompt[:keep] + (prompt[len(prompt) - tail :] if tail > 0 else [])
    return prompt, response[: max(0, max_length - len(prompt))]


@dataclass
class TokenizedPair:
    """One pair under the contract, truncated: ``prompt_ids + chosen_ids`` are the ids whose last token carries the
    chosen reward (likewise rejected). ``end_labels``: the policy targets after the last chosen / rejected token (the
    EOS id, or ``None``: no EOS, or the response was truncated). ``full_lengths``: the untruncated prompt, chosen and
    rejected token counts (what truncation cut)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    end_labels: tuple[int | None, int | None]
    full_lengths: tuple[int, int, int]


def tokenize_preference(
    tokenizer: Any,
    prompt: str,
    chosen: str,
    rejected: str,
    *,
    conversational: bool = False,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
) -> TokenizedPair:
    """``tokenize_pair`` + ``truncate`` (keeping the prompt's leading special tokens) + the EOS targets.

    ``max_length None``: no truncation (``max_prompt_length`` is then ignored); else ``max_prompt_length`` must be
    given and ``< max_length``. ``ValueError`` when a response is empty after tokenisation or when chosen and
    rejected are the same ids after truncation.
    """
    if max_length is not None:
        if max_prompt_length is None:
            raise ValueError("max_prompt_length must be given with max_length")
        check_lengths(max_length, max_prompt_length)
    p, c_full, r_full = tokenize_pair(tokenizer, prompt, chosen, rejected, conversational=conversational)
    pc, c, r = p, c_full, r_full
    if max_length is not None:
        keep = leading_specials(p, special_ids(tokenizer))
        pc, c = truncate(p, c_full, max_length, max_prompt_length, keep=keep)
        _, r = truncate(p, r_full, max_length, max_prompt_length, keep=keep)
    if c == r:
        raise ValueError("chosen == rejected after tokenisation/truncation")
    eos = policy_eos(tokenizer)
    c_end, r_end = (
        eos if eos is not None and len(kept) == len(whole) and whole[-1] != eos else None
        for kept, whole in ((c, c_full), (r, r_full))
    )
    return TokenizedPair(pc, c, r, (c_end, r_end), (len(p), len(c_full), len(r_full)))


# ---------------------------------------------------------------------------------------------- ids → batch
def pad_pairs(
    prompt_ids: list[list[int]],
    chosen_ids: list[list[int]],
    rejected_ids: list[list[int]],
    end_labels: list[tuple[int | None, int | None]],
    pad_token_id: int,
    ignore_index: int = -100,
    pad_to_multiple_of: int = 1,
):
    """Right-padded ``(input_ids, attention_mask, labels)``, each ``[2B, T]`` int64: rows ``0..B-1`` are
    ``prompt + chosen``, rows ``B..2B-1`` ``prompt + rejected``; ``T`` the longest, rounded up to a multiple of
    ``pad_to_multiple_of``.

    ``labels[t] = input_ids[t + 1]`` where ``t + 1`` is a response token; the response's EOS target
    (``end_labels``, ``None``: none) is the label of its last position (the hidden state of the last token predicts
    it, and the token itself is never an input, so the reward stays at the last real token); ``ignore_index``
    elsewhere (prompt, padding).
    """
    import torch

    seqs = [p + c for p, c in zip(prompt_ids, chosen_ids)] + [p + r for p, r in zip(prompt_ids, rejected_ids)]
    n_prompt = [len(p) for p in prompt_ids] * 2
    ends = [e[0] for e in end_labels] + [e[1] for e in end_labels]
    t = max(len(s) for s in seqs)
    t = -(-t // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(seqs), t), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    labels = torch.full((len(seqs), t), ignore_index, dtype=torch.long)
    for i, (s, np_, end) in enumerate(zip(seqs, n_prompt, ends)):
        n = len(s)
        ids[i, :n] = torch.tensor(s, dtype=torch.long)
        mask[i, :n] = 1
        start = max(np_ - 1, 0)  # hidden at t predicts token t+1; first target is the first response token
        if n - 1 > start:
            labels[i, start : n - 1] = ids[i, start + 1 : n]
        if end is not None and n > np_:
            labels[i, n - 1] = int(end)
    return ids, mask, labels


# ---------------------------------------------------------------------------------------------- the record
def reward_contract(tokenizer: Any, *, max_length: int | None, max_prompt_length: int | None) -> dict[str, Any]:
    """What scoring needs to reproduce training (written as ``haf_reward.json``); ``None`` lengths: no truncation."""
    eos = policy_eos(tokenizer) if tokenizer is not None else None
    return {
        "contract_version": CONTRACT_VERSION,
        "reward_position": "last token of tokenizer(text) with the tokenizer's default special tokens",
        "text": "prompt + response (one space joins plain texts that meet without whitespace); conversational "
        "rows: the chat template's rendering of the prompt and response messages",
        "add_special_tokens": True,
        "dedupe_bos": True,  # a BOS rendered by the chat template is not doubled by the tokenizer's own
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "max_length": None if max_length is None else int(max_length),
        "max_prompt_length": None if max_prompt_length is None else int(max_prompt_length),
        "truncation": {"prompt": "left, keeping leading special tokens (BOS)", "response": "right"},
        "policy_eos_appended": eos is not None,
        "policy_eos_token_id": eos,  # a training target after the last token; never part of the scored input
        "pad_token_id": getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None,
    }


def head_transform(config: Any) -> tuple[float, float | None]:
    """``(logit_scale, softcap)`` of a transformers config's LM head (what the logits are before the softmax).

    Gemma-2/3 ``final_logit_softcapping`` → softcap; Cohere ``logit_scale`` multiplies; Granite ``logits_scaling``
    divides. Multimodal configs are read through their text config (``get_text_config()`` or ``text_config``).
    """
    if hasattr(config, "get_text_config"):
        cfg = config.get_text_config()
    else:
        cfg = getattr(config, "text_config", None) or config
    scale = 1.0
    if getattr(cfg, "logit_scale", None) is not None:
        scale *= float(cfg.logit_scale)
    if getattr(cfg, "logits_scaling", None) is not None:
        scale /= float(cfg.logits_scaling)
    softcap = getattr(cfg, "final_logit_softcapping", None)
    return scale, None if softcap is None else float(softcap)


def last_token_index(attention_mask: Any) -> Any:
    """Index ``[S]`` of the last non-padding token of each row of ``attention_mask [S, T]`` (right or left
    padding): where the reward is read."""
    import torch

    t = attention_mask.shape[1]
    pos = torch.arange(t, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), pos, torch.full_like(pos, -1)).max(dim=1).values.clamp_min(0)
