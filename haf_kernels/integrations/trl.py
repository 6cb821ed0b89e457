"""HaF reward models inside TRL's training loop: ``HafConfig`` (a ``trl.DPOConfig``) and ``HafTrainer``.

``HafTrainer`` is a ``trl.DPOTrainer`` whose loss is ``haf_kernels.fused_haf_loss``: the policy's final hidden
states and LM-head weight go to the fused kernels (no ``[tokens × vocab]`` logits), and a bias-free reward head
``Linear(D, 1)`` named ``score`` (the name ``AutoModelForSequenceClassification`` uses) reads the last token's
hidden state. Everything else is TRL's: datasets, ``Trainer`` arguments, PEFT, precomputed reference log-probs,
logging, checkpoints, ``save_model``.

Data: TRL's preference formats — explicit prompt (``prompt``/``chosen``/``rejected`` strings), implicit prompt
(``chosen``/``rejected`` full transcripts), conversational (lists of ``{role, content}`` messages, with or
without ``prompt``). They are tokenised under haf_kernels' reward contract (``haf_kernels.contract``, which
``training`` uses too, so the numbers agree with ``haf-train``): the reward of ``(prompt, response)`` is read at the
last token of ``tokenizer(prompt + response)`` with the tokenizer's default special tokens (one space joins plain
texts that meet without whitespace; conversational rows are the chat template's rendering, its own BOS not
doubled). Unlike ``DPOTrainer``, EOS is never appended to the text: it is a policy target after the last token only.
Truncation: the prompt from the left to ``max_prompt_length`` (keeping its leading special tokens), then the
response from the right to ``max_length``; a truncated response gets no EOS target.

Reference (``reference_mode``): ``"auto"`` is ``DPOTrainer``'s choice — the given ``ref_model``; for a PEFT model
the adapter disabled (or TRL's ``"ref"`` adapter); else a frozen copy of the initial model (``"copy"``, made in
memory, not reloaded from disk). ``"none"`` is reference-free (also implied by ``policy_loss="simpo"``).
``precompute_ref_log_probs=True`` computes them once before training, as in TRL.

The saved folder (``trainer.save_model(dir)`` for full fine-tuning, ``trainer.export_reward_model(dir)`` for any
model, LoRA merged) loads with ``AutoModelForSequenceClassification`` (``score`` = the reward head) and, the
same folder, with ``AutoModelForCausalLM`` (the policy); ``haf_reward.json`` beside it records the contract.
Saved folders and checkpoints hold no pickle: ``training_args.json`` instead of ``training_args.bin``, and the
resume state (optimizer, scheduler, RNG, scaler) as JSON + safetensors (``state_files``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

_INSTALL_HINT = "pip install haf_kernels[trl]"
try:
    import trl
    from packaging.version import Version
    from trl import DPOConfig, DPOTrainer
except ImportError as exc:  # one line: what is missing and how to get it
    raise ImportError(
        f"haf_kernels.integrations.trl needs TRL >= 1.16 ({exc}); install it with `{_INSTALL_HINT}`"
    ) from exc
if Version(getattr(trl, "__version__", "0")) < Version("1.16"):
    raise ImportError(f"haf_kernels.integrations.trl needs TRL >= 1.16, found {trl.__version__}; `{_INSTALL_HINT}`")

from .. import contract, fused_haf_loss, objectives, sequence_logprobs  # noqa: E402
from . import state_files  # noqa: E402

__all__ = ["HafConfig", "HafTrainer", "HafPreferenceCollator", "tokenize_preference_row", "attach_reward_head"]

IGNORE_INDEX = -100
TRAINING_ARGS_JSON = "training_args.json"  # written instead of Trainer's pickled training_args.bin
REWARD_HEAD = "score"  # the attribute *ForSequenceClassification models give their head


# ---------------------------------------------------------------------------------------------- config
@dataclass
class HafConfig(DPOConfig):
    """``trl.DPOConfig`` plus the HaF loss: ``loss = reward_weight · BT(r_c − r_r) + alpha · policy(β·d)``.

    ``beta``, ``label_smoothing`` (ε of the BT and sigmoid/simpo terms), ``max_length``, ``precompute_ref_log_probs``
    and every ``TrainingArguments`` field keep their ``DPOConfig`` meaning; ``center_rewards_coefficient`` is
    ``RewardConfig``'s. ``policy_loss``: one objective of ``haf_kernels.objectives`` or a list of them, weighted by
    ``policy_loss_weights`` (one weight each; ``None``: 1 each). TRL's ``loss_type`` / ``loss_weights`` name the same
    objectives, so when set (not the default ``["sigmoid"]`` / ``None``) they are copied to ``policy_loss`` /
    ``policy_loss_weights``; setting both spellings to different values is a ``ValueError``. ``ld_alpha`` /
    ``f_divergence_type`` / ``use_weighting`` modify TRL's own loss code and are refused when changed.
    """

    alpha: float = field(default=0.2, metadata={"help": "Weight of the policy (DPO-family) term; 0 is the BT RM."})
    reward_weight: float = field(default=1.0, metadata={"help": "Weight of the Bradley-Terry term; 0 is DPO-as-RM."})
    policy_loss: str | list[str] = field(
        default="sigmoid",
        metadata={"help": "Policy objective(s) of haf_kernels.objectives (TRL's loss_type names): sigmoid, hinge, ..."},
    )
    policy_loss_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per policy_loss objective (TRL's loss_weights); None: 1 each."}
    )
    simpo_gamma: float = field(default=0.0, metadata={"help": "SimPO target margin (policy_loss='simpo')."})
    average_log_prob: bool = field(default=False, metadata={"help": "Per-token mean log-probs instead of sums."})
    reference_mode: str = field(
        default="auto", metadata={"help": "auto (as DPOTrainer), copy (frozen copy), lora (adapter off), none."}
    )
    center_rewards_coefficient: float | None = field(
        default=None, metadata={"help": "RewardConfig's reward centering, c * mean((r_c + r_r)^2)."}
    )
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Prompt tokens kept (from the left); None: 3/4 of max_length."}
    )
    haf_backend: str = field(default="auto", metadata={"help": "haf_kernels backend: auto, triton, cpp, torch."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.policy_loss is None:  # HfArgumentParser's default for a list-typed field
            self.policy_loss = "sigmoid"
        self._take_trl_loss_type()
        self.validate_haf()

    def _take_trl_loss_type(self) -> None:
        """Copy TRL's ``loss_type`` / ``loss_weights`` (when set) to ``policy_loss`` / ``policy_loss_weights``."""
        trl_types, trl_weights = list(self.loss_type), self.loss_weights
        if trl_types == ["sigmoid"] and trl_weights is None:
            return
        try:
            ours = objectives.split_names(self.policy_loss)
        except (TypeError, ValueError):
            ours = None  # validate_haf names the problem
        ours_set = ours != ["sigmoid"] or self.policy_loss_weights is not None
        theirs_w = None if trl_weights is None else [float(w) for w in trl_weights]
        ours_w = None if self.policy_loss_weights is None else [float(w) for w in self.policy_loss_weights]
        if ours_set and (ours != trl_types or ours_w != theirs_w):
            raise ValueError(
                f"HafConfig.loss_type/loss_weights: TRL's loss_type={trl_types}, loss_weights={trl_weights} disagree "
                f"with policy_loss={self.policy_loss!r}, policy_loss_weights={self.policy_loss_weights}; set only "
                "policy_loss (and policy_loss_weights)"
            )
        self.policy_loss = trl_types[0] if len(trl_types) == 1 else trl_types
        self.policy_loss_weights = theirs_w

    def validate_haf(self) -> None:
        """``ValueError`` naming the first field of a combination the HaF loss cannot honour."""

        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"HafConfig.{name}: expected {expected}, got {getattr(self, name)!r}")

        for name in ("alpha", "reward_weight", "beta"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise bad(name, "a finite number >= 0")
        if self.alpha == 0 and self.reward_weight == 0:
            raise ValueError("HafConfig: alpha and reward_weight are both 0, so the loss has no term")
        try:
            objectives.combination(self.policy_loss)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"HafConfig.policy_loss: {exc}") from None
        try:
            plan = objectives.combination(self.policy_loss, self.policy_loss_weights)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"HafConfig.policy_loss_weights: {exc}") from None
        if any(o.needs_label_smoothing for o, _ in plan) and self.label_smoothing == 0:
            raise bad("label_smoothing", "> 0 for policy_loss exo_pair (EXO's epsilon; the paper: 1e-3)")
        if self.reference_mode not in ("auto", "copy", "lora", "none"):
            raise bad("reference_mode", "'auto', 'copy', 'lora' or 'none'")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise bad("label_smoothing", "a number in [0, 0.5)")
        if self.center_rewards_coefficient is not None and self.center_rewards_coefficient < 0:
            raise bad("center_rewards_coefficient", "None or a number >= 0")
        for name, default in (("ld_alpha", None), ("f_divergence_type", "reverse_kl"), ("use_weighting", False)):
            if getattr(self, name) != default:
                raise bad(name, f"{default!r} (TRL-loss option not supported by HafTrainer)")
        if self.truncation_mode != "keep_start":
            raise bad(
                "truncation_mode", "'keep_start' (the reward contract keeps the prompt's end and the response's start)"
            )
        if self.max_length is not None and self.max_length < 2:
            raise bad("max_length", "None or an int >= 2")
        if self.max_prompt_length is not None and (
            self.max_length is None or not 0 < self.max_prompt_length < self.max_length
        ):
            raise bad("max_prompt_length", f"None or 0 < max_prompt_length < max_length ({self.max_length})")
        if self.reference_mode == "none" and self.precompute_ref_log_probs:
            raise ValueError("HafConfig: precompute_ref_log_probs=True needs a reference, but reference_mode='none'")
        if self.reference_free and self.reference_mode in ("copy", "lora"):
            raise ValueError(
                f"HafConfig.reference_mode: policy_loss={self.policy_loss!r} is reference-free, so reference_mode "
                f"must be 'auto' or 'none', got {self.reference_mode!r}"
            )

    @property
    def prompt_limit(self) -> int | None:
        """Prompt tokens kept: ``max_prompt_length``, else 3/4 of ``max_length`` (``None``: no truncation)."""
        if self.max_length is None:
            return None
        return self.max_prompt_length if self.max_prompt_length is not None else max(1, self.max_length * 3 // 4)

    @property
    def length_averaged(self) -> bool:
        """Whether the loss works on per-token mean log-probs (``average_log_prob`` or a length-averaged objective)."""
        return objectives.uses_means(self.policy_loss, self.average_log_prob)

    @property
    def reference_free(self) -> bool:
        """Whether an objective of ``policy_loss`` refuses reference log-probs (``simpo``): no reference then."""
        return any(o.reference_free for o, _ in objectives.combination(self.policy_loss))


# ---------------------------------------------------------------------------------------------- reward contract
def tokenize_preference_row(
    row: Mapping[str, Any], tokenizer: Any, *, max_length: int | None = None, max_prompt_length: int | None = None
) -> dict[str, Any]:
    """One TRL preference row → ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` and the EOS targets
    ``chosen_end`` / ``rejected_end`` (the EOS id, or -100: none or truncated), under the reward contract
    (``haf_kernels.contract``: ``preference_texts`` then ``tokenize_preference``, as ``training.data`` does).

    ``prompt_ids + chosen_ids`` are the ids of ``tokenizer(prompt + chosen)`` (truncated as the module docstring
    says; ``max_prompt_length None``: 3/4 of ``max_length``); the reward is read at their last token. ``ValueError``
    names what is wrong with an unusable row.
    """
    prompt, chosen, rejected, chat = contract.preference_texts(row, tokenizer)
    limit = max_prompt_length
    if max_length is not None and limit is None:
        limit = max(1, max_length * 3 // 4)
    pair = contract.tokenize_preference(
        tokenizer, prompt, chosen, rejected, conversational=chat, max_length=max_length, max_prompt_length=limit
    )
    ends = [IGNORE_INDEX if e is None else e for e in pair.end_labels]
    return {
        "prompt_ids": pair.prompt_ids,
        "chosen_ids": pair.chosen_ids,
        "rejected_ids": pair.rejected_ids,
        "chosen_end": ends[0],
        "rejected_end": ends[1],
    }


@dataclass
class HafPreferenceCollator:
    """Right-padded ``[2B, T]`` batches (rows ``0..B-1`` chosen) of ``tokenize_preference_row`` outputs.

    Returns ``input_ids``, ``attention_mask`` and ``labels`` (``haf_kernels.contract.pad_pairs``: next-token targets
    of the response, ``labels[t] = input_ids[t + 1]``, the EOS target at the last position, -100 elsewhere), plus
    ``ref_chosen_logps`` / ``ref_rejected_logps`` [B] when the rows carry them (precomputed). ``tokenizer`` gives the
    pad id at call time.
    """

    tokenizer: Any
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pad = self.tokenizer.pad_token_id
        ends = [
            tuple(
                None if e.get(k, IGNORE_INDEX) in (None, IGNORE_INDEX) else int(e[k])
                for k in ("chosen_end", "rejected_end")
            )
            for e in examples
        ]
        ids, mask, labels = contract.pad_pairs(
            [e["prompt_ids"] for e in examples],
            [e["chosen_ids"] for e in examples],
            [e["rejected_ids"] for e in examples],
            ends,
            0 if pad is None else pad,
            IGNORE_INDEX,
            self.pad_to_multiple_of or 1,
        )
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                out[key] = torch.tensor([float(e[key]) for e in examples], dtype=torch.float32)
        return out


# ---------------------------------------------------------------------------------------------- model plumbing
def attach_reward_head(model: nn.Module, weight: torch.Tensor | None = None, seed: int = 0) -> nn.Linear:
    """The reward head ``score = Linear(D, 1, bias=False)`` of a transformers causal LM (added if missing).

    A new head is ``N(0, 1/D)`` from ``seed`` (or ``weight [1, D]``), on the LM head's device and dtype; the config
    gets ``num_labels = 1`` so the saved folder loads with ``AutoModelForSequenceClassification``.
    """
    w = model.get_output_embeddings()
    w = getattr(w, "base_layer", w).weight
    dim = w.shape[1]
    head = getattr(model, REWARD_HEAD, None)
    if head is not None:
        if not isinstance(head, nn.Linear) or tuple(head.weight.shape) != (1, dim) or head.bias is not None:
            raise ValueError(
                f"model.{REWARD_HEAD} must be a bias-free Linear({dim}, 1) reward head, got {head!r}; remove it or "
                "pass a model without one"
            )
    else:
        head = nn.Linear(dim, 1, bias=False, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            if weight is None:
                gen = torch.Generator(device="cpu").manual_seed(seed)
                head.weight.copy_(torch.randn(1, dim, generator=gen, dtype=torch.float32) / dim**0.5)
            else:
                if tuple(weight.shape) != (1, dim):
                    raise ValueError(f"weight must be [1, {dim}], got {list(weight.shape)}")
                head.weight.copy_(weight)
        setattr(model, REWARD_HEAD, head)
    head.weight.requires_grad_(True)
    model.config.num_labels = 1
    return head


def _install_haf_forward(lm: nn.Module) -> None:
    """Let ``lm(..., haf_compute=fn)`` run the decoder body and return ``fn(hidden [S, T, D], lm)``.

    The loss runs inside the model's forward (as TRL's fused LM head does), so DDP / autocast wrappers around the
    forward see it; without ``haf_compute`` the forward is the previous one."""
    if getattr(lm, "_haf_forward", False):
        return
    previous = lm.forward

    def forward(self, *args, haf_compute=None, **kwargs):
        if haf_compute is None:
            return previous(*args, **kwargs)
        for key in ("labels", "output_attentions", "output_hidden_states", "return_dict", "num_items_in_batch"):
            kwargs.pop(key, None)
        kwargs["use_cache"] = False
        out = self.base_model(*args, **kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return haf_compute(hidden, self)

    lm.forward = types.MethodType(forward, lm)
    lm._haf_forward = True


def _lm_head(lm: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = lm.get_output_embeddings()
    head = getattr(head, "base_layer", head)
    return head.weight, getattr(head, "bias", None)


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    dev = hidden.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


# ---------------------------------------------------------------------------------------------- trainer
class HafTrainer(DPOTrainer):
    """``trl.DPOTrainer`` that trains a HaF reward model with ``haf_kernels.fused_haf_loss``.

    Same arguments as ``DPOTrainer`` (``model``: a causal LM instance, name or path, or a ``PeftModel``;
    ``peft_config`` for LoRA), with ``args`` a ``HafConfig`` (a plain ``DPOConfig`` is taken with the HaF defaults).
    ``reward_head``: an optional ``[1, D]`` initial weight of the reward head. ``trainer.reward(input_ids,
    attention_mask)`` scores ``[S, T]`` right-padded rows; ``export_reward_model(dir)`` writes the folder that
    ``AutoModelForSequenceClassification`` and ``AutoModelForCausalLM`` load.
    """

    _tag_names = ["trl", "haf", "reward-model"]
    _name = "HaF"

    def __init__(
        self,
        model: Any,
        ref_model: nn.Module | None = None,
        args: DPOConfig | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        *,
        reward_head: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            args = HafConfig(f"{name.rstrip('/').split('/')[-1]}-HaF")
        if not isinstance(args, HafConfig):
            if not isinstance(args, DPOConfig):
                raise TypeError(f"HafTrainer: args must be a HafConfig or DPOConfig, got {type(args).__name__}")
            args = _to_haf_config(args)
        args.validate_haf()
        if processing_class is None:
            from transformers import AutoTokenizer

            name = model if isinstance(model, str) else model.config._name_or_path
            processing_class = AutoTokenizer.from_pretrained(name)
        peft_config = kwargs.get("peft_config")
        peft = peft_config is not None or (not isinstance(model, str) and _is_peft(model))
        mode = args.reference_mode
        if mode == "auto":
            reference_free = args.reference_free or args.alpha == 0
            mode = "none" if reference_free else "model" if ref_model is not None else "lora" if peft else "copy"
        if mode == "none" and ref_model is not None:
            raise ValueError(
                "HafTrainer: ref_model was given, but the loss is reference-free (reference_mode='none', "
                "policy_loss='simpo' or alpha=0)"
            )
        if mode == "none" and args.precompute_ref_log_probs:
            raise ValueError(
                "HafTrainer: precompute_ref_log_probs=True, but the loss is reference-free (reference_mode='none', "
                "policy_loss='simpo' or alpha=0)"
            )
        if mode == "lora" and ref_model is not None:
            raise ValueError("HafTrainer: reference_mode='lora' (adapter disabled) and a ref_model; pass one of them")
        if mode == "lora" and not peft:
            raise ValueError("HafTrainer: reference_mode='lora' needs a PEFT model or peft_config (adapter disabled)")
        if mode == "copy" and peft:
            raise ValueError("HafTrainer: reference_mode='copy' with a PEFT model; use 'lora' (adapter disabled)")
        if mode == "copy" and ref_model is None and not isinstance(model, str) and not args.precompute_ref_log_probs:
            ref_model = copy.deepcopy(model).eval()  # the initial weights, frozen (TRL would reload from disk)
            for p in ref_model.parameters():
                p.requires_grad_(False)
        self.haf_reference = mode
        if data_collator is None:
            multiple = args.pad_to_multiple_of if isinstance(args.pad_to_multiple_of, int) else None
            data_collator = HafPreferenceCollator(processing_class, pad_to_multiple_of=multiple)
        if args.padding_free:
            raise ValueError("HafConfig.padding_free: expected False (HafTrainer pads), got True")
        self._haf_datasets_prepared = False
        with self._no_reference_load() if mode == "none" else contextlib.nullcontext():
            super().__init__(
                model,
                ref_model=ref_model,
                args=args,
                data_collator=data_collator,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                **kwargs,
            )
        if self._is_vision_dataset:
            raise ValueError("HafTrainer: vision-language preference data is not supported")
        lm = self._lm(self.model)
        attach_reward_head(lm, reward_head, seed=args.seed + 1)
        _install_haf_forward(lm)
        if self.ref_model is not None:
            _install_haf_forward(self._lm(self.ref_model))

    # ------------------------------------------------------------------ plumbing
    @contextlib.contextmanager
    def _no_reference_load(self):
        """Reference-free: keep ``DPOTrainer.__init__`` from loading a reference model from the policy's path (it
        loads the policy itself, when given by name, before the datasets are prepared; the reference after)."""
        from trl.trainer import dpo_trainer

        original = dpo_trainer.create_model_from_path

        def create(path: str, **kw: Any):
            return None if self._haf_datasets_prepared else original(path, **kw)

        dpo_trainer.create_model_from_path = create
        try:
            yield
        finally:
            dpo_trainer.create_model_from_path = original

    def _lm(self, model: nn.Module) -> nn.Module:
        """The transformers causal LM under accelerate / DDP and PEFT wrappers."""
        m = self.accelerator.unwrap_model(model) if hasattr(self, "accelerator") else model
        return m.get_base_model() if _is_peft(m) else m

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        """Tokenise TRL preference rows under the reward contract (``tokenize_preference_row``)."""
        import datasets

        self._haf_datasets_prepared = True
        first = next(iter(dataset))
        if "chosen_end" in first and "prompt_ids" in first:
            return dataset  # already prepared
        tok = getattr(processing_class, "tokenizer", processing_class)
        limit = args.prompt_limit if isinstance(args, HafConfig) else None

        def tokenize(row: dict, idx: int) -> dict:
            try:
                return tokenize_preference_row(row, tok, max_length=args.max_length, max_prompt_length=limit)
            except ValueError as exc:
                raise ValueError(f"{dataset_name} dataset: row {idx}: {exc}") from None

        kw: dict[str, Any] = {"with_indices": True}
        if isinstance(dataset, datasets.Dataset):  # IterableDataset.map takes neither
            kw.update(num_proc=args.dataset_num_proc, desc=f"Tokenizing {dataset_name} dataset (reward contract)")
        return dataset.map(tokenize, **kw)

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = [
                "prompt_ids",
                "chosen_ids",
                "rejected_ids",
                "chosen_end",
                "rejected_end",
                "ref_chosen_logps",
                "ref_rejected_logps",
            ]

    def _sequence_logps_fn(self, labels: torch.Tensor):
        def compute(hidden: torch.Tensor, lm: nn.Module):
            w, b = _lm_head(lm)
            dt = _compute_dtype(hidden, w)
            scale, softcap = contract.head_transform(lm.config)
            return sequence_logprobs(
                hidden.to(dt),
                w.to(dt),
                labels,
                bias=None if b is None else b.to(dt),
                logit_scale=scale,
                softcap=softcap,
                backend=self.args.haf_backend,
            )

        return compute

    @torch.no_grad()
    def compute_ref_log_probs(self, model: nn.Module, inputs: dict[str, torch.Tensor]):
        """Reference sequence log-prob sums ``(chosen [B], rejected [B])`` of one batch, fused (no logits)."""
        ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
        unwrapped = self.accelerator.unwrap_model(model)
        _install_haf_forward(self._lm(unwrapped))
        ctx: Any = contextlib.nullcontext()
        if _is_peft(unwrapped) and self.ref_model is None:  # the policy with its adapter disabled (or TRL's "ref")
            from trl.trainer.utils import use_adapter

            ctx = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        target = model
        was_training = target.training
        target.eval()  # as haf-train: dropout off for the reference pass
        try:
            with ctx:
                sums, _ = target(input_ids=ids, attention_mask=mask, haf_compute=self._sequence_logps_fn(labels))
        finally:
            target.train(was_training)
        return sums.float().chunk(2, dim=0)

    def _reference_logps(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """``ref_logps [2B]`` for ``fused_haf_loss`` (sums, or per-token means when the loss averages)."""
        if self.haf_reference == "none":
            return None
        if self.precompute_ref_logps:
            chosen, rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            chosen, rejected = self.compute_ref_log_probs(self.ref_model or self.model, inputs)
        sums = torch.cat([chosen, rejected]).to(inputs["labels"].device).float()
        counts = (inputs["labels"] != IGNORE_INDEX).sum(dim=1)
        return objectives.sequence_logps(sums, counts, self.args.length_averaged)

    def haf_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor]):
        """``(HafLossOutput, rewards [2B])`` of one batch: the model's forward + ``fused_haf_loss``."""
        args: HafConfig = self.args
        if "labels" not in inputs:
            raise ValueError(
                f"HafTrainer: the batch has no 'labels' (keys {sorted(inputs)}); use HafPreferenceCollator "
                "(the default data_collator), which adds the next-token and EOS targets"
            )
        labels, mask = inputs["labels"], inputs["attention_mask"]
        ref = self._reference_logps(inputs)

        def compute(hidden: torch.Tensor, lm: nn.Module):
            head = getattr(lm, REWARD_HEAD)
            idx = contract.last_token_index(mask)
            features = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
            rewards = head(features.to(head.weight.dtype)).squeeze(-1)
            w, b = _lm_head(lm)
            dt = _compute_dtype(hidden, w)
            scale, softcap = contract.head_transform(lm.config)
            res = fused_haf_loss(
                hidden.to(dt),
                w.to(dt),
                labels,
                rewards.float(),
                ref,
                beta=args.beta,
                alpha=args.alpha,
                reward_weight=args.reward_weight,
                policy_loss=args.policy_loss,
                policy_loss_weights=args.policy_loss_weights,
                simpo_gamma=args.simpo_gamma,
                discopop_tau=args.discopop_tau,
                average_log_prob=args.average_log_prob,
                label_smoothing=args.label_smoothing,
                center_rewards_coefficient=args.center_rewards_coefficient or 0.0,
                lm_head_bias=None if b is None else b.to(dt),
                logit_scale=scale,
                softcap=softcap,
                backend=args.haf_backend,
            )
            return res, rewards

        return model(input_ids=inputs["input_ids"], attention_mask=mask, haf_compute=compute)

    def _compute_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool):
        mode = "train" if self.model.training else "eval"
        res, rewards = self.haf_loss(model, inputs)
        b = rewards.shape[0] // 2
        r = rewards.detach()
        terms = {
            "loss/reward": res.reward_loss,
            "loss/policy": res.policy_loss,
            "rewards/chosen": r[:b],
            "rewards/rejected": r[b:],
            "rewards/accuracies": (r[:b] > r[b:]).float(),
            "rewards/margins": r[:b] - r[b:],
            "implicit/accuracies": (res.implicit_margin.detach() > 0).float(),
            "implicit/margins": res.implicit_margin,
            "logps/chosen": res.chosen_logps,
            "logps/rejected": res.rejected_logps,
        }
        terms = {k: v.detach().float().mean() for k, v in terms.items() if v is not None}
        means = torch.stack([*terms.values(), inputs["attention_mask"].sum().float()])
        gathered = self.accelerator.gather(means).reshape(-1, means.numel())  # [processes, terms]
        values = gathered.mean(0).tolist()  # one host sync per step for all the metrics
        metrics = self._metrics[mode]
        for name, value in zip(terms, values):
            metrics[name].append(value)
        if mode == "train":
            self._total_train_tokens += int(gathered[:, -1].sum().item()) // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        if return_outputs:
            return res.loss, {"rewards_chosen": r[:b], "rewards_rejected": r[b:]}
        return res.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Eval: the loss, and the reward-head scores ``[B, 2]`` (chosen, rejected) with labels ``[B]`` of zeros."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, out = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        logits = torch.stack([out["rewards_chosen"], out["rewards_rejected"]], dim=1)
        return loss.detach(), logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)

    # ------------------------------------------------------------------ scoring and saving
    @torch.no_grad()
    def reward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Reward-head scores ``[S]`` of right-padded rows ``input_ids [S, T]`` (the last non-padding token)."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        lm = self._lm(self.model)
        model = self.accelerator.unwrap_model(self.model)

        def compute(hidden: torch.Tensor, m: nn.Module) -> torch.Tensor:
            head = getattr(m, REWARD_HEAD)
            feats = hidden[torch.arange(hidden.shape[0], device=hidden.device), contract.last_token_index(mask)]
            return head(feats.to(head.weight.dtype)).squeeze(-1).float()

        dev = lm.get_output_embeddings().weight.device
        was_training = model.training
        model.eval()
        try:
            return model(input_ids=input_ids.to(dev), attention_mask=mask.to(dev), haf_compute=compute)
        finally:
            model.train(was_training)

    def reward_contract(self) -> dict[str, Any]:
        """What scoring needs to reproduce training (``haf_reward.json``), as ``training.data.reward_contract``."""
        record = contract.reward_contract(
            self._tokenizer, max_length=self.args.max_length, max_prompt_length=self.args.prompt_limit
        )
        return {**record, "trainer": "haf_kernels.integrations.trl.HafTrainer"}

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """``Trainer._save`` (model, tokenizer), with the training arguments as ``training_args.json`` instead of
        its ``training_args.bin`` (a pickle of the arguments object: code to whoever loads it), plus
        ``haf_reward.json`` and, for PEFT, ``reward_head.safetensors``."""
        super()._save(output_dir, state_dict)
        out = Path(output_dir if output_dir is not None else self.args.output_dir)
        if self.args.should_save:  # Trainer never reads training_args.bin back (resume reads trainer_state.json)
            from transformers.trainer import TRAINING_ARGS_NAME

            (out / TRAINING_ARGS_NAME).unlink(missing_ok=True)
            (out / TRAINING_ARGS_JSON).write_text(self.args.to_json_string(), encoding="utf-8")
        (out / "haf_reward.json").write_text(json.dumps(self.reward_contract(), indent=2) + "\n", encoding="utf-8")
        if _is_peft(self.accelerator.unwrap_model(self.model)):  # the adapter files hold no reward head
            from safetensors.torch import save_file

            head = getattr(self._lm(self.model), REWARD_HEAD)
            save_file(
                {f"{REWARD_HEAD}.weight": head.weight.detach().cpu().contiguous()}, str(out / "reward_head.safetensors")
            )

    # ------------------------------------------------------------------ resume state without pickles
    def _plain_state(self) -> bool:
        """Whether the resume state is ``Trainer``'s own (one or more CPU / CUDA processes, no DeepSpeed / FSDP /
        SageMaker MP, whose libraries write their own files): then it is stored as JSON + safetensors."""
        from transformers.utils import is_sagemaker_mp_enabled

        return (
            self.args.device.type in ("cpu", "cuda")
            and not self.is_deepspeed_enabled
            and not self.is_fsdp_enabled
            and not is_sagemaker_mp_enabled()
        )

    def _rng_name(self) -> str:
        return "rng_state" if self.args.world_size <= 1 else f"rng_state_{self.args.process_index}"

    def _save_rng_state(self, output_dir: str) -> None:
        """The RNG states as ``rng_state.json`` (+ ``.safetensors``) instead of the pickled ``rng_state.pth``."""
        if not self._plain_state():
            return super()._save_rng_state(output_dir)
        import random

        import numpy as np
        from transformers.training_args import ParallelMode

        states: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "cpu": torch.random.get_rng_state(),
        }
        if torch.cuda.is_available():
            distributed = self.args.parallel_mode == ParallelMode.DISTRIBUTED
            states["cuda"] = torch.cuda.random.get_rng_state_all() if distributed else torch.cuda.random.get_rng_state()
        state_files.save_state(states, output_dir, self._rng_name())

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is None or not state_files.has_state(checkpoint, self._rng_name()):
            return super()._load_rng_state(checkpoint)  # Trainer's own files (or none: it logs that)
        import random

        import numpy as np
        from transformers.trainer_pt_utils import set_rng_state_for_device
        from transformers.training_args import ParallelMode

        states = state_files.load_state(checkpoint, self._rng_name())
        random.setstate(states["python"])
        np.random.set_state(states["numpy"])
        torch.random.set_rng_state(states["cpu"])
        if torch.cuda.is_available():
            distributed = self.args.parallel_mode == ParallelMode.DISTRIBUTED
            set_rng_state_for_device("CUDA", torch.cuda, states, distributed)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Optimizer and scheduler states as ``optimizer.json`` / ``scheduler.json`` (+ ``.safetensors``) instead of
        the pickled ``optimizer.pt`` / ``scheduler.pt``."""
        if not self._plain_state():
            return super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            state_files.save_state(self.optimizer.state_dict(), output_dir, "optimizer")
            state_files.save_state(self.lr_scheduler.state_dict(), output_dir, "scheduler")

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not (
            state_files.has_state(checkpoint, "optimizer") and state_files.has_state(checkpoint, "scheduler")
        ):
            return super()._load_optimizer_and_scheduler(checkpoint)
        # as Trainer: CPU first on one process (the optimizer moves its state to the parameters' device)
        multi = self.args.world_size > 1 and self.args.device.type != "cpu"
        self.optimizer.load_state_dict(
            state_files.load_state(checkpoint, "optimizer", self.args.device if multi else "cpu")
        )
        self.lr_scheduler.load_state_dict(state_files.load_state(checkpoint, "scheduler"))

    def _save_scaler(self, output_dir: str) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if not self._plain_state() or scaler is None:
            return super()._save_scaler(output_dir)
        if self.args.should_save:
            state_files.save_state(scaler.state_dict(), output_dir, "scaler")

    def _load_scaler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not state_files.has_state(checkpoint, "scaler"):
            return super()._load_scaler(checkpoint)
        self.accelerator.scaler.load_state_dict(state_files.load_state(checkpoint, "scaler"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """``Trainer``'s resume, plus the reward head of a PEFT checkpoint (kept beside the adapter)."""
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = Path(resume_from_checkpoint) / "reward_head.safetensors"
        if path.exists():
            from safetensors.torch import load_file

            head = getattr(self._lm(model if model is not None else self.model), REWARD_HEAD)
            with torch.no_grad():
                head.weight.copy_(load_file(str(path))[f"{REWARD_HEAD}.weight"].to(head.weight))

    def export_reward_model(self, output_dir: str) -> Path:
        """Write ``output_dir`` that ``AutoModelForSequenceClassification`` (reward = ``score``) and
        ``AutoModelForCausalLM`` (the policy) both load: the full model (a LoRA adapter merged into a copy),
        the tokenizer and ``haf_reward.json``. Returns the folder."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        if _is_peft(model):
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(str(out))
        self._tokenizer.save_pretrained(str(out))
        (out / "haf_reward.json").write_text(json.dumps(self.reward_contract(), indent=2) + "\n", encoding="utf-8")
        return out


def _to_haf_config(args: DPOConfig) -> HafConfig:
    """A ``HafConfig`` with the fields of a plain ``DPOConfig`` (HaF fields at their defaults)."""
    from dataclasses import fields

    values = {f.name: getattr(args, f.name) for f in fields(DPOConfig) if f.init}
    for key, value in list(values.items()):
        if hasattr(value, "to_dict") and key in ("accelerator_config",):
            values[key] = value.to_dict()
    return HafConfig(**values)
