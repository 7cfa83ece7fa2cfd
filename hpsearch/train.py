"""Training one configuration: per-epoch permutation batches of device-resident uint8 data, augmentation and
normalisation fused into the batch step, evaluation under inference_mode, one host sync per epoch.

``fit`` gets every hyperparameter as an argument (a TrainConfig): nothing is read from globals. Its parts live beside
it: the input pipeline in ``preprocess``, the optimizer, schedules and weight averaging in ``schedules``, the
accuracy on a split in ``accuracy``, the types it takes and returns in ``train_types``: import them from there.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from hpsearch.accuracy import accuracy_on
from hpsearch.augment import augment
from hpsearch.data import Data
from hpsearch.devices import DEVICE_DEFAULT, LoadAwareThreads, cost_clock, resolve_amp, too_close_to_call
from hpsearch.preprocess import InputPipeline, channels_last, normalise
from hpsearch.schedules import WeightAverage, end_of_epoch, make_optimizer, make_scheduler, per_step
from hpsearch.train_types import Built, Diverged, EpochHook, FitResult, TrainConfig


class BatchPrep:
    """uint8 batch -> augmented, normalised, resized float batch, in one place for training and evaluation (the
    normalisation and resize are ``preprocess.normalise``, what the saved model runs too)."""

    def __init__(self, data: Data, built: Built, device: torch.device, *, translate: int = 2) -> None:
        pipeline = InputPipeline.of(built, data.info)
        self.scale, self.shift = pipeline.constants(device)
        self.size = pipeline.input_size
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
        x = normalise(x, self.scale, self.shift, self.size)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


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
    device's: CUDA's AMP, fp32 elsewhere); the weights, the optimizer state and the checkpoints stay fp32. ``tta``:
    after the last epoch the model is also validated with test-time augmentation (``result.final_accuracy``, seen
    by that epoch's ``on_epoch``).
    With ``on_checkpoint``, the full training state (weights, optimizer, scheduler, scaler, weight average, every
    random state, the curves so far) is handed to it after every epoch, once ``on_epoch`` has reported the epoch: a
    process killed between the two then repeats a reported epoch (same value) instead of leaving a gap. ``resume``
    is such a state: training goes on after its epoch. Whether to resume is the caller's decision. The state shares
    tensors with the live model and optimizer: ``on_checkpoint`` must serialise (or copy) it before returning.
    With ``compile``, the forward pass goes through ``torch.compile`` (its cost is paid per architecture, so per
    trial: see benchmarks/README.md for when it pays).
    """
    run = _Training(built, data, config, device=device, seed=seed, amp=resolve_amp(amp, device),
                    fresh=resume is None)
    result, start = (FitResult(), 0) if resume is None else run.restore(resume)
    # A compiled module wraps ``model``: checkpoints keep saving ``model``'s plain state_dict keys.
    forward = cast(nn.Module, torch.compile(run.model)) if compile else run.model
    clock = cost_clock(device)
    # Fewer threads while other processes run: from a first look before the first step, then every 2 s.
    threads = LoadAwareThreads(first_look=FIRST_LOOK) if device.type == "cpu" else None
    for epoch in range(start, config.epochs):
        t0, c0 = time.perf_counter(), clock()
        train_loss = run.train_epoch(epoch, forward, threads)
        cost = clock() - c0
        val_acc = run.validate(epoch, forward, result, tta)
        result.train_loss.append(train_loss)
        result.val_accuracy.append(val_acc)
        result.seconds_per_epoch.append(time.perf_counter() - t0)
        result.cost_seconds_per_epoch.append(cost)
        run.keep_if_best(epoch, val_acc, result)
        if on_epoch is not None:
            on_epoch(epoch, result)
        if on_checkpoint is not None:
            on_checkpoint(run.state(epoch, result))
    if threads is not None:
        threads.restore()
    return result


class _Training:
    """One ``fit``'s moving parts, set up in the order their random draws need: the model and how it is fed, the
    optimizer, schedule, scaler and weight average, the trial's generator and its flips; then one epoch, its
    validation and the checkpointed state."""

    def __init__(self, built: Built, data: Data, config: TrainConfig, *, device: torch.device, seed: int,
                 amp: torch.dtype | None, fresh: bool) -> None:
        self.config, self.device, self.amp, self.data = config, device, amp, data
        self.model = built.model.to(device)
        if channels_last(device):
            self.model = self.model.to(memory_format=torch.channels_last)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # a trial's batch shape is fixed: autotuned kernels pay after a step
        self.prep: Callable[..., torch.Tensor] = BatchPrep(data, built, device, translate=config.translate)
        if built.init_from_data is not None and fresh:
            built.init_from_data(self.prep(data.train.x[:WHITEN_IMAGES]))
        self.optimizer = make_optimizer(config, built.param_groups)
        n = len(data.train)
        self.bs = min(config.batch_size, n)
        # The remainder is dropped (a different one each epoch): no 1-sample BatchNorm batches.
        self.steps = n // self.bs
        self.scheduler = make_scheduler(config, self.optimizer, self.steps)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
        if built.precomputed is not None and config.augmentation == "none":
            # The frozen trunk would see the same images every epoch: its outputs, computed once (and cached across
            # trials), replace the images, and only the trainable top runs in the loop and is checkpointed.
            features = built.precomputed.inputs(data, self.prep)
            if features is not None:
                self.model, self.data, self.prep = built.precomputed.model, features, _as_float
        # What is checkpointed: the part that trains. A frozen trunk never changes, so a trial trained on cached trunk
        # outputs resumes in a process that cannot cache them (and the file holds no trunk weights).
        self.trained = built.precomputed.model if built.precomputed is not None else built.model
        self.average = WeightAverage(config.averaging, self.trained, total_steps=config.epochs * self.steps,
                                     decay=config.ema_decay)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        # Alternating flips: each image's first orientation, drawn once from the seed (a resumed trial draws the same).
        alternate = config.flip_mode == "alternating" and data.info.flip and config.augmentation != "none"
        self.first_flip = (torch.rand(n, device=device, generator=torch.Generator(device=device).manual_seed(seed + 1))
                           < 0.5 if alternate else None)
        classes = data.info.num_classes
        self.confusion = torch.zeros(classes * classes, dtype=torch.int64, device=device)

    def restore(self, state: dict[str, Any]) -> tuple[FitResult, int]:
        """Loads a checkpoint ``state``; returns its curves and the epoch to go on from."""
        self.trained.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])  # moves the state to the parameters' device
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if "average" in state:
            self.average.load_state_dict(state["average"])
        _set_rng_states(state["rng"], self.generator, self.device)
        return FitResult(**state["result"]), state["epoch"] + 1

    def train_epoch(self, epoch: int, forward: nn.Module, threads: LoadAwareThreads | None) -> float:
        """One pass over a fresh permutation of the training images; the mean training loss (Diverged if not finite)."""
        config, data, device, amp = self.config, self.data, self.device, self.amp
        self.model.train()
        loss_sum = torch.zeros((), device=device)
        perm = torch.randperm(len(data.train), device=device, generator=self.generator)
        for step in range(self.steps):
            if threads is not None:
                threads.poll()  # a clock read; /proc/stat every 2 s
            idx = perm[step * self.bs : (step + 1) * self.bs]
            flips = None if self.first_flip is None else self.first_flip[idx] ^ bool(epoch % 2)
            x = self.prep(data.train.x[idx], config.augmentation, self.generator, flips)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = F.cross_entropy(forward(x), data.train.y[idx], label_smoothing=config.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.average.update(epoch * self.steps + step + 1)
            if self.scheduler is not None and per_step(config):
                self.scheduler.step()
            loss_sum += loss.detach()
        train_loss = loss_sum.item() / self.steps  # host sync, once per epoch
        if not math.isfinite(train_loss):
            raise Diverged(f"training loss is {train_loss} at epoch {epoch}")
        return train_loss

    def validate(self, epoch: int, forward: nn.Module, result: FitResult, tta: str) -> float:
        """The validation accuracy of the weight average (the model itself without one); after the last epoch also
        with test-time augmentation (``result.final_accuracy``). Then the epoch schedule's step."""
        last = epoch + 1 == self.config.epochs
        live = self.average.end_epoch()
        val = self.data.val
        val_acc = accuracy_on(forward, val, self.prep, self.device, confusion=self.confusion, amp=self.amp)
        if last and tta != "none":
            result.final_accuracy = accuracy_on(forward, val, self.prep, self.device, amp=self.amp, tta=tta,
                                                flip=self.data.info.flip)
        if not last:
            self.average.resume_epoch(live)  # ema: training (and its checkpoint) goes on from the live weights
        end_of_epoch(self.scheduler, self.config, val_acc)
        return val_acc

    def keep_if_best(self, epoch: int, val_acc: float, result: FitResult) -> None:
        if val_acc > result.best_val_accuracy or result.best_epoch < 0:
            classes = self.data.info.num_classes
            result.best_val_accuracy, result.best_epoch = val_acc, epoch
            result.confusion = self.confusion.view(classes, classes).tolist()  # a host sync, on a new best epoch only

    def state(self, epoch: int, result: FitResult) -> dict[str, Any]:
        """What ``restore`` loads. The result travels with the weights: a resumed trial reports the same curves and
        best value."""
        return {
            "epoch": epoch, "model": self.trained.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "average": self.average.state_dict(),
            "rng": _rng_states(self.generator, self.device), "result": asdict(result),
        }


@dataclass(frozen=True)
class Probe:
    """What a few timed training steps measured, per autocast dtype (None: fp32): ``cost`` on the cost clock
    (``devices.cost_clock``), ``wall`` on the wall clock; seconds per step, the median of the timed steps."""

    cost: dict[torch.dtype | None, float]
    wall: dict[torch.dtype | None, float]
    steps_per_epoch: int
    timed_steps: int  # per dtype, the warm-up left out


PROBE_BATCH = 64  # images per step when only the precisions are compared (the ratio, not the epoch, is wanted)
PROBE_BATCH_MAX = 256  # the most images per step of the second look, when the first is too close to call
# A probe times its steps until each dtype has this many seconds of them (at most PROBE_MAX_STEPS steps): a step of a
# few milliseconds (the report's base CNN) is at the mercy of one interruption, and three of them decided nothing.
PROBE_SECONDS = 0.2
PROBE_MAX_STEPS = 30


def probe_batch(batch_size: int) -> int:
    """The most images per step the precision choice of a training at ``batch_size`` may time: its own batch, capped
    at ``PROBE_BATCH_MAX``. Two trainings with the same model and this number get the same choice."""
    return min(batch_size, PROBE_BATCH_MAX)


def probe_precisions(built: Built, data: Data, config: TrainConfig, device: torch.device,
                     dtypes: tuple[torch.dtype | None, ...]) -> Probe:
    """The timed steps ``devices.choose_precision`` reads: ``PROBE_BATCH`` images per step; where that is too close to
    call (``devices.too_close_to_call``), again at the training's own batch (``probe_batch``), which then decides. A
    small batch favours fp32 in a mid-size network: the 3-block 32-64-128 CNN's bf16 gain sat at the 1.1x threshold at
    64 images (fp32 chosen in one run, bf16 in the next) and was 1.29-1.51x in training at 128 (AMD EPYC Zen 5). Clear
    cases, most of them, cost one small probe, as before."""
    first = min(PROBE_BATCH, config.batch_size)
    probe = probe_steps(built, data, config, device, dtypes, batch=first, warmup=2)
    own = probe_batch(config.batch_size)
    if own > first and too_close_to_call(probe.cost):
        probe = probe_steps(built, data, config, device, dtypes, batch=own, warmup=2)
    return probe


def probe_steps(built: Built, data: Data, config: TrainConfig, device: torch.device,
                dtypes: tuple[torch.dtype | None, ...], *, steps: int = 3, batch: int | None = None,
                warmup: int = 1, min_seconds: float = PROBE_SECONDS) -> Probe:
    """Times at least ``steps`` training steps (after ``warmup`` untimed ones) in each of ``dtypes``, and more until
    each has ``min_seconds`` of them (``PROBE_MAX_STEPS`` at most), interleaved so that a
    burst of load from another process hits every dtype alike, on a copy of the model with the real first batch (or
    its first ``batch`` images) and its augmentation: what the precision choice and the cost cap read before a trial
    trains. Validation and the optimizer's own update (SGD stands in for all) are not counted, so an epoch estimate
    from it errs low: the cap refuses only what is surely over it, and the measured epoch catches the rest. The
    model, its parameters and every RNG are left as they were.

    The precision choice (``probe_precisions``) first probes ``PROBE_BATCH`` images: airbench94's network (Xeon with
    AMX-BF16, 2 threads) is 2.2x faster in bf16 at batch 64 and 1.8x at 256, a 16-32-64 CNN 1.33x and 1.53x: the
    same decision for a twentieth of the time a batch of 1,024 costs (benchmarks/README.md). Two warm-up steps then:
    the first bf16 step of a process builds oneDNN's bf16 kernels (0.55 s against 0.036 s for fp32, seen on MNIST's
    first trial), the second can too."""
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

    def timed_enough() -> bool:
        timed = len(wall[dtypes[0]]) - warmup
        least = min(sum(s[warmup:]) for s in wall.values())  # the timed seconds of the dtype with fewest
        return timed >= PROBE_MAX_STEPS or (timed >= steps and least >= min_seconds)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        while not timed_enough():
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
        timed = sorted(seconds[warmup:])
        return timed[(len(timed) - 1) // 2]

    return Probe(cost={d: median(s) for d, s in cost.items()}, wall={d: median(s) for d, s in wall.items()},
                 steps_per_epoch=len(data.train) // bs, timed_steps=len(wall[dtypes[0]]) - warmup)


def estimate_epoch_seconds(built: Built, data: Data, config: TrainConfig, device: torch.device, *,
                           amp: torch.dtype | None = None, steps: int = 3) -> float:
    """The cost-clock seconds one training epoch of ``config`` in ``amp`` will take, from ``probe_steps``."""
    probe = probe_steps(built, data, config, device, (amp,), steps=steps)
    return probe.cost[amp] * probe.steps_per_epoch

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
