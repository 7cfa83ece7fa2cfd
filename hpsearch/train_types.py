"""What training is given and gives back: a configuration's training hyperparameters (TrainConfig), what a
strategy builds (Built), and the curves ``train.fit`` returns (FitResult). Plain data with no training code, so the
strategies, the schedules and the input pipeline read them without importing ``train``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from hpsearch.data import Data


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    batch_size: int
    optimizer: str  # sgd | adam | adamw
    lr: float
    weight_decay: float
    momentum: float = 0.0  # sgd only
    nesterov: bool = False  # sgd only
    scheduler: str = "none"  # none | multistep | plateau | cosine
    lr_gamma: float = 0.1  # multistep: factor at the milestones
    milestones: str = "auto"  # multistep: "auto" (50% and 75% of the epochs) or epochs such as "1,7"
    plateau_factor: float = 0.5  # plateau: factor when val accuracy stalls
    plateau_patience: int = 1  # plateau: epochs without improvement before the cut
    label_smoothing: float = 0.0
    augmentation: str = "none"
    warmup: float = 0.23  # linear: fraction of the steps over which the LR climbs from 0.2x to 1x
    final_lr: float = 0.07  # linear: the LR at the last step, as a fraction of lr
    averaging: str = "none"  # none | ema | lookahead: weight averaging (see WeightAverage)
    ema_decay: float = 0.999  # ema: per-step decay of the average
    flip_mode: str = "random"  # random | alternating (each image mirrored every other epoch, as airbench)
    translate: int = 2  # augmentation "translate": pixels of random shift (reflect padding)


TTA_LEVELS = ("none", "flip", "flip-translate")
AVERAGING = ("none", "ema", "lookahead")


@dataclass
class Built:
    """What a strategy's ``build`` returns: the model and how to feed and optimise it."""

    model: nn.Module  # normalised float batch [B, C, H, W] -> logits [B, num_classes]
    param_groups: list[dict[str, Any]]  # optimizer groups; a group's "lr" overrides TrainConfig.lr
    input_size: int | None = None  # batches are resized on the device to this square size
    mean: tuple[float, ...] | None = None  # normalisation override (pretrained weights' own statistics)
    std: tuple[float, ...] | None = None
    precomputed: Precomputed | None = None  # a frozen first part whose outputs fit may compute once
    # Called once before a fresh training with normalised, unaugmented training images (never val or test): layers
    # initialised from the data, such as scratch's patch-whitening conv. A resumed training loads its weights instead.
    init_from_data: Callable[[torch.Tensor], None] | None = None


@dataclass
class Precomputed:
    """A model that starts with a frozen trunk: for unaugmented batches its outputs never change.

    ``inputs(data, prep)`` gives the trunk's outputs for the train and val images (x: float or fp16 features),
    or None when they cannot be had (too big to keep); ``model`` maps them to logits and is the part that trains.
    """

    model: nn.Module
    inputs: Callable[[Data, Callable[[torch.Tensor], torch.Tensor]], Data | None]  # (data, prep) -> features


@dataclass
class FitResult:
    best_val_accuracy: float = 0.0
    best_epoch: int = -1
    train_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    seconds_per_epoch: list[float] = field(default_factory=list)  # wall clock
    cost_seconds_per_epoch: list[float] = field(default_factory=list)  # devices.cost_clock: not another process's
    final_accuracy: float | None = None  # validation accuracy of the final model with test-time augmentation
    confusion: list[list[int]] | None = None  # validation counts [true][predicted] at the best epoch


class Diverged(Exception):
    """The training loss became NaN or infinite."""


# on_epoch(epoch, result) is called after every epoch's evaluation; it may raise optuna.TrialPruned.
EpochHook = Callable[[int, FitResult], None]
