"""A generated, learnable dataset for tests: each class is a fixed random low-frequency pattern; samples are
the class pattern, randomly shifted by up to 2 px, plus pixel noise. A small CNN beats chance clearly in one epoch."""

from __future__ import annotations

import os
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
    need = generation_bytes(args)
    have = physical_memory()
    if have is not None and need > have:
        raise SpecError(f"dataset {name!r}: generating {args.train + args.test} images of {args.channels}x{args.size}"
                        f"x{args.size} needs about {_gib(need)} of memory; this machine has {_gib(have)}")
    return args


# make_synthetic holds the float32 images, the noise added to them and their sum at once (3 x 4 bytes per
# value), then the uint8 result.
BYTES_PER_VALUE = 13


def generation_bytes(args: SyntheticArgs) -> int:
    return max(args.train, args.test) * args.channels * args.size * args.size * BYTES_PER_VALUE + \
        (args.train + args.test) * args.channels * args.size * args.size


def physical_memory() -> int | None:
    """This machine's RAM in bytes (None where the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


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
