"""Seeded synthetic preference task whose true reward is known.

Words ``w00 … w{n-1}`` each carry a hidden score ``s_w ~ N(0, 1)``. A prompt is a few words (it does not
change the reward); a response is a sequence of words drawn by a *response generator* (the "policy"), and
its true reward is the sum of its words' scores. A pair is two responses to one prompt; the one with the
higher true reward is the true ``chosen``. Pairs whose rewards are close are ambiguous.

Noise: a Bradley–Terry annotator keeps the true order with probability ``σ((r_c − r_r)/temperature)``, so
ambiguous pairs flip more often than clear ones. ``noise_rate`` is the target fraction of flipped pairs;
the temperature is calibrated (bisection on the expected flip rate of the generated pairs) to hit it.

Rows are plain dicts with ``prompt``, ``chosen``, ``rejected`` (strings) and ``true_reward_chosen``,
``true_reward_rejected``, ``flipped`` (bool: the observed label disagrees with the true order), ``subset``
(``"clear"`` / ``"ambiguous"`` by the true margin, prefixed ``"shift/"`` for shifted splits). Everything is
deterministic given the task seed and the split seed, and fast (pure Python + numpy-free ``random``).

Typical use::

    task = SyntheticTask(seed=0)
    train = task.pairs(2000, seed=1, noise_rate=0.2)
    test = task.pairs(500, seed=2)                       # clean labels
    ood = task.pairs(500, seed=3, shift=True)            # longer responses, shifted generator
    pool = task.unlabelled(200, k=4, seed=4)             # MetaRM: prompt + k responses of a shifted policy
    tok = task.tokenizer()                               # matching local PreTrainedTokenizerFast
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


@dataclass(frozen=True)
class SyntheticTask:
    """The task definition: vocabulary, hidden word scores and response generators.

    Args:
        seed: fixes the word scores (the "true reward model").
        n_words: vocabulary size of content words.
        prompt_len: inclusive range of prompt lengths (words).
        response_len: inclusive range of in-distribution response lengths.
        shift_response_len: response lengths of the shifted split.
        shift_tilt: the shifted generator samples word ``w`` with probability ∝ ``exp(shift_tilt·s_w)``
            over a shifted half of the vocabulary mixed with uniform (a different "policy").
        ambiguous_margin: pairs with ``|r_c − r_r|`` below this are in subset ``"ambiguous"``.
    """

    seed: int = 0
    n_words: int = 48
    prompt_len: tuple[int, int] = (2, 4)
    response_len: tuple[int, int] = (5, 8)
    shift_response_len: tuple[int, int] = (10, 14)
    shift_tilt: float = 1.0
    ambiguous_margin: float = 1.0
    scores: tuple[float, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.scores:
            rng = random.Random(self.seed)
            object.__setattr__(self, "scores", tuple(rng.gauss(0.0, 1.0) for _ in range(self.n_words)))
        object.__setattr__(self, "_score_of", dict(zip(self.words, self.scores)))

    # ------------------------------------------------------------------ vocabulary and reward
    @property
    def words(self) -> list[str]:
        return [f"w{i:02d}" for i in range(self.n_words)]

    def true_reward(self, response: str) -> float:
        """Sum of the per-word scores of a response (unknown words score 0)."""
        score_of = self._score_of  # type: ignore[attr-defined]
        return float(sum(score_of.get(w, 0.0) for w in response.split()))

    def _response(self, rng: random.Random, shift: bool) -> str:
        lo, hi = self.shift_response_len if shift else self.response_len
        n = rng.randint(lo, hi)
        if not shift:
            return " ".join(rng.choice(self.words) for _ in range(n))
        # shifted policy: favours high-scoring words of the second half of the vocabulary
        half = self.n_words // 2
        weights = [1.0 if i < half else 1.0 + 3.0 * math.exp(self.shift_tilt * s) for i, s in enumerate(self.scores)]
        return " ".join(rng.choices(self.words, weights=weights, k=n))

    def _prompt(self, rng: random.Random) -> str:
        return " ".join(rng.choice(self.words) for _ in range(rng.randint(*self.prompt_len)))

    # ------------------------------------------------------------------ splits
    def pairs(
        self, n: int, *, seed: int, noise_rate: float = 0.0, temperature: float | None = None, shift: bool = False
    ) -> list[dict[str, Any]]:
        """``n`` labelled pairs; ``noise_rate`` (or an explicit BT ``temperature``) flips labels.

        Responses with equal true reward are resampled, so the true order is always defined.
        """
        if not 0.0 <= noise_rate < 0.5:
            raise ValueError(f"noise_rate must be in [0, 0.5), got {noise_rate}")
        rng = random.Random(f"pairs/{self.seed}/{seed}/{int(shift)}")
        raw = []
        while len(raw) < n:
            prompt = self._prompt(rng)
            a, b = self._response(rng, shift), self._response(rng, shift)
            ra, rb = self.true_reward(a), self.true_reward(b)
            if a == b or abs(ra - rb) < 1e-9:
                continue
            raw.append((prompt, a, b, ra, rb) if ra > rb else (prompt, b, a, rb, ra))
        margins = [rc - rr for _, _, _, rc, rr in raw]
        if temperature is None and noise_rate > 0:
            temperature = calibrate_temperature(margins, noise_rate)
        rows = []
        for (prompt, good, bad, rg, rb), m in zip(raw, margins):
            flip = temperature is not None and temperature > 0 and rng.random() >= _sigmoid(m / temperature)
            chosen, rejected, rc, rr = (bad, good, rb, rg) if flip else (good, bad, rg, rb)
            subset = "ambiguous" if m < self.ambiguous_margin else "clear"
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": chosen,
                    "rejected": rejected,
                    "true_reward_chosen": rc,
                    "true_reward_rejected": rr,
                    "flipped": bool(flip),
                    "subset": f"shift/{subset}" if shift else subset,
                }
            )
        return rows

    def unlabelled(self, n_prompts: int, *, k: int = 4, seed: int, shift: bool = True) -> list[dict[str, Any]]:
        """Prompts with ``k`` unlabelled responses from the shifted policy (MetaRM's ``X_s``).

        Each row: ``prompt``, ``responses`` (list of k strings), ``true_rewards`` (for analysis only).
        """
        rng = random.Random(f"unlabelled/{self.seed}/{seed}/{int(shift)}")
        rows = []
        for _ in range(n_prompts):
            prompt = self._prompt(rng)
            responses = [self._response(rng, shift) for _ in range(k)]
            rows.append(
                {"prompt": prompt, "responses": responses, "true_rewards": [self.true_reward(r) for r in responses]}
            )
        return rows

    def tokenizer(self):
        """The matching local tokenizer (see ``build_tokenizer``)."""
        return build_tokenizer(self.words)


def calibrate_temperature(margins: list[float], noise_rate: float, iters: int = 60) -> float:
    """BT temperature whose expected flip rate ``mean(1 − σ(m/τ))`` over ``margins`` equals ``noise_rate``."""
    if noise_rate <= 0:
        return 0.0
    flip = lambda tau: sum(1.0 - _sigmoid(m / tau) for m in margins) / len(margins)
    lo, hi = 1e-6, 1.0
    while flip(hi) < noise_rate:
        hi *= 2.0
        if hi > 1e9:
            break
    for _ in range(iters):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if flip(mid) < noise_rate else (lo, mid)
    return math.sqrt(lo * hi)


def build_tokenizer(words: list[str]):
    """A word-level ``PreTrainedTokenizerFast`` over ``words`` plus specials, with a chat template.

    Splits on whitespace, prepends ``[BOS]``; pad ``[PAD]`` (id 0, distinct from ``[EOS]`` so sequence
    classifiers find the last real token); chat roles render as ``<|user|> text <|assistant|> text``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(words))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        padding_side="right",
        truncation_side="right",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def write_jsonl(rows: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write rows as JSON lines (atomically) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return path


def write_task(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    n_train: int = 2000,
    n_test: int = 500,
    n_shift: int = 500,
    noise_rate: float = 0.0,
) -> dict[str, Path]:
    """Write ``train.jsonl`` (with ``noise_rate``), clean ``test.jsonl`` and ``shift.jsonl``, and the tokenizer.

    Returns the paths by split name (plus ``"tokenizer"``).
    """
    task = SyntheticTask(seed=seed)
    out = Path(out_dir)
    paths = {
        "train": write_jsonl(task.pairs(n_train, seed=1, noise_rate=noise_rate), out / "train.jsonl"),
        "test": write_jsonl(task.pairs(n_test, seed=2), out / "test.jsonl"),
        "shift": write_jsonl(task.pairs(n_shift, seed=3, shift=True), out / "shift.jsonl"),
    }
    task.tokenizer().save_pretrained(out / "tokenizer")
    paths["tokenizer"] = out / "tokenizer"
    return paths
