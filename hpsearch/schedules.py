"""How the weights move: the optimizer, the learning-rate schedule and weight averaging of one training.

``make_optimizer`` and ``make_scheduler`` read a TrainConfig; ``linear`` is airbench94's per-step triangle, the
other schedules step once per epoch (``per_step``). ``WeightAverage`` (ema or lookahead) leaves the average in the
model at the end of every epoch. ``train.fit`` drives all three.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from hpsearch.train_types import TrainConfig


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


def end_of_epoch(scheduler: Any, config: TrainConfig, val_accuracy: float) -> None:
    """An epoch schedule's step after the epoch's validation (plateau watches its accuracy); per-step ones step
    after every batch instead."""
    if scheduler is None or per_step(config):
        return
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(val_accuracy)
    else:
        scheduler.step()


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
