"""Device choice, CPU threads, the cost clock and the precision policy (the only torch.cuda/mps probing in hpsearch).

Precision is decided by measuring, per trial: ``precision_candidates`` lists what a trial may train in, the trial
times a few training steps in each (``hpsearch.train.probe_steps``), and ``choose_precision`` keeps the fastest.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from hpsearch._errors import SpecError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# bf16 is kept only when its timed steps are at least this much faster than fp32's: a few percent are inside the
# probe's noise, and bf16 rounds the activations, so a tie goes to fp32.
BF16_MIN_SPEEDUP = 1.1
# A probe of a few small batches whose speed-up lies within this factor of BF16_MIN_SPEEDUP is too close to call: the
# 3-block 32-64-128 CNN measured 1.05-1.15x at 64 images and 1.29-1.51x trained at its batch of 128 (AMD EPYC Zen 5).
CLOSE_CALL = 1.25
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_STAT = Path("/proc/stat")
CPUINFO = Path("/proc/cpuinfo")
# The intra-op threads this process may use, and whether --threads fixed them (configure_threads).
THREADS: dict[str, int | bool] = {"configured": torch.get_num_threads(), "fixed": False}


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


# ---------------------------------------------------------------- CPU threads


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota of this process's cgroup in cores (a container's ``--cpus``), or None when unlimited or unknown.
    cgroup v2 ``cpu.max`` ("200000 100000": 2 cores; "max 100000": no limit), else v1 ``cpu.cfs_quota_us``."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def available_cpus() -> int:
    """Cores this process may run on: the affinity mask (taskset, --workers' pinning), capped by the cgroup's CPU
    quota (a container limited to 2 CPUs on a 64-core host must not start 64 threads)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return max(1, min(cores, math.ceil(limit))) if limit is not None else cores


def configure_threads(threads: int | None) -> int:
    """One intra-op thread per available core unless told otherwise; inter-op parallelism buys nothing here.

    By default the count follows the load (``LoadAwareThreads``) under OpenMP's own wait policy. Threads given
    explicitly stay as given: a float sum's order depends on the threads, so only a fixed count trains bit for bit
    the same whatever else the machine runs; the CLI then makes waiting threads sleep (``OMP_WAIT_POLICY=PASSIVE``,
    set before torch is imported), since beside a busy process a spinning thread burns the core its sibling needs.
    Measured on the 2-core CPU, a small MNIST CNN step with 2 threads (benchmarks/README.md, "A shared CPU"): alone
    52 ms spinning / 77 ms passive; beside one busy process 194 ms / 135 ms; with LoadAwareThreads 60 ms / 102 ms.
    """
    n = threads if threads else available_cpus()
    torch.set_num_threads(n)
    THREADS["configured"], THREADS["fixed"] = n, threads is not None
    return n


def _busy_seconds(cores: set[int], stat: Path) -> float | None:
    """CPU seconds the given cores have spent busy (user, nice, system, irq, softirq) since boot, by any process of
    this machine. Not steal: time the hypervisor gave another machine is no process fewer threads make room for."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy = 0
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores:
            user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields[:7])
            busy += user + nice + system + irq + softirq
    return busy / ticks


class LoadAwareThreads:
    """Fits torch's intra-op threads to the cores other processes leave free; ``poll`` (every training step) looks
    again every ``interval`` seconds. Other processes' share of this process's cores is their busy time in
    /proc/stat minus this process's CPU time; the threads are the cores minus that share, rounded, at least one,
    at most the configured count, never other than it where ``--threads`` fixed it. Fewer only when two looks in a row
    say so (alone, a blip of another process now and then measured 0.6 of a core for one look), back up at the first
    look that allows it; with ``first_look``, one look over that many seconds before the work starts decides at once.

    Why: with two threads on two cores, every parallel region waits for the slower thread, and beside one busy
    process one of them always is. Measured on the 2-core CPU (benchmarks/README.md, "A shared CPU"): an
    airbench94-class step took 545-696 ms with 2 threads beside one busy process, 356 ms with 1 (357 ms alone, 190
    ms with 2 threads alone); a small MNIST CNN 72-83 ms with 2 threads beside it, 71-74 ms with 1. Nothing changes
    where /proc/stat cannot be read (not Linux)."""

    def __init__(self, *, interval: float = 2.0, stat: Path = PROC_STAT, first_look: float = 0.0) -> None:
        self.most = int(THREADS["configured"])
        self.fixed = bool(THREADS["fixed"])
        try:
            self.cores = set(os.sched_getaffinity(0))
        except AttributeError:
            self.cores = set()
        self.interval, self.stat = interval, stat
        self.fewer_seen = False  # the previous look said fewer threads
        self.restore()  # a training cut short (pruned) may have left fewer
        if first_look and not self.fixed and self.most > 1:
            self._first_look(first_look)
        self.last = self._sample()

    def _first_look(self, seconds: float) -> None:
        """Threads from the cores' use over ``seconds`` before the work starts, when this process computes nothing:
        one look is enough then (the busy time is all other processes'). The precision and cost probe runs on them,
        so a neighbour does not make its threads wait (or spin) for a core it holds."""
        before = self._sample()
        time.sleep(seconds)
        self._set(before, self._sample(), at_once=True)

    def _sample(self) -> tuple[float, float, float | None]:
        return time.monotonic(), time.process_time(), _busy_seconds(self.cores, self.stat) if self.cores else None

    def poll(self) -> None:
        now = time.monotonic()
        if now - self.last[0] < self.interval or self.most <= 1 or self.fixed:
            return
        sample = self._sample()
        self._set(self.last, sample)
        self.last = sample

    def _set(self, before: tuple[float, float, float | None], after: tuple[float, float, float | None], *,
             at_once: bool = False) -> None:
        (t0, ours0, busy0), (t1, ours1, busy1) = before, after
        if busy0 is None or busy1 is None or t1 <= t0:
            return
        others = max(0.0, (busy1 - busy0) - (ours1 - ours0)) / (t1 - t0)  # cores' worth used by other processes
        threads = max(1, min(self.most, round(len(self.cores) - others)))
        fewer = threads < torch.get_num_threads()
        if fewer and not self.fewer_seen and not at_once:
            self.fewer_seen = True
            return
        self.fewer_seen = False
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)

    def restore(self) -> None:
        """The configured threads again (after a training): the next one starts from them."""
        if torch.get_num_threads() != self.most:
            torch.set_num_threads(self.most)


def cost_clock(device: torch.device) -> Callable[[], float]:
    """A clock for what a training costs, not for how long it waited: the cost caps and the precision probe read it.

    On a CPU, this process's CPU time divided by its configured threads: what the work would take spread over all
    its threads, which on an idle machine is at most the wall time, and the same whether ``LoadAwareThreads`` runs
    it on fewer. The time another process holds a core is not counted, and neither is most of the time a thread waits
    for its preempted sibling: LoadAwareThreads leaves no sibling to wait for, and with fixed threads the CLI sets
    OMP_WAIT_POLICY=PASSIVE. Measured on the
    2-core CPU beside one busy process (benchmarks/README.md, "A shared CPU"): a small MNIST CNN's step 1.7-2.3x the
    wall time, 1.0-1.2x on this clock; airbench94's with 2 threads 2.0x on this clock, with the 1 thread
    LoadAwareThreads leaves it 1.0x.
    On a GPU, the wall clock: the time is the device's, which another CPU process does not take.
    """
    if device.type == "cpu":
        threads = int(THREADS["configured"])
        return lambda: time.process_time() / threads
    return time.perf_counter


# ---------------------------------------------------------------- precision


def cpu_bf16_native(cpuinfo: Path = CPUINFO) -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX; ARM's BF16), from the flags Linux lists. oneDNN's
    own check (``torch.ops.mkldnn._is_mkldnn_bf16_supported``) says yes on any AVX-512 CPU, where bf16 is emulated:
    measured on an Intel Ice Lake Xeon (AVX-512, no AVX512-BF16), bf16 training ran at 0.45-0.78x fp32's speed
    (benchmarks/README.md). Where the flags cannot be read, oneDNN's check decides (and the probe still measures)."""
    try:
        flags = {flag for line in cpuinfo.read_text().splitlines()
                 if line.startswith(("flags", "Features")) for flag in line.split(":", 1)[1].split()}
    except (OSError, IndexError):
        flags = set()
    if flags:
        return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_precision(name: str, device: torch.device) -> None:
    """``--precision`` against what the device can do: a one-line error names what is allowed here."""
    if name not in PRECISIONS:
        raise SpecError(f"--precision: {name!r} is not a precision; allowed: {', '.join(PRECISIONS)}")
    if name == "fp16" and device.type != "cuda":
        raise SpecError(f"--precision: 'fp16' trains on CUDA only (with a gradient scaler); allowed on {device.type}: "
                        "auto, fp32, bf16")
    if name == "bf16" and device.type == "cpu" and not cpu_bf16_native():
        raise SpecError("--precision: 'bf16' was asked for, but this CPU has no bf16 instructions (AVX512-BF16 or AMX) "
                        "and would emulate it, slower than fp32; allowed here: auto, fp32")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SpecError("--precision: 'bf16' was asked for, but this GPU does not support it; allowed here: auto, "
                        "fp32, fp16")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """CUDA's mixed precision: bf16 where the GPU has it (no loss scaling needed), else fp16. None elsewhere: what a
    CPU trains in is measured per trial (``precision_candidates``)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# ``amp`` of train.fit/evaluate when the caller does not decide: the device's default (CUDA's AMP; fp32 elsewhere).
DEVICE_DEFAULT = "device"


def resolve_amp(amp: torch.dtype | None | str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: fp32) an ``amp`` argument means: ``DEVICE_DEFAULT`` is ``autocast_dtype``'s."""
    return autocast_dtype(device) if isinstance(amp, str) else amp


DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_name(dtype: torch.dtype | None) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


def precision_candidates(name: str, device: torch.device) -> tuple[torch.dtype | None, ...]:
    """The autocast dtypes (None: fp32) a trial may train in under ``--precision name``. One means no choice;
    ``auto`` on a CPU with native bf16 gives two, and the trial's timed steps pick (``choose_precision``)."""
    if name != "auto":
        return (DTYPES[name],)
    if device.type == "cuda":
        return (autocast_dtype(device),)
    if device.type == "cpu" and cpu_bf16_native():
        return (None, torch.bfloat16)
    return (None,)


def choose_precision(seconds: Mapping[torch.dtype | None, float]) -> torch.dtype | None:
    """The precision to train in, from the seconds of one timed training step in each candidate: bf16 (or fp16) when
    it is at least ``BF16_MIN_SPEEDUP`` times faster than fp32, else fp32. Measured on a Xeon with AMX-BF16 (2
    cores): an airbench-class CIFAR-10 network 2-3x faster in bf16, a 16-channel CNN slower (benchmarks/README.md)."""
    if len(seconds) == 1:
        return next(iter(seconds))
    low = _fastest_low(seconds)[0]
    return low if seconds[low] * BF16_MIN_SPEEDUP <= seconds[None] else None


def too_close_to_call(seconds: Mapping[torch.dtype | None, float]) -> bool:
    """Whether the speed-up of the fastest low precision over fp32 lies within ``CLOSE_CALL`` of the threshold, so a
    probe of more images should decide (``train.probe_precisions``). One candidate is never close."""
    if len(seconds) == 1:
        return False
    speedup = _fastest_low(seconds)[1]
    return BF16_MIN_SPEEDUP / CLOSE_CALL < speedup < BF16_MIN_SPEEDUP * CLOSE_CALL


def _fastest_low(seconds: Mapping[torch.dtype | None, float]) -> tuple[torch.dtype, float]:
    """The fastest low precision among the timed candidates, and its speed-up over fp32 (``seconds[None]``)."""
    low = min((d for d in seconds if d is not None), key=lambda d: seconds[d])
    return low, seconds[None] / seconds[low]
