"""Training one configuration: per-epoch permutation batches of device-resident uint8 data, augmentation and
normalisation fused into the batch step, evaluation under inference_mode, one host sync per epoch.

``fit`` gets every hyperparameter as an argument (a TrainConfig): nothing is read from globals.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from hpsearch.augment import augment
from hpsearch.data import Data, Split
from hpsearch.devices import autocast_dtype

EVAL_BATCH = 1024  # evaluation has no activations to keep for backward: big batches amortise per-call cost


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


@dataclass
class Built:
    """What a strategy's ``build`` returns: the model and how to feed and optimise it."""

    model: nn.Module  # normalised float batch [B, C, H, W] -> logits [B, num_classes]
    param_groups: list[dict[str, Any]]  # optimizer groups; a group's "lr" overrides TrainConfig.lr
    input_size: int | None = None  # batches are resized on the device to this square size
    mean: tuple[float, ...] | None = None  # normalisation override (pretrained weights' own statistics)
    std: tuple[float, ...] | None = None
    precomputed: Precomputed | None = None  # a frozen first part whose outputs fit may compute once


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
    seconds_per_epoch: list[float] = field(default_factory=list)
    confusion: list[list[int]] | None = None  # validation counts [true][predicted] at the best epoch


class Diverged(Exception):
    """The training loss became NaN or infinite."""


# on_epoch(epoch, result) is called after every epoch's evaluation; it may raise optuna.TrialPruned.
EpochHook = Callable[[int, FitResult], None]


def make_optimizer(config: TrainConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    groups = [g for g in groups if any(p.requires_grad for p in g["params"])]
    # CUDA: fused kernels, one launch per step; with fp16 the GradScaler also hands them its inf check as a device
    # tensor, where the unfused path reads it on the host (a sync every step). Elsewhere torch's default.
    fused = True if all(p.is_cuda for g in groups for p in g["params"]) else None
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, fused=fused,
                               nesterov=config.nesterov and config.momentum > 0, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay, fused=fused)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay, fused=fused)
    raise ValueError(f"optimizer {config.optimizer!r} is not known; allowed: sgd, adam, adamw")


def make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer) -> Any:
    if config.scheduler == "none":
        return None
    if config.scheduler == "multistep":
        milestones = (sorted({max(1, config.epochs // 2), max(1, (3 * config.epochs) // 4)})
                      if config.milestones == "auto" else [int(m) for m in config.milestones.split(",")])
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=config.lr_gamma)
    if config.scheduler == "plateau":  # monitors VALIDATION accuracy, hence mode="max"
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=config.plateau_factor, patience=config.plateau_patience)
    if config.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, config.epochs))
    raise ValueError(f"scheduler {config.scheduler!r} is not known; allowed: none, multistep, plateau, cosine")


def channels_last(device: torch.device) -> bool:
    """NHWC activations: tensor cores want them on CUDA; on CPU oneDNN's kernels measured faster too (2 threads,
    batch 64, one SGD step: the base CNN 4.06 ms vs 5.27 ms, a 3-conv 32-64-128 BatchNorm net 30.4 ms vs 45.9 ms).
    MPS is left as is: not measured."""
    return device.type in ("cuda", "cpu")


class BatchPrep:
    """uint8 batch -> augmented, normalised, resized float batch, in one place for training and evaluation."""

    def __init__(self, data: Data, built: Built, device: torch.device) -> None:
        mean = torch.tensor(built.mean or data.info.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(built.std or data.info.std, device=device).view(1, -1, 1, 1)
        # x/255 then (x - mean)/std folded into one multiply-add on 0..255 values.
        self.scale = 1.0 / (255.0 * std)
        self.shift = -mean / std
        self.size = built.input_size
        self.flip = data.info.flip
        self.channels_last = channels_last(device)

    def __call__(self, x: torch.Tensor, augmentation: str = "none",
                 generator: torch.Generator | None = None) -> torch.Tensor:
        # Cropped while still uint8 (a quarter of the bytes of float); the levels that resample return float.
        x = augment(x, augmentation, flip=self.flip, generator=generator)
        if self.channels_last:
            # NHWC before the float conversion: for a 64x3x32x32 uint8 batch, conversion + normalisation take
            # 0.2 ms, against 0.93 ms when the float batch is converted afterwards (2 CPU threads).
            x = x.contiguous(memory_format=torch.channels_last)
        x = torch.addcmul(self.shift, x.float(), self.scale)
        if self.size is not None and self.size != x.shape[-1]:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=False)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def evaluate(model: nn.Module, split: Split, prep: Callable[[torch.Tensor], torch.Tensor],
             device: torch.device, *, confusion: torch.Tensor | None = None) -> float:
    """Accuracy on ``split``; with ``confusion`` (int64 [C*C] on ``device``), also fills it with the counts of
    (true, predicted) pairs, on the device: no extra host sync."""
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    if confusion is not None:
        confusion.zero_()
        classes = math.isqrt(confusion.numel())
    dtype = autocast_dtype(device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        for i in range(0, len(split), EVAL_BATCH):
            logits = model(prep(split.x[i : i + EVAL_BATCH]))
            pred, y = logits.argmax(1), split.y[i : i + EVAL_BATCH]
            correct += (pred == y).sum()
            if confusion is not None:
                # scatter_add_, not bincount: CUDA's bincount reads the input's max on the host (a sync per batch).
                pairs = y * classes + pred
                confusion.scatter_add_(0, pairs, torch.ones_like(pairs))
    return correct.item() / len(split)  # the one host sync of an evaluation


def fit(
    built: Built,
    data: Data,
    config: TrainConfig,
    *,
    device: torch.device,
    seed: int,
    on_epoch: EpochHook | None = None,
    resume: dict[str, Any] | None = None,
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
    compile: bool = False,
) -> FitResult:
    """Trains ``config.epochs`` epochs; returns the curves and the best validation accuracy.

    With ``on_checkpoint``, the full training state (weights, optimizer, scheduler, scaler, every random state,
    the curves so far) is handed to it after every epoch, once ``on_epoch`` has reported the epoch: a process
    killed between the two then repeats a reported epoch (same value) instead of leaving a gap. ``resume`` is
    such a state: training goes on after its epoch. Whether to resume is the caller's decision. The state shares
    tensors with the live model and optimizer: ``on_checkpoint`` must serialise (or copy) it before returning.
    With ``compile``, the forward pass goes through ``torch.compile`` (its cost is paid per architecture, so per
    trial: see benchmarks/README.md for when it pays).
    """
    model = built.model.to(device)
    if channels_last(device):
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # a trial's batch shape is fixed: autotuned kernels pay after a step
    optimizer = make_optimizer(config, built.param_groups)
    scheduler = make_scheduler(config, optimizer)
    dtype = autocast_dtype(device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    prep: Callable[..., torch.Tensor] = BatchPrep(data, built, device)
    if built.precomputed is not None and config.augmentation == "none":
        # The frozen trunk would see the same images every epoch: its outputs, computed once (and cached across
        # trials), replace the images, and only the trainable top runs in the loop and is checkpointed.
        features = built.precomputed.inputs(data, prep)
        if features is not None:
            model, data, prep = built.precomputed.model, features, _as_float
    # What is checkpointed: the part that trains. A frozen trunk never changes, so a trial trained on cached trunk
    # outputs resumes in a process that cannot cache them (and the file holds no trunk weights).
    trained = built.precomputed.model if built.precomputed is not None else built.model
    generator = torch.Generator(device=device).manual_seed(seed)
    result, start = FitResult(), 0
    if resume is not None:
        trained.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])  # moves the state to the parameters' device
        if scheduler is not None:
            scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        _set_rng_states(resume["rng"], generator, device)
        result, start = FitResult(**resume["result"]), resume["epoch"] + 1
    # A compiled module wraps ``model``: checkpoints keep saving ``model``'s plain state_dict keys.
    forward = cast(nn.Module, torch.compile(model)) if compile else model

    classes = data.info.num_classes
    confusion = torch.zeros(classes * classes, dtype=torch.int64, device=device)
    n = len(data.train)
    bs = min(config.batch_size, n)
    steps = n // bs  # the remainder is dropped (a different one each epoch): no 1-sample BatchNorm batches
    for epoch in range(start, config.epochs):
        t0 = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), device=device)
        perm = torch.randperm(n, device=device, generator=generator)
        for step in range(steps):
            idx = perm[step * bs : (step + 1) * bs]
            x = prep(data.train.x[idx], config.augmentation, generator)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = F.cross_entropy(forward(x), data.train.y[idx], label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach()
        train_loss = loss_sum.item() / steps  # host sync, once per epoch
        if not math.isfinite(train_loss):
            raise Diverged(f"training loss is {train_loss} at epoch {epoch}")
        val_acc = evaluate(forward, data.val, prep, device, confusion=confusion)
        if scheduler is not None:
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(val_acc)
            else:
                scheduler.step()
        result.train_loss.append(train_loss)
        result.val_accuracy.append(val_acc)
        result.seconds_per_epoch.append(time.perf_counter() - t0)
        if val_acc > result.best_val_accuracy or result.best_epoch < 0:
            result.best_val_accuracy, result.best_epoch = val_acc, epoch
            result.confusion = confusion.view(classes, classes).tolist()  # a host sync, on a new best epoch only
        if on_epoch is not None:
            on_epoch(epoch, result)
        if on_checkpoint is not None:
            # The result travels with the weights: a resumed trial reports the same curves and best value.
            on_checkpoint({
                "epoch": epoch, "model": trained.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": None if scheduler is None else scheduler.state_dict(), "scaler": scaler.state_dict(),
                "rng": _rng_states(generator, device), "result": asdict(result),
            })
    return result


def estimate_epoch_seconds(built: Built, data: Data, config: TrainConfig, device: torch.device, *,
                           steps: int = 3) -> float:
    """The seconds one training epoch of ``config`` will take, from ``steps`` timed training steps (after one
    untimed warm-up step) on a copy of the model with the real first batch and its augmentation: what the cost cap
    checks before a trial trains. Validation and the optimizer's own update (SGD stands in for all) are not counted,
    so it errs low: the cap refuses only what is surely over it, and the measured epoch time catches the rest.
    The model, its parameters and every RNG are left as they were."""
    model = copy.deepcopy(built.model).to(device).train()
    if channels_last(device):
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    prep = BatchPrep(data, built, device)
    bs = min(config.batch_size, len(data.train))
    x_raw, y = data.train.x[:bs], data.train.y[:bs]
    generator = torch.Generator(device=device).manual_seed(0)
    dtype = autocast_dtype(device)
    seconds: list[float] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for _ in range(steps + 1):
            t0 = time.perf_counter()
            x = prep(x_raw, config.augmentation, generator)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss.item()  # host sync: the device has finished this step
            seconds.append(time.perf_counter() - t0)
    # The median of the timed steps (the first, with its allocations and autotuning, is left out): one step slowed
    # by another process on a shared machine does not refuse a configuration.
    return sorted(seconds[1:])[steps // 2] * (len(data.train) // bs)


def _rng_states(generator: torch.Generator, device: torch.device) -> dict[str, Any]:
    """Every random state training draws from: the trial's generator (permutations, augmentation) and torch's
    global ones (dropout). Only this device's CUDA generator: asking for all would create a context on every GPU."""
    states = {"generator": generator.get_state(), "cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _set_rng_states(states: dict[str, Any], generator: torch.Generator, device: torch.device) -> None:
    # set_state takes CPU byte tensors only, whatever the generator's device.
    generator.set_state(states["generator"].cpu())
    torch.set_rng_state(states["cpu"].cpu())
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"].cpu(), device)


def _as_float(x: torch.Tensor, augmentation: str = "none", generator: torch.Generator | None = None) -> torch.Tensor:
    return x.float()  # precomputed features may be stored in fp16; "none" is the only augmentation they get
