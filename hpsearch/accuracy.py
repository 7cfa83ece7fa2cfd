"""Accuracy of a model on a split: training's per-epoch validation and evaluate's test measurement.

Batches of ``EVAL_BATCH`` under ``inference_mode`` in the caller's precision, with the study's test-time augmentation
(``tta_logits``, also what the saved model runs), and one host sync per evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from hpsearch.data import Split
from hpsearch.devices import DEVICE_DEFAULT, resolve_amp

EVAL_BATCH = 1024  # evaluation has no activations to keep for backward: big batches amortise per-call cost


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


def accuracy_on(model: nn.Module, split: Split, prep: Callable[[torch.Tensor], torch.Tensor],
             device: torch.device, *, confusion: torch.Tensor | None = None,
             amp: torch.dtype | None | str = DEVICE_DEFAULT, tta: str = "none", flip: bool = True) -> float:
    """Accuracy on ``split`` (in the training's precision ``amp``, with test-time augmentation ``tta``); with
    ``confusion`` (int64 [C*C] on ``device``), also fills it with the counts of (true, predicted) pairs, on the
    device: no extra host sync."""
    amp = resolve_amp(amp, device)
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
