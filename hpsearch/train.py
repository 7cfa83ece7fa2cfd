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
from hpsearch.devices import LoadAwareThreads, autocast_dtype, cost_clock

# ``amp`` of fit/evaluate when the caller does not decide: the device's default (CUDA's AMP; fp32 elsewhere).
DEVICE_DEFAULT = "device"
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


SCHEDULERS = ("none", "multistep", "plateau", "cosine", "linear")


def make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int = 1) -> Any:
    """The LR schedule over ``config.epochs``. ``linear`` is stepped after every batch (``per_step``), the others
    after every epoch."""
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
    if config.scheduler == "linear":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, linear_schedule(config.epochs * steps_per_epoch, config.warmup, config.final_lr))
    raise ValueError(f"scheduler {config.scheduler!r} is not known; allowed: {', '.join(SCHEDULERS)}")


def per_step(config: TrainConfig) -> bool:
    return config.scheduler == "linear"


WARMUP_START = 0.2  # linear: the LR multiplier at step 0 (airbench94's triangle)


def linear_schedule(steps: int, warmup: float, final: float) -> Callable[[int], float]:
    """airbench94's triangle: the LR multiplier climbs linearly from 0.2 to 1 over the first ``warmup`` of the
    ``steps``, then falls linearly to ``final`` at the last step. A shorter training runs the whole shape (a
    complete schedule), not the start of a longer one."""
    top = max(1, round(warmup * steps))

    def multiplier(step: int) -> float:
        if step < top:
            return WARMUP_START + (1 - WARMUP_START) * step / top
        return 1 + (final - 1) * min(1.0, (step - top) / max(1, steps - top))

    return multiplier


class WeightAverage:
    """Weight averaging over training; the model holds the average at the end of every epoch (validation, the
    checkpoint and the final model see it).

    ``ema``: an exponential moving average of the weights and BatchNorm statistics, swapped into the model for
    validation and kept there after the last epoch. Its decay per step warms up as min(ema_decay, (1 + t) / (10 + t))
    (TensorFlow's ExponentialMovingAverage with num_updates): a fixed 0.999 averages over ~1,000 steps, so a
    training of a few hundred (a rung) ended at the initial weights' accuracy (CIFAR-10: chance, bench_fidelity).
    ``lookahead``: airbench94's: from 30% of the steps on, every 5 steps the average moves towards the weights
    (decay 0.95^5 x progress^3, so it averages harder as training ends) and is copied back into them.
    """

    LOOKAHEAD_START = 0.3  # of the steps (airbench94: epoch 3 of 9.9)
    LOOKAHEAD_EVERY = 5
    LOOKAHEAD_DECAY = 0.95
    LOOKAHEAD_POW = 3.0

    def __init__(self, kind: str, model: nn.Module, *, total_steps: int, decay: float) -> None:
        self.kind, self.model, self.total_steps, self.decay = kind, model, max(1, total_steps), decay
        self.average: list[torch.Tensor] | None = None
        if kind == "ema":
            self.average = [t.detach().clone() for t in self._tensors()]

    def _tensors(self) -> list[torch.Tensor]:
        # Weights and BatchNorm running statistics (not the int64 batch counters).
        return [t for t in self.model.state_dict().values() if t.is_floating_point()]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step number ``step`` (1-based)."""
        if self.kind == "ema":
            assert self.average is not None
            decay = min(self.decay, (1 + step) / (10 + step))
            for a, t in zip(self.average, self._tensors(), strict=True):
                a.lerp_(t, 1 - decay)
        elif self.kind == "lookahead" and step >= self.LOOKAHEAD_START * self.total_steps \
                and step % self.LOOKAHEAD_EVERY == 0:
            tensors = self._tensors()
            if self.average is None:
                self.average = [t.detach().clone() for t in tensors]
                return
            rho = self.LOOKAHEAD_DECAY ** self.LOOKAHEAD_EVERY * (step / self.total_steps) ** self.LOOKAHEAD_POW
            for a, t in zip(self.average, tensors, strict=True):
                a.lerp_(t, 1 - rho)
                t.copy_(a)

    @torch.no_grad()
    def end_epoch(self) -> list[torch.Tensor] | None:
        """Puts the average into the model; returns the live weights ``resume_epoch`` puts back (ema), or None."""
        if self.average is None:
            return None
        tensors = self._tensors()
        live = [t.clone() for t in tensors] if self.kind == "ema" else None
        for a, t in zip(self.average, tensors, strict=True):
            t.copy_(a)
        return live

    @torch.no_grad()
    def resume_epoch(self, live: list[torch.Tensor] | None) -> None:
        if live is not None:
            for v, t in zip(live, self._tensors(), strict=True):
                t.copy_(v)

    def state_dict(self) -> dict[str, Any]:
        return {"average": self.average}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.average = None if state["average"] is None else [t.clone() for t in state["average"]]


def channels_last(device: torch.device) -> bool:
    """NHWC activations: tensor cores want them on CUDA; on CPU oneDNN's kernels measured faster too (2 threads,
    batch 64, one SGD step: the base CNN 4.06 ms vs 5.27 ms, a 3-conv 32-64-128 BatchNorm net 30.4 ms vs 45.9 ms).
    MPS is left as is: not measured."""
    return device.type in ("cuda", "cpu")


class BatchPrep:
    """uint8 batch -> augmented, normalised, resized float batch, in one place for training and evaluation."""

    def __init__(self, data: Data, built: Built, device: torch.device, *, translate: int = 2) -> None:
        mean = torch.tensor(built.mean or data.info.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(built.std or data.info.std, device=device).view(1, -1, 1, 1)
        # x/255 then (x - mean)/std folded into one multiply-add on 0..255 values.
        self.scale = 1.0 / (255.0 * std)
        self.shift = -mean / std
        self.size = built.input_size
        self.flip = data.info.flip
        self.translate = translate
        self.channels_last = channels_last(device)

    def __call__(self, x: torch.Tensor, augmentation: str = "none", generator: torch.Generator | None = None,
                 flip_mask: torch.Tensor | None = None) -> torch.Tensor:
        # Cropped while still uint8 (a quarter of the bytes of float); the levels that resample return float.
        x = augment(x, augmentation, flip=self.flip, generator=generator, translate=self.translate,
                    flip_mask=flip_mask)
        if self.channels_last:
            # NHWC before the float conversion: for a 64x3x32x32 uint8 batch, conversion + normalisation take
            # 0.2 ms, against 0.93 ms when the float batch is converted afterwards (2 CPU threads).
            x = x.contiguous(memory_format=torch.channels_last)
        x = torch.addcmul(self.shift, x.float(), self.scale)
        if self.size is not None and self.size != x.shape[-1]:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=False)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def tta_logits(model: nn.Module, x: torch.Tensor, tta: str, *, flip: bool) -> torch.Tensor:
    """Logits of a normalised batch under test-time augmentation, the same for every trial of a study (never chosen
    on the test set). ``flip``: the mirror image averaged in (where mirroring keeps the label). ``flip-translate``:
    airbench94's six views, half weight on the plain ones and half on the images shifted 1 px up-left and 1 px
    down-right (reflect padding)."""
    def mirrored(v: torch.Tensor) -> torch.Tensor:
        return 0.5 * (model(v) + model(v.flip(-1))) if flip else model(v)

    if tta == "none":
        return model(x)
    if tta == "flip":
        return mirrored(x)
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    shifted = [padded[:, :, 0:h, 0:w], padded[:, :, 2 : h + 2, 2 : w + 2]]
    return 0.5 * mirrored(x) + 0.25 * (mirrored(shifted[0]) + mirrored(shifted[1]))


def evaluate(model: nn.Module, split: Split, prep: Callable[[torch.Tensor], torch.Tensor],
             device: torch.device, *, confusion: torch.Tensor | None = None,
             amp: torch.dtype | None | str = DEVICE_DEFAULT, tta: str = "none", flip: bool = True) -> float:
    """Accuracy on ``split`` (in the training's precision ``amp``, with test-time augmentation ``tta``); with
    ``confusion`` (int64 [C*C] on ``device``), also fills it with the counts of (true, predicted) pairs, on the
    device: no extra host sync."""
    amp = _resolve(amp, device)
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    if confusion is not None:
        confusion.zero_()
        classes = math.isqrt(confusion.numel())
    with torch.inference_mode(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        for i in range(0, len(split), EVAL_BATCH):
            logits = tta_logits(model, prep(split.x[i : i + EVAL_BATCH]), tta, flip=flip)
            pred, y = logits.argmax(1), split.y[i : i + EVAL_BATCH]
            correct += (pred == y).sum()
            if confusion is not None:
                # scatter_add_, not bincount: CUDA's bincount reads the input's max on the host (a sync per batch).
                pairs = y * classes + pred
                confusion.scatter_add_(0, pairs, torch.ones_like(pairs))
    return correct.item() / len(split)  # the one host sync of an evaluation


# Seconds LoadAwareThreads watches the cores before a training or a probe starts: the threads it starts with.
FIRST_LOOK = 0.25
WHITEN_IMAGES = 5000  # training images whose statistics initialise data-dependent layers (airbench94: 5,000)


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
    amp: torch.dtype | None | str = DEVICE_DEFAULT,
    tta: str = "none",
) -> FitResult:
    """Trains ``config.epochs`` epochs; returns the curves and the best validation accuracy.

    ``amp``: the autocast dtype (None: fp32), decided by the caller (``devices.choose_precision``; by default the
    device's: CUDA's AMP, fp32 elsewhere); the weights,
    the optimizer state and the checkpoints stay fp32. ``tta``: after the last epoch the model is also validated
    with test-time augmentation (``result.final_accuracy``, seen by that epoch's ``on_epoch``).
    With ``on_checkpoint``, the full training state (weights, optimizer, scheduler, scaler, weight average, every
    random state, the curves so far) is handed to it after every epoch, once ``on_epoch`` has reported the epoch: a
    process killed between the two then repeats a reported epoch (same value) instead of leaving a gap. ``resume``
    is such a state: training goes on after its epoch. Whether to resume is the caller's decision. The state shares
    tensors with the live model and optimizer: ``on_checkpoint`` must serialise (or copy) it before returning.
    With ``compile``, the forward pass goes through ``torch.compile`` (its cost is paid per architecture, so per
    trial: see benchmarks/README.md for when it pays).
    """
    amp = _resolve(amp, device)
    model = built.model.to(device)
    if channels_last(device):
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # a trial's batch shape is fixed: autotuned kernels pay after a step
    prep: Callable[..., torch.Tensor] = BatchPrep(data, built, device, translate=config.translate)
    if built.init_from_data is not None and resume is None:
        built.init_from_data(prep(data.train.x[:WHITEN_IMAGES]))
    optimizer = make_optimizer(config, built.param_groups)
    n = len(data.train)
    bs = min(config.batch_size, n)
    steps = n // bs  # the remainder is dropped (a different one each epoch): no 1-sample BatchNorm batches
    scheduler = make_scheduler(config, optimizer, steps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    if built.precomputed is not None and config.augmentation == "none":
        # The frozen trunk would see the same images every epoch: its outputs, computed once (and cached across
        # trials), replace the images, and only the trainable top runs in the loop and is checkpointed.
        features = built.precomputed.inputs(data, prep)
        if features is not None:
            model, data, prep = built.precomputed.model, features, _as_float
    # What is checkpointed: the part that trains. A frozen trunk never changes, so a trial trained on cached trunk
    # outputs resumes in a process that cannot cache them (and the file holds no trunk weights).
    trained = built.precomputed.model if built.precomputed is not None else built.model
    average = WeightAverage(config.averaging, trained, total_steps=config.epochs * steps, decay=config.ema_decay)
    generator = torch.Generator(device=device).manual_seed(seed)
    # Alternating flips: each image's first orientation, drawn once from the seed (a resumed trial draws the same).
    alternate = config.flip_mode == "alternating" and data.info.flip and config.augmentation != "none"
    first_flip = (torch.rand(n, device=device, generator=torch.Generator(device=device).manual_seed(seed + 1)) < 0.5
                  if alternate else None)
    result, start = FitResult(), 0
    if resume is not None:
        trained.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])  # moves the state to the parameters' device
        if scheduler is not None:
            scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        if "average" in resume:
            average.load_state_dict(resume["average"])
        _set_rng_states(resume["rng"], generator, device)
        result, start = FitResult(**resume["result"]), resume["epoch"] + 1
    # A compiled module wraps ``model``: checkpoints keep saving ``model``'s plain state_dict keys.
    forward = cast(nn.Module, torch.compile(model)) if compile else model
    clock = cost_clock(device)
    # Fewer threads while other processes run: from a first look before the first step, then every 2 s.
    threads = LoadAwareThreads(first_look=FIRST_LOOK) if device.type == "cpu" else None

    classes = data.info.num_classes
    confusion = torch.zeros(classes * classes, dtype=torch.int64, device=device)
    for epoch in range(start, config.epochs):
        t0, c0 = time.perf_counter(), clock()
        model.train()
        loss_sum = torch.zeros((), device=device)
        perm = torch.randperm(n, device=device, generator=generator)
        for step in range(steps):
            if threads is not None:
                threads.poll()  # a clock read; /proc/stat every 2 s
            idx = perm[step * bs : (step + 1) * bs]
            flips = None if first_flip is None else first_flip[idx] ^ bool(epoch % 2)
            x = prep(data.train.x[idx], config.augmentation, generator, flips)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = F.cross_entropy(forward(x), data.train.y[idx], label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            average.update(epoch * steps + step + 1)
            if scheduler is not None and per_step(config):
                scheduler.step()
            loss_sum += loss.detach()
        train_loss = loss_sum.item() / steps  # host sync, once per epoch
        cost = clock() - c0
        if not math.isfinite(train_loss):
            raise Diverged(f"training loss is {train_loss} at epoch {epoch}")
        last = epoch + 1 == config.epochs
        live = average.end_epoch()
        val_acc = evaluate(forward, data.val, prep, device, confusion=confusion, amp=amp)
        if last and tta != "none":
            result.final_accuracy = evaluate(forward, data.val, prep, device, amp=amp, tta=tta, flip=data.info.flip)
        if not last:
            average.resume_epoch(live)  # ema: training (and its checkpoint) goes on from the live weights
        if scheduler is not None and not per_step(config):
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(val_acc)
            else:
                scheduler.step()
        result.train_loss.append(train_loss)
        result.val_accuracy.append(val_acc)
        result.seconds_per_epoch.append(time.perf_counter() - t0)
        result.cost_seconds_per_epoch.append(cost)
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
                "average": average.state_dict(), "rng": _rng_states(generator, device), "result": asdict(result),
            })
    if threads is not None:
        threads.restore()
    return result


@dataclass(frozen=True)
class Probe:
    """What a few timed training steps measured, per autocast dtype (None: fp32): ``cost`` on the cost clock
    (``devices.cost_clock``), ``wall`` on the wall clock; seconds per step, the median of the timed steps."""

    cost: dict[torch.dtype | None, float]
    wall: dict[torch.dtype | None, float]
    steps_per_epoch: int


PROBE_BATCH = 64  # images per step when only the precisions are compared (the ratio, not the epoch, is wanted)


def probe_steps(built: Built, data: Data, config: TrainConfig, device: torch.device,
                dtypes: tuple[torch.dtype | None, ...], *, steps: int = 3, batch: int | None = None,
                warmup: int = 1) -> Probe:
    """Times ``steps`` training steps (after ``warmup`` untimed ones) in each of ``dtypes``, interleaved so that a
    burst of load from another process hits every dtype alike, on a copy of the model with the real first batch (or
    its first ``batch`` images) and its augmentation: what the precision choice and the cost cap read before a trial
    trains. Validation and the optimizer's own update (SGD stands in for all) are not counted, so an epoch estimate
    from it errs low: the cap refuses only what is surely over it, and the measured epoch catches the rest. The
    model, its parameters and every RNG are left as they were.

    The precision choice probes ``PROBE_BATCH`` images: airbench94's network (Xeon with AMX-BF16, 2 threads) is 2.2x
    faster in bf16 at batch 64 and 1.8x at 256, a 16-32-64 CNN 1.33x and 1.53x: the same decision for a twentieth of
    the time a batch of 1,024 costs (benchmarks/README.md). Two warm-up steps then: the first bf16 step of a process
    builds oneDNN's bf16 kernels (0.55 s against 0.036 s for fp32, seen on MNIST's first trial), the second can too."""
    if device.type == "cpu":
        LoadAwareThreads(first_look=FIRST_LOOK)  # the threads a training would start with on this machine now
    model = copy.deepcopy(built.model).to(device).train()
    if channels_last(device):
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    prep = BatchPrep(data, built, device, translate=config.translate)
    bs = min(config.batch_size, len(data.train))
    x_raw, y = data.train.x[: batch or bs], data.train.y[: batch or bs]
    generator = torch.Generator(device=device).manual_seed(0)
    clock = cost_clock(device)
    cost: dict[torch.dtype | None, list[float]] = {d: [] for d in dtypes}
    wall: dict[torch.dtype | None, list[float]] = {d: [] for d in dtypes}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for _ in range(steps + warmup):
            for dtype in dtypes:
                t0, c0 = time.perf_counter(), clock()
                x = prep(x_raw, config.augmentation, generator)
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss.item()  # host sync: the device has finished this step
                cost[dtype].append(clock() - c0)
                wall[dtype].append(time.perf_counter() - t0)

    # The median of the timed steps (the warm-up, with its allocations and autotuning, is left out; of two, the
    # faster): one step slowed by another process on a shared machine does not decide.
    def median(seconds: list[float]) -> float:
        return sorted(seconds[warmup:])[(steps - 1) // 2]

    return Probe(cost={d: median(s) for d, s in cost.items()}, wall={d: median(s) for d, s in wall.items()},
                 steps_per_epoch=len(data.train) // bs)


def estimate_epoch_seconds(built: Built, data: Data, config: TrainConfig, device: torch.device, *,
                           amp: torch.dtype | None = None, steps: int = 3) -> float:
    """The cost-clock seconds one training epoch of ``config`` in ``amp`` will take, from ``probe_steps``."""
    probe = probe_steps(built, data, config, device, (amp,), steps=steps)
    return probe.cost[amp] * probe.steps_per_epoch


def _resolve(amp: torch.dtype | None | str, device: torch.device) -> torch.dtype | None:
    return autocast_dtype(device) if isinstance(amp, str) else amp


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


def _as_float(x: torch.Tensor, augmentation: str = "none", generator: torch.Generator | None = None,
              flip_mask: torch.Tensor | None = None) -> torch.Tensor:
    return x.float()  # precomputed features may be stored in fp16; "none" is the only augmentation they get
