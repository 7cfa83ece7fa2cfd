"""What every strategy is: a default search space, ``suggest`` (trial -> plain frozen config) and ``build``
(config + data info -> model and parameter groups). The training hyperparameters are shared."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import optuna

from hpsearch.augment import LEVELS
from hpsearch.data import DataInfo
from hpsearch.schedules import SCHEDULERS
from hpsearch.space import Categorical, Fixed, FloatRange, Param, PerChoice, Space
from hpsearch.train_types import AVERAGING, Built, TrainConfig


class Config(Protocol):
    """A strategy's frozen dataclass: its model fields plus ``train``."""

    train: TrainConfig


@dataclass(frozen=True)
class Strategy:
    name: str
    params: dict[str, Param]  # the default search space
    suggest: Callable[[optuna.Trial, Space, int, DataInfo], Any]  # (trial, space, epochs, info) -> Config
    build: Callable[[Any, DataInfo], Built]  # (config, info) -> Built
    help: str
    # Rules across keys of a resolved space, checked when the study file is loaded; raises ValueError whose
    # message starts with the key (zoo: every model needs an input_size choice it can take).
    check: Callable[[Space], None] | None = None


def check_milestones(value: str) -> None:
    """``milestones``: "auto" or strictly increasing epoch numbers >= 1 separated by commas ("1,7")."""
    if value == "auto":
        return
    parts = value.split(",")
    if not all(p.strip().isdigit() for p in parts):
        raise ValueError('must be "auto" or epoch numbers separated by commas, such as "1,7"')
    epochs = [int(p) for p in parts]
    if epochs[0] < 1 or any(b <= a for a, b in zip(epochs, epochs[1:], strict=False)):
        raise ValueError("must list strictly increasing epoch numbers >= 1")


# The default learning-rate range depends on the sampled optimizer, so that a sampled lr is plausible for it: one
# range 1e-4..1e-1 for all three gave Adam trials at lr 0.085 that sat at chance for every epoch (issue #11). A
# study file's `lr = {low, high}` (or a list) replaces this with one domain for every optimizer.
LR_BY_OPTIMIZER = PerChoice("optimizer", (
    ("sgd", FloatRange(1e-3, 0.3, log=True)),
    ("adam", FloatRange(1e-4, 3e-3, log=True)),
    ("adamw", FloatRange(1e-4, 3e-3, log=True)),
))


def train_params(*, batch_sizes: tuple[int, ...]) -> dict[str, Param]:
    """The training hyperparameters every strategy samples (optimizer, schedule, regularisation, batching)."""
    return {
        "optimizer": Param(Categorical(("sgd", "adam", "adamw")), str, "optimizer",
                           allowed=("sgd", "adam", "adamw")),
        "lr": Param(LR_BY_OPTIMIZER, float, "base learning rate (default range per optimizer)", low=1e-7, high=10.0),
        "momentum": Param(FloatRange(0.0, 0.99), float, "SGD momentum (sgd only)", low=0.0, high=0.999),
        "nesterov": Param(Categorical((False, True)), bool, "Nesterov momentum (sgd only)"),
        "weight_decay": Param(FloatRange(1e-6, 1e-2, log=True), float, "weight decay", low=0.0, high=1.0),
        # "linear" (warm-up, then linear decay, stepped per batch) is allowed but not in the default choices: a
        # study that sampled the four before would see a categorical change its choices on resume.
        "scheduler": Param(Categorical(("none", "multistep", "plateau", "cosine")), str, "LR schedule",
                           allowed=SCHEDULERS),
        "lr_gamma": Param(Categorical((0.1, 0.2, 0.5)), float, "multistep: LR factor at each milestone",
                          low=1e-4, high=1.0),
        "milestones": Param(Fixed("auto"), str, 'multistep: "auto" (50% and 75% of the epochs) or the epochs '
                            'after which the LR is cut, as a string such as "1,7"', check=check_milestones),
        "plateau_factor": Param(Categorical((0.1, 0.2, 0.5)), float,
                                "plateau: LR factor when val accuracy stalls", low=1e-4, high=0.999),
        "plateau_patience": Param(Categorical((1, 2)), int, "plateau: epochs without improvement", low=0, high=100),
        "batch_size": Param(Categorical(batch_sizes), int, "batch size", low=2, high=65536),
        "label_smoothing": Param(Categorical((0.0, 0.1)), float, "label smoothing", low=0.0, high=0.5),
        # strong/stronger are allowed but not default: they regularise, which pays only at long budgets. At 3
        # epochs the base CNN on CIFAR-10 (JPEG copy) reached 0.576 val accuracy with none, 0.525 base, 0.476
        # strong, 0.458 stronger, and an epoch costs ~1.4x / ~1.8x (benchmarks/README.md). List them in [space]
        # for studies of tens of epochs.
        "augmentation": Param(Categorical(("none", "base")), str, "augmentation level", allowed=LEVELS),
        # The airbench-class training knobs. Fixed by default (today's behaviour, so stored trials replay as they
        # ran); studies/*-fast.toml open them up.
        "warmup": Param(Fixed(0.23), float, "linear: fraction of the steps over which the LR climbs from 0.2x to 1x",
                        low=0.0, high=0.9),
        "final_lr": Param(Fixed(0.07), float, "linear: the LR at the last step, as a fraction of lr", low=0.0,
                          high=1.0),
        "averaging": Param(Fixed("none"), str, "weight averaging: ema (per step), lookahead (airbench94's)",
                           allowed=AVERAGING),
        "ema_decay": Param(Fixed(0.999), float, "ema: per-step decay of the weight average", low=0.0, high=0.99999),
        "flip_mode": Param(Fixed("random"), str, "flips of an augmented batch: a random half, or each image mirrored "
                           "every other epoch (alternating)", allowed=("random", "alternating")),
        "translate": Param(Fixed(2), int, 'augmentation "translate": pixels of random shift', low=1, high=8),
    }


def suggest_train(trial: optuna.Trial, space: Space, epochs: int, *, lr: float | None = None) -> TrainConfig:
    """Conditional parameters are sampled only where they matter (momentum for sgd, knobs per scheduler, the
    shift of the translate augmentation, the EMA's decay).

    A strategy whose parameter groups carry their own LRs passes ``lr`` (and has no "lr" key): not sampled.
    """
    optimizer = space.suggest(trial, "optimizer")
    scheduler = space.suggest(trial, "scheduler")
    config = TrainConfig(
        epochs=epochs,
        batch_size=space.suggest(trial, "batch_size"),
        optimizer=optimizer,
        lr=space.suggest(trial, "lr") if lr is None else lr,
        weight_decay=space.suggest(trial, "weight_decay"),
        momentum=space.suggest(trial, "momentum") if optimizer == "sgd" else 0.0,
        nesterov=space.suggest(trial, "nesterov") if optimizer == "sgd" else False,
        scheduler=scheduler,
        lr_gamma=space.suggest(trial, "lr_gamma") if scheduler == "multistep" else 0.1,
        milestones=space.suggest(trial, "milestones") if scheduler == "multistep" else "auto",
        plateau_factor=space.suggest(trial, "plateau_factor") if scheduler == "plateau" else 0.5,
        plateau_patience=space.suggest(trial, "plateau_patience") if scheduler == "plateau" else 1,
        label_smoothing=space.suggest(trial, "label_smoothing"),
        augmentation=space.suggest(trial, "augmentation"),
    )
    # The airbench-class knobs, after the others: a study's earlier parameters are drawn in the order they were.
    averaging = space.suggest(trial, "averaging")
    return replace(
        config,
        warmup=space.suggest(trial, "warmup") if scheduler == "linear" else config.warmup,
        final_lr=space.suggest(trial, "final_lr") if scheduler == "linear" else config.final_lr,
        averaging=averaging,
        ema_decay=space.suggest(trial, "ema_decay") if averaging == "ema" else config.ema_decay,
        flip_mode=space.suggest(trial, "flip_mode") if config.augmentation != "none" else config.flip_mode,
        translate=space.suggest(trial, "translate") if config.augmentation == "translate" else config.translate,
    )
