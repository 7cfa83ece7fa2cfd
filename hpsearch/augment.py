"""Batched augmentation on the training device: whole-batch tensor ops, per-sample random parameters, no PIL.

Input and output: float images [B, C, H, W] in 0..255 units (before normalisation, so padding is black
as in torchvision's RandomCrop(padding=4)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LEVELS = ("none", "base")


def augment(x: torch.Tensor, level: str, *, flip: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    if level == "none":
        return x
    if level == "base":
        x = random_crop(x, padding=4, generator=generator)
        return random_flip(x, generator=generator) if flip else x
    raise ValueError(f"augmentation {level!r} is not known; allowed: {', '.join(LEVELS)}")


def random_flip(x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Horizontal flip of a random half of the batch (per sample, p = 0.5)."""
    mask = torch.rand(x.shape[0], 1, 1, 1, device=x.device, generator=generator) < 0.5
    return torch.where(mask, x.flip(-1), x)


def random_crop(x: torch.Tensor, *, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad by ``padding`` and cut an HxW window at a per-sample random offset (RandomCrop(padding=p)).

    One gather over the padded batch: rows and columns of each sample's window are index vectors.
    """
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (b,), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (b,), device=x.device, generator=generator)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # [B,1,H,1]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # [B,1,1,W]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]
