"""Device choice, CPU threads and the mixed-precision policy (the only torch.cuda/mps probing in hpsearch)."""

from __future__ import annotations

import os

import torch

from hpsearch._errors import SpecError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an explicit device that is not there is an error."""
    if name not in DEVICE_CHOICES and not name.startswith("cuda:"):
        raise SpecError(f"--device: {name!r} is not a device; allowed: {', '.join(DEVICE_CHOICES)}, cuda:N")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SpecError(f"--device: {name!r} was asked for, but PyTorch sees no CUDA device here")
    if name == "mps" and not torch.backends.mps.is_available():
        raise SpecError("--device: 'mps' was asked for, but PyTorch sees no MPS device here")
    return torch.device(name)


def available_cpus() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total: containers and taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        return os.cpu_count() or 1


def configure_threads(threads: int | None) -> int:
    """One intra-op thread per available core unless told otherwise; inter-op parallelism buys nothing here."""
    n = threads if threads else available_cpus()
    torch.set_num_threads(n)
    return n


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision on CUDA only: bf16 where the GPU has it (no loss scaling needed), else fp16.

    On CPU autocast slows small convolutions down, so training stays fp32 there.
    """
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
