"""Training configuration: one flat dataclass, a YAML/JSON config file, and ``--key value`` CLI overrides.

Precedence: dataclass defaults < config file (``--config path.yaml``) < command-line flags. Booleans take
``--flag`` / ``--no-flag`` or ``--flag true|false``; lists take comma-separated values.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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
    lora_target_modules: list = field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"])
    # ---- reference model: "auto" (lora with LoRA, precomputed otherwise) | lora | copy | precomputed | none
    reference: str = "auto"
    ref_cache_dir: str = ""  # empty: <run_dir>/ref_cache
    # ---- loss (haf_kernels.fused_haf_loss)
    beta: float = 0.1
    alpha: float = 0.2
    reward_weight: float = 1.0
    policy_loss: str = "sigmoid"  # sigmoid | hinge | ipo | simpo
    simpo_gamma: float = 0.0
    average_log_prob: bool = False
    label_smoothing: float = 0.0
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
    max_length: int = 512
    max_prompt_length: int = 128
    batch_size: int = 32  # pairs per optimiser step, over all processes and accumulation steps
    micro_batch_size: int = 8  # pairs per forward, per process
    eval_batch_size: int = 32
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
    # ---- system
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    distributed: str = "auto"  # auto (ddp under torchrun) | ddp | fsdp | none
    num_threads: int = 0  # torch.set_num_threads on CPU; 0: leave
    # ---- logging, eval, checkpoints
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    save_every: int = 0  # 0: only at the end
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
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config keys: {unknown}")
        return cls(**{k: _coerce(cls, k, v) for k, v in d.items()})

    def replace(self, **kw: Any) -> TrainConfig:
        return dataclasses.replace(self, **kw)

    def validate(self) -> TrainConfig:
        if self.policy_loss not in ("sigmoid", "hinge", "ipo", "simpo"):
            raise ValueError(f"policy_loss must be sigmoid|hinge|ipo|simpo, got {self.policy_loss!r}")
        if self.reference not in ("auto", "lora", "copy", "precomputed", "none"):
            raise ValueError(f"reference must be auto|lora|copy|precomputed|none, got {self.reference!r}")
        if self.reference == "lora" and self.lora_r <= 0:
            raise ValueError("reference='lora' needs lora_r > 0")
        if self.distributed not in ("auto", "ddp", "fsdp", "none"):
            raise ValueError(f"distributed must be auto|ddp|fsdp|none, got {self.distributed!r}")
        if self.noisy_mode not in ("", "flip", "drop", "soft"):
            raise ValueError(f"noisy_mode must be flip|drop|soft (or empty), got {self.noisy_mode!r}")
        if self.noisy_soft_mode not in ("smooth", "weight"):
            raise ValueError(f"noisy_soft_mode must be smooth|weight, got {self.noisy_soft_mode!r}")
        if not 0.0 <= self.noisy_fraction <= 1.0:
            raise ValueError(f"noisy_fraction must be in [0, 1], got {self.noisy_fraction}")
        if self.contrastive not in ("", "simcse", "swav"):
            raise ValueError(f"contrastive must be simcse|swav (or empty), got {self.contrastive!r}")
        if self.contrastive_on not in ("pair", "diff"):
            raise ValueError(f"contrastive_on must be pair|diff, got {self.contrastive_on!r}")
        if self.metarm_data and self.metarm_k < 2:
            raise ValueError(f"metarm_k must be >= 2, got {self.metarm_k}")
        if self.max_prompt_length >= self.max_length:
            raise ValueError("max_prompt_length must be < max_length")
        if self.micro_batch_size <= 0 or self.batch_size <= 0:
            raise ValueError("batch_size and micro_batch_size must be positive")
        return self

    @property
    def reference_mode(self) -> str:
        if self.reference != "auto":
            return self.reference
        if self.policy_loss == "simpo" or self.alpha == 0:
            return "none"
        return "lora" if self.lora_r > 0 else "precomputed"


def _field_type(cls: type, name: str) -> Any:
    hints = typing.get_type_hints(cls)
    return hints[name]


def _coerce(cls: type, name: str, value: Any) -> Any:
    """Convert a file/CLI value to the field's type (strings from the command line)."""
    typ = _field_type(cls, name)
    if isinstance(typ, types.UnionType):
        typ = next(a for a in typing.get_args(typ) if a is not type(None))
    if not isinstance(value, str):
        if typ is float and isinstance(value, int):
            return float(value)
        return value
    if typ is bool:
        low = value.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{name}: expected a boolean, got {value!r}")
    if typ is int:
        return int(value)
    if typ is float:
        return float(value)
    if typ is list:
        value = value.strip()
        if value.startswith("["):
            return json.loads(value)
        return [v for v in value.split(",") if v]
    if typ is dict:
        return json.loads(value) if value.strip() else {}
    return value


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON mapping of config keys."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: config file must hold a mapping, got {type(data).__name__}")
    return data


def parse_overrides(argv: list[str], cls: type = TrainConfig) -> tuple[dict[str, Any], list[str]]:
    """``--key value`` / ``--flag`` / ``--no-flag`` pairs into a dict; returns (overrides, positional args)."""
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


def build_config(argv: list[str] | None = None, cls: type = TrainConfig, **defaults: Any) -> TrainConfig:
    """Defaults (plus ``defaults``) < ``--config`` file < flags."""
    argv = list(argv or [])
    flags, positional = parse_overrides(argv, cls)
    cfg_file = flags.pop("config", None) or (positional[0] if positional else None)
    merged: dict[str, Any] = dict(defaults)
    if cfg_file:
        merged.update(load_config_file(cfg_file))
    merged.update(flags)
    return cls.from_dict(merged).validate()


def help_text(cls: type = TrainConfig) -> str:
    """One line per field: ``--name (type, default)``."""
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  --{f.name:<24} {default!r}")
    return "\n".join(lines)
