"""A generated, learnable dataset for tests: each class is a fixed random low-frequency pattern; samples are
the class pattern, randomly shifted by up to 2 px, plus pixel noise. A small CNN beats chance clearly in one epoch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hpsearch._errors import SpecError


@dataclass(frozen=True)
class SyntheticArgs:
    classes: int = 4
    size: int = 16
    channels: int = 1
    train: int = 512
    test: int = 128
    seed: int = 0


def parse_synthetic(name: str) -> SyntheticArgs:
    """``synthetic`` or ``synthetic:classes=4,size=16,channels=3,train=512,test=128,seed=0``."""
    _, _, rest = name.partition(":")
    fields = {f: v for f, v in SyntheticArgs().__dict__.items()}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise SpecError(f"dataset {name!r}: {item!r} is not an argument; allowed: {', '.join(fields)} (key=int)")
        try:
            fields[key] = int(value)
        except ValueError:
            raise SpecError(f"dataset {name!r}: {key}={value!r} is not an integer") from None
    args = SyntheticArgs(**fields)
    valid = args.classes >= 2 and args.size >= 4 and args.channels in (1, 3)
    if not valid or args.train < args.classes or args.test < 1:
        raise SpecError(f"dataset {name!r}: needs classes >= 2, size >= 4, channels 1 or 3, "
                        "train >= classes, test >= 1")
    return args


def make_synthetic(args: SyntheticArgs, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(args.seed)
    # Class patterns come from the seed alone, so train and test share them.
    coarse = torch.rand(args.classes, args.channels, 4, 4, generator=g)
    patterns = F.interpolate(coarse, size=(args.size, args.size), mode="bilinear", align_corners=False)
    n = args.train if split == "train" else args.test
    g.manual_seed(args.seed * 1000 + (1 if split == "train" else 2))
    labels = torch.arange(n) % args.classes
    labels = labels[torch.randperm(n, generator=g)]
    images = patterns[labels]
    shifts = torch.randint(-2, 3, (2,), generator=g).tolist()  # a global shift per split, then per-sample noise
    images = torch.roll(images, shifts=shifts, dims=(2, 3))
    images = images + 0.25 * torch.randn(images.shape, generator=g)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels
