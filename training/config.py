"""Training configuration: one flat dataclass, a YAML/JSON config file, and ``--key value`` CLI overrides.

Precedence: dataclass defaults < config file (``--config path.yaml``) < command-line flags. Booleans take
``--flag`` / ``--no-flag`` or ``--flag true|false``; lists take comma-separated values.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from haf_kernels import objectives

from .errors import UserError


@dataclass
class TrainConfig:
    # ---- I/O
    run_dir: str = "runs/haf"
    train_data: str = ""  # .jsonl/.json/.parquet/.csv, a load_from_disk folder, or a hub name
    eval_data: str = ""  # held-out split; empty: hold out eval_fraction of train_data
    eval_fraction: float = 0.1
    train_split: str = "train"
    eval_split: str = "test"
    skip_bad_rows: bool = False
    max_train_rows: int = 0  # 0: all
    max_eval_rows: int = 0
    # ---- model
    model: str = ""  # pretrained name/path; empty: build from model_type + model_config
    model_type: str = "llama"
    model_config: dict = field(default_factory=dict)  # overrides for a from-config (random init) model
    tokenizer: str = ""  # name/path; "synthetic": the synthetic task's word-level tokenizer
    gradient_checkpointing: bool = False
    # ---- fine-tuning: LoRA or full
    lora_r: int = 0  # 0: full fine-tune
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    # module names, or per architecture (training/lora.py): auto (peft's default for the model type, else every
    # linear/Conv1D layer of the body) | mlp (the MLP projections, e.g. gate/up/down_proj, GPT-2 c_fc + mlp.c_proj)
    # | all-linear; never the LM head or the reward head
    lora_target_modules: list = field(default_factory=lambda: ["auto"])
    # ---- reference model: "auto" (lora with LoRA, precomputed otherwise) | lora | copy | precomputed | none
    reference: str = "auto"
    ref_cache_dir: str = ""  # empty: <run_dir>/ref_cache
    # ---- loss (haf_kernels.fused_haf_loss)
    beta: float = 0.1
    alpha: float = 0.2
    reward_weight: float = 1.0
    # haf_kernels.objectives names (TRL's loss_type): one, a list or "a,b,c"; e.g. sigmoid | hinge | ipo | robust
    # | exo_pair | nca_pair | bco_pair | sppo_hard | aot | aot_unpaired | apo_zero | apo_down | discopop | sft
    # | sigmoid_norm | simpo
    policy_loss: str | list = "sigmoid"
    policy_loss_weights: list = field(default_factory=list)  # one weight per policy_loss name (TRL's loss_weights)
    simpo_gamma: float = 0.0
    discopop_tau: float = 0.05  # τ of discopop
    average_log_prob: bool = False
    label_smoothing: float = 0.0
    center_rewards_coefficient: float = 0.0  # c: adds c · mean((r_c + r_r)²) (TRL's reward centering); 0: off
    margin_column: str = ""  # per-pair column subtracted in the BT term (e.g. "margin" or "strength")
    margin_scale: float = 1.0  # λ: margin = λ · column
    weight_column: str = ""  # per-pair column used as pair weights (e.g. "weight")
    backend: str = "auto"
    # ---- RM methods of Secrets of RLHF II (training/methods/; all off by default)
    noisy_mode: str = ""  # "" | flip | drop | soft: treat low-strength pairs (needs strength_column, haf-strength)
    noisy_fraction: float = 0.1  # select the lowest fraction by strength ...
    noisy_threshold: float = float("nan")  # ... or, when set, every pair with strength < threshold
    noisy_soft_mode: str = "smooth"  # soft: "smooth" (per-pair label smoothing) | "weight" (down-weight)
    noisy_soft_epsilon: float = 0.3  # soft/smooth: per-pair ε of the selected pairs
    noisy_soft_weight: float = 0.5  # soft/weight: pair weight of the selected pairs
    strength_column: str = "strength_mean"
    adaptive_margin: float = 0.0  # λ > 0: BT margin = λ · strength_column (0: off)
    contrastive: str = ""  # "" | simcse | swav: auxiliary loss on the reward head's input features
    contrastive_on: str = "pair"  # pair: {f_c, f_r} | diff: {f_c − f_r, f_r − f_c}
    contrastive_weight: float = -1.0  # < 0: paper default (SimCSE 1; SwAV 0.1 on pairs, 0.5 on differences)
    contrastive_temperature: float = -1.0  # <= 0: default (SimCSE 0.05, SwAV 0.1)
    contrastive_prototypes: int = 0  # SwAV K; 0: paper default (50 on pairs, 20 on differences)
    contrastive_dropout: float = 0.05  # dropout of the two views
    metarm_data: str = ""  # MetaRM: jsonl of {prompt, responses: [k strings]} from the shifted policy
    metarm_k: int = 4  # responses per prompt used in J
    metarm_inner_lr: float = 0.1  # η of the inner ascent θ' = θ + η∇J
    metarm_prompts: int = 8  # shifted prompts per step
    metarm_first_order: bool = False  # drop the Hessian term of the meta-gradient
    # ---- data / batching
    max_length: int = 1024  # prompt + response tokens (the reward contract's truncation; see training/data.py)
    max_prompt_length: int = 768  # room for multi-turn (HH-style) prompts; responses keep >= 256 tokens
    batch_size: int = 32  # pairs per optimiser step, over all processes and accumulation steps
    micro_batch_size: int = 8  # pairs per forward, per process
    eval_batch_size: int = 32
    # sequence packing: several sequences per row of the model body (per-sequence position_ids, no attention across
    # sequences; sdpa / eager attention); the loss and rewards are those of the unpacked batch (training/data.py)
    pack: bool = False
    pack_length: int = 0  # tokens per packed row; 0: max_length (must be >= max_length: any sequence fits)
    # ---- optimisation
    lr: float = 1e-5
    head_lr: float = 0.0  # reward-head learning rate; 0: same as lr
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    warmup_steps: int = 0
    max_steps: int = 0  # 0: epochs × steps per epoch
    epochs: float = 1.0
    min_lr_ratio: float = 0.1  # cosine decays to lr · min_lr_ratio
    grad_clip: float = 1.0
    seed: int = 0
    nonfinite: str = "stop"  # a non-finite loss or gradient: stop (error naming the step) | skip (drop the update)
    nonfinite_max_skips: int = 10  # skip: stop anyway after this many consecutive skipped steps
    check_finite_steps: int = 10  # loss inputs checked for NaN/Inf in the first N steps (single process); 0: off
    # ---- system
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    distributed: str = "auto"  # auto (ddp under torchrun) | ddp | fsdp | none
    num_threads: int = 0  # torch.set_num_threads on CPU; 0: leave
    # ---- logging, eval, checkpoints
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    save_every: int = 0  # 0: only at the end
    # False: start fresh | True (--resume): continue from <run_dir>/checkpoint.pt, an error if there is none
    # | "auto": continue if a checkpoint exists, else start fresh
    resume: bool = False
    progress: bool = True
    tensorboard: bool = True
    plots: bool = True
    export: bool = False  # save_pretrained a sequence classifier + policy LM under <run_dir>/export
    debug_step_sleep: float = 0.0  # seconds slept per step (tests: lets a run be killed mid-way)

    # ------------------------------------------------------------------ helpers
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """A config from a mapping; every unknown key and badly typed value is reported at once (``ConfigError``)."""
        cfg, problems = _from_dict(cls, d)
        if problems:
            raise ConfigError([f"{k}: {m}" for k, m in problems])
        return cfg

    def replace(self, **kw: Any) -> TrainConfig:
        return dataclasses.replace(self, **kw)

    def validate(self, *, need_data: bool = False) -> TrainConfig:
        """Check every value (types, ranges, choices, paths, consistency) before any work is done.

        Raises ``ConfigError`` listing all problems, one line each, starting with the key. ``need_data``: the
        config is about to train: ``train_data`` is required, local paths must exist, ``resume: true`` needs a
        checkpoint (``train`` and ``haf-train`` pass it; without it a config only has to parse and be consistent).
        """
        problems = self.problems(need_data=need_data)
        if problems:
            raise ConfigError([f"{k}: {m}" for k, m in problems])
        return self

    def problems(self, *, need_data: bool = False) -> list[tuple[str, str]]:
        """``(key, message)`` for every invalid value (empty: valid)."""
        out: list[tuple[str, str]] = []
        typ_bad = set()
        for f in dataclasses.fields(self):
            msg = _type_problem(type(self), f.name, getattr(self, f.name))
            if msg:
                out.append((f.name, msg))
                typ_bad.add(f.name)

        def bad(key: str, msg: str) -> None:
            if key not in typ_bad:
                out.append((key, msg))

        def get(key: str) -> Any:
            return getattr(self, key)

        def choice(key: str, options: tuple[str, ...]) -> None:
            if get(key) not in options:
                shown = "|".join(o if o else '""' for o in options)
                bad(key, f"must be one of {shown}, got {get(key)!r}")

        def num(key: str, lo: float | None = None, hi: float | None = None, *, lo_open=False, hi_open=False) -> None:
            v = get(key)
            if key in typ_bad:
                return
            if isinstance(v, float) and not math.isfinite(v):
                bad(key, f"must be finite, got {v}")
                return
            allowed = "" if lo is None or hi is None else _range(lo, hi, lo_open, hi_open)
            if lo is not None and (v <= lo if lo_open else v < lo):
                bad(key, f"must be {'>' if lo_open else '>='} {lo}, got {v}{allowed}")
            elif hi is not None and (v >= hi if hi_open else v > hi):
                bad(key, f"must be {'<' if hi_open else '<='} {hi}, got {v}{allowed}")

        def path(key: str, *, required: bool = False, what: str = "file or folder") -> None:
            v = get(key)
            if key in typ_bad:
                return
            if not v:
                if required:
                    bad(key, "required (a .jsonl/.json/.parquet/.csv file, a load_from_disk folder or a hub name)")
                return
            if need_data and _looks_local(v) and not Path(v).expanduser().exists():
                bad(key, f"no such {what}: {v!r}")

        # ---- I/O and data
        if not self.run_dir:
            bad("run_dir", "must not be empty")
        path("train_data", required=need_data)
        path("eval_data")
        if not self.eval_data:
            num("eval_fraction", 0.0, 1.0, lo_open=True, hi_open=True)
        num("max_train_rows", 0)
        num("max_eval_rows", 0)
        # ---- model and tokenizer (a run directory keeps a copy of both for resuming: base_model/)
        saved_base = self.resume is not False and (Path(self.run_dir) / "base_model" / "config.json").exists()
        if self.model and not saved_base:
            path("model", what="model folder")
        if not self.model and not self.model_type:
            bad("model_type", "required when model is empty (a from-config model)")
        if self.tokenizer not in ("", "synthetic") and not saved_base:
            path("tokenizer", what="tokenizer folder")
        # ---- LoRA
        num("lora_r", 0)
        if "lora_r" not in typ_bad and self.lora_r > 0:
            num("lora_alpha", 0, lo_open=True)
            num("lora_dropout", 0.0, 1.0, hi_open=True)
        choice("reference", ("auto", "lora", "copy", "precomputed", "none"))
        if self.reference == "lora" and "lora_r" not in typ_bad and self.lora_r <= 0:
            bad("reference", "reference='lora' needs lora_r > 0 (the reference is the model with its adapter off)")
        # ---- loss
        num("beta", 0.0, lo_open=True)
        num("alpha", 0.0)
        num("reward_weight", 0.0)
        if not typ_bad & {"alpha", "reward_weight"} and self.alpha == 0 and self.reward_weight == 0:
            bad("reward_weight", "alpha and reward_weight are both 0: the loss would be 0")
        self._check_policy_loss(bad, typ_bad)
        num("simpo_gamma")
        num("discopop_tau", 0.0, lo_open=True)
        num("label_smoothing", 0.0, 0.5, hi_open=True)
        num("center_rewards_coefficient", 0.0)
        if self.center_rewards_coefficient and self.reward_weight == 0 and "reward_weight" not in typ_bad:
            bad("center_rewards_coefficient", "centres the reward head's scores: needs reward_weight > 0")
        num("margin_scale")
        from haf_kernels.backends import BACKENDS

        choice("backend", ("auto", *BACKENDS))
        # ---- RM methods
        choice("noisy_mode", ("", "flip", "drop", "soft"))
        num("noisy_fraction", 0.0, 1.0)
        choice("noisy_soft_mode", ("smooth", "weight"))
        num("noisy_soft_epsilon", 0.0, 0.5)
        num("noisy_soft_weight", 0.0, 1.0)
        num("adaptive_margin", 0.0)
        if (
            self.noisy_mode or (self.adaptive_margin if "adaptive_margin" not in typ_bad else 0)
        ) and not self.strength_column:
            bad("strength_column", "required by noisy_mode / adaptive_margin")
        if self.noisy_mode and "noisy_mode" not in typ_bad:
            if not self.eval_data:
                bad("eval_data", "required with noisy_mode (the training file is rewritten; soft mode adds rows)")
        choice("contrastive", ("", "simcse", "swav"))
        choice("contrastive_on", ("pair", "diff"))
        num("contrastive_prototypes", 0)
        num("contrastive_dropout", 0.0, 1.0, hi_open=True)
        path("metarm_data", what="file")
        if self.metarm_data:
            num("metarm_k", 2)
            num("metarm_inner_lr", 0.0, lo_open=True)
            num("metarm_prompts", 1)
        # ---- lengths and batches
        num("max_length", 2)
        num("max_prompt_length", 1)
        if not typ_bad & {"max_length", "max_prompt_length"} and self.max_prompt_length >= self.max_length:
            bad(
                "max_prompt_length",
                f"must be < max_length ({self.max_prompt_length} >= {self.max_length}): responses need room",
            )
        num("batch_size", 1)
        num("micro_batch_size", 1)
        num("eval_batch_size", 1)
        num("pack_length", 0)
        if self.pack is True and not typ_bad & {"pack_length", "max_length"} and 0 < self.pack_length < self.max_length:
            bad(
                "pack_length",
                f"must be 0 or >= max_length ({self.max_length}) so any sequence fits, got {self.pack_length}",
            )
        if (
            not typ_bad & {"batch_size", "micro_batch_size"}
            and self.batch_size > 0
            and self.micro_batch_size > 0
            and self.batch_size % self.micro_batch_size
        ):
            bad(
                "batch_size",
                f"must be a multiple of micro_batch_size ({self.batch_size} % {self.micro_batch_size} != 0): "
                "gradient accumulation runs whole micro-batches",
            )
        # ---- optimisation
        num("lr", 0.0, lo_open=True)
        num("head_lr", 0.0)
        num("weight_decay", 0.0)
        num("adam_beta1", 0.0, 1.0, hi_open=True)
        num("adam_beta2", 0.0, 1.0, hi_open=True)
        num("warmup_steps", 0)
        num("max_steps", 0)
        if "max_steps" not in typ_bad and self.max_steps == 0:
            num("epochs", 0.0, lo_open=True)
        num("min_lr_ratio", 0.0, 1.0)
        num("grad_clip", 0.0)
        num("seed", 0)
        choice("nonfinite", ("stop", "skip"))
        num("nonfinite_max_skips", 1)
        num("check_finite_steps", 0)
        # ---- system
        choice("device", ("auto", "cpu", "cuda"))
        choice("dtype", ("auto", "bf16", "fp32"))
        choice("distributed", ("auto", "ddp", "fsdp", "none"))
        num("num_threads", 0)
        # ---- logging, eval, checkpoints
        num("log_every", 1)
        num("eval_every", 0)
        num("save_every", 0)
        num("debug_step_sleep", 0.0)
        if need_data and "resume" not in typ_bad and self.resume is True and self.run_dir:
            ckpt = Path(self.run_dir) / "checkpoint.pt"
            if not ckpt.exists():
                bad(
                    "resume",
                    f"no checkpoint to resume from at {ckpt}: drop --resume to start fresh, or use --resume auto "
                    "(resume when a checkpoint exists, else start fresh)",
                )
        return out

    def _check_policy_loss(self, bad: Any, typ_bad: set[str]) -> None:
        """``policy_loss`` names, ``policy_loss_weights`` and what the named objectives need of other keys."""
        if "policy_loss" in typ_bad:
            return
        value = self.policy_loss
        if isinstance(value, str) and "," not in value and value not in objectives.names():
            if value not in objectives.aliases():
                bad("policy_loss", f"must be one of {'|'.join(objectives.names())}, got {value!r}")
                return
        try:
            plan = objectives.combination(value)
        except (TypeError, ValueError) as exc:
            bad("policy_loss", str(exc).removeprefix("policy_loss "))
            return
        if "policy_loss_weights" not in typ_bad and self.policy_loss_weights:
            try:
                objectives.combination(value, self.policy_loss_weights)
            except (TypeError, ValueError) as exc:
                bad("policy_loss_weights", str(exc).removeprefix("policy_loss_weights "))
        for obj, _ in plan:
            if obj.needs_label_smoothing and "label_smoothing" not in typ_bad and self.label_smoothing == 0:
                bad("label_smoothing", f"policy_loss {obj.name} needs label_smoothing > 0 (EXO's ε; the paper: 1e-3)")
            if obj.batch_coupled and (self.weight_column or self.noisy_mode):
                bad(
                    "policy_loss",
                    f"{obj.name} sorts over the batch and takes no pair weights (weight_column, noisy_mode)",
                )

    def warnings(self) -> list[str]:
        """Valid but probably unintended settings (printed by ``train``)."""
        out = []
        if self.max_steps and self.warmup_steps >= self.max_steps:
            out.append(
                f"warmup_steps ({self.warmup_steps}) >= max_steps ({self.max_steps}): the learning rate never "
                "reaches lr and the cosine decay never starts"
            )
        return out

    @property
    def reference_mode(self) -> str:
        if self.reference != "auto":
            return self.reference
        try:
            reference_free = any(o.reference_free for o, _ in objectives.combination(self.policy_loss))
        except (TypeError, ValueError):
            reference_free = False  # an invalid policy_loss is reported by problems()
        if self.alpha == 0 or reference_free:
            return "none"
        return "lora" if self.lora_r > 0 else "precomputed"


# The config's sections, in order (the flat keys stay the CLI flags and YAML keys; `haf-train --help` and the
# README group them this way). Every field is in exactly one section (tested).
SECTIONS: dict[str, tuple[str, ...]] = {
    "data": (
        "run_dir",
        "train_data",
        "eval_data",
        "eval_fraction",
        "train_split",
        "eval_split",
        "skip_bad_rows",
        "max_train_rows",
        "max_eval_rows",
        "max_length",
        "max_prompt_length",
        "pack",
        "pack_length",
    ),
    "model": (
        "model",
        "model_type",
        "model_config",
        "tokenizer",
        "gradient_checkpointing",
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "lora_target_modules",
        "reference",
        "ref_cache_dir",
    ),
    "objective": (
        "beta",
        "alpha",
        "reward_weight",
        "policy_loss",
        "policy_loss_weights",
        "simpo_gamma",
        "discopop_tau",
        "average_log_prob",
        "label_smoothing",
        "center_rewards_coefficient",
        "margin_column",
        "margin_scale",
        "weight_column",
        "backend",
    ),
    "rm methods": (
        "noisy_mode",
        "noisy_fraction",
        "noisy_threshold",
        "noisy_soft_mode",
        "noisy_soft_epsilon",
        "noisy_soft_weight",
        "strength_column",
        "adaptive_margin",
        "contrastive",
        "contrastive_on",
        "contrastive_weight",
        "contrastive_temperature",
        "contrastive_prototypes",
        "contrastive_dropout",
        "metarm_data",
        "metarm_k",
        "metarm_inner_lr",
        "metarm_prompts",
        "metarm_first_order",
    ),
    "optimisation": (
        "batch_size",
        "micro_batch_size",
        "lr",
        "head_lr",
        "weight_decay",
        "adam_beta1",
        "adam_beta2",
        "warmup_steps",
        "max_steps",
        "epochs",
        "min_lr_ratio",
        "grad_clip",
        "seed",
        "nonfinite",
        "nonfinite_max_skips",
        "check_finite_steps",
    ),
    "run": (
        "device",
        "dtype",
        "distributed",
        "num_threads",
        "eval_batch_size",
        "log_every",
        "eval_every",
        "save_every",
        "resume",
        "progress",
        "tensorboard",
        "plots",
        "export",
        "debug_step_sleep",
    ),
}


def _field_type(cls: type, name: str) -> Any:
    hints = typing.get_type_hints(cls)
    return hints[name]


class ConfigError(UserError, ValueError):
    """Invalid configuration: one line per problem, each starting with the key (or the file) it is about."""

    def __init__(self, problems: list[str] | str, header: str = "", hint: str = "") -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            msg = (f"{header}: " if header else "") + self.problems[0] + (f"; {hint}" if hint else "")
        else:
            lines = [f"{header or 'invalid config'} ({len(self.problems)} problems):"]
            lines += [f"  {p}" for p in self.problems] + ([hint] if hint else [])
            msg = "\n".join(lines)
        super().__init__(msg)


def _looks_local(value: str) -> bool:
    """A file-system path rather than a hub name (``name`` or ``org/name``): the data reader's rule
    (``data._looks_like_path``: data suffixes, compressed ones included) plus config / weight files."""
    from .data import _looks_like_path

    p = str(value)
    return _looks_like_path(p) or len(Path(p).parts) > 2 or Path(p).suffix.lower() in (".yaml", ".yml", ".safetensors")


def _range(lo: float, hi: float, lo_open: bool, hi_open: bool) -> str:
    return f" (allowed: {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'})"


@functools.cache
def _types(cls: type) -> dict[str, Any]:
    out = {}
    for name, typ in typing.get_type_hints(cls).items():
        if isinstance(typ, types.UnionType):
            args = tuple(a for a in typing.get_args(typ) if a is not type(None))
            typ = args[0] if len(args) == 1 else args
        out[name] = typing.get_origin(typ) or typ
    return out


_TYPE_WORDS = {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}
_TYPE_WORDS.update({list: "a list", dict: "a mapping (JSON object)"})


def _type_problem(cls: type, name: str, value: Any) -> str:
    """Why ``value`` does not fit the field's type ("" when it does)."""
    typ = _types(cls).get(name)
    if typ is None:
        return ""
    allowed = typ if isinstance(typ, tuple) else (typ,)
    if name == "resume" and (isinstance(value, bool) or value == "auto"):
        return ""
    for t in allowed:
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return ""
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return ""
        if t not in (int, float) and isinstance(t, type) and isinstance(value, t):
            return ""
    words = " or ".join(_TYPE_WORDS.get(t, getattr(t, "__name__", str(t))) for t in allowed)
    if name == "resume":
        words = 'true, false or "auto"'
    return f"expected {words}, got {value!r} ({type(value).__name__})"


def _coerce(cls: type, name: str, value: Any) -> Any:
    """Convert a file/CLI value to the field's type (strings from the command line); ``ConfigError`` naming the key."""
    typ = _types(cls)[name]
    if isinstance(typ, tuple):
        typ = typ[0]
    if value is None and typ in (str, list, dict):  # an empty YAML value
        return typ()
    if not isinstance(value, str):
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value  # checked by ``validate``
    if name == "resume" and value.strip().lower() == "auto":
        return "auto"
    problem = f"{name}: expected {_TYPE_WORDS.get(typ, typ.__name__)}, got {value!r}"
    if typ is bool:
        low = value.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        if name == "resume":
            problem = f'resume: expected true, false or "auto", got {value!r}'
        raise ConfigError([problem])
    try:
        if typ is int:
            return int(value)
        if typ is float:
            return float(value)
        if typ is list:
            value = value.strip()
            if value.startswith("["):
                out = json.loads(value)
                if not isinstance(out, list):
                    raise ValueError
                return out
            out = [v for v in value.split(",") if v]
            return [float(v) for v in out] if name == "policy_loss_weights" else out
        if typ is dict:
            out = json.loads(value) if value.strip() else {}
            if not isinstance(out, dict):
                raise ValueError
            return out
    except ValueError:  # includes json.JSONDecodeError
        raise ConfigError([problem]) from None
    return value


def _from_dict(cls: type, d: dict[str, Any]) -> tuple[Any, list[tuple[str, str]]]:
    """``(config, problems)``: unknown keys and values that do not convert are problems (left at defaults)."""
    names = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = {}
    problems: list[tuple[str, str]] = []
    for key, value in d.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            problems.append((str(key), "unknown config key" + (f" (did you mean {close[0]}?)" if close else "")))
            continue
        try:
            values[key] = _coerce(cls, key, value)
        except ConfigError as exc:
            problems.append((key, exc.problems[0].split(": ", 1)[1]))
    return cls(**values), problems


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON mapping of config keys; ``ConfigError`` naming the file (and line) when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config: no such file: {str(path)!r}"])
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read the config file ({exc})"]) from None
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError([f"{path}: invalid YAML{where}: {what}"]) from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError([f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: config file must hold a mapping of keys to values, got {type(data).__name__}"])
    return data


def parse_overrides(argv: list[str], cls: type = TrainConfig) -> tuple[dict[str, Any], list[str]]:
    """``--key value`` / ``--key=value`` / ``--flag`` / ``--no-flag`` pairs into a dict; returns (overrides,
    positional args). Dashes and underscores are the same: ``--max-length`` = ``--max_length``, ``--no-progress``
    = ``--no_progress``."""
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    positional: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            positional.append(arg)
            i += 1
            continue
        key, eq, val = arg[2:].partition("=")
        key = key.replace("-", "_")
        negated = key.startswith("no_") and key[3:] in names and key not in names
        if negated:
            key = key[3:]
        if key not in names and key != "config":
            raise SystemExit(f"unknown option --{arg[2:]} (see --help)")
        is_bool = key != "config" and _field_type(cls, key) is bool
        if negated:
            out[key] = False
        elif eq:
            out[key] = val
        elif is_bool and (i + 1 >= len(argv) or argv[i + 1].startswith("--")):
            out[key] = True
        else:
            if i + 1 >= len(argv):
                raise SystemExit(f"--{key} needs a value")
            out[key] = argv[i + 1]
            i += 1
        i += 1
    return out, positional


def build_config(
    argv: list[str] | None = None, cls: type = TrainConfig, *, need_data: bool = False, **defaults: Any
) -> TrainConfig:
    """Defaults (plus ``defaults``) < ``--config`` file < flags, validated: ``ConfigError`` lists every problem
    (unknown keys, bad types, bad values) at once. ``need_data``: about to train (see ``TrainConfig.validate``)."""
    argv = list(argv or [])
    flags, positional = parse_overrides(argv, cls)
    cfg_file = flags.pop("config", None) or (positional[0] if positional else None)
    merged: dict[str, Any] = dict(defaults)
    if cfg_file:
        merged.update(load_config_file(cfg_file))
    merged.update(flags)
    cfg, problems = _from_dict(cls, merged)
    seen = {k for k, _ in problems}
    problems += [(k, m) for k, m in cfg.problems(need_data=need_data) if k not in seen]
    if problems:
        raise ConfigError([f"{k}: {m}" for k, m in problems])
    return cfg


def help_text(cls: type = TrainConfig) -> str:
    """One line per field, ``--name default``, under its section (``SECTIONS``)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    sections = SECTIONS if cls is TrainConfig else {"options": tuple(fields)}
    lines = []
    for section, names in sections.items():
        lines.append(f" {section}:")
        for name in names:
            f = fields[name]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            lines.append(f"  --{f.name:<24} {default!r}")
    return "\n".join(lines)
