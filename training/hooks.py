"""The loop's plug-in points: ``TrainHooks`` (what RM methods pass to ``trainer.train``) and ``StepState``.

Its own module so that methods (``training.methods``) build hooks without importing the trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import distributed as D
from .config import TrainConfig
from .data import PairBatch
from .model import HafRewardModel, RewardModelOutput


@dataclass
class TrainHooks:
    """Optional callables that plug RM methods into the loop (see the module docstring)."""

    on_model: Callable[[HafRewardModel, TrainConfig], None] | None = None
    pair_terms: Callable[[PairBatch, TrainConfig], tuple[Any, Any]] | None = None
    aux_loss: Callable[[RewardModelOutput, PairBatch, HafRewardModel, int], torch.Tensor | None] | None = None
    on_step_end: Callable[[StepState], None] | None = None
    # MetaRM: parameters (name → tensor, differentiable functions of the model's) at which this step's loss is
    # computed, through ``torch.func.functional_call``; ``None`` = the model's own (single process only)
    forward_params: Callable[[HafRewardModel, int], dict[str, torch.Tensor] | None] | None = None


@dataclass
class StepState:
    """What ``on_step_end`` sees: the step just finished and the live objects of the run."""

    step: int
    model: torch.nn.Module
    raw_model: HafRewardModel
    optimizer: torch.optim.Optimizer
    cfg: TrainConfig
    info: D.DistInfo
    extra: dict[str, Any] = field(default_factory=dict)
