"""``--workers K``: K worker processes on one study, each pinned to a device.

GPUs are dealt round robin (worker i on ``cuda:{i mod G}``); the CPU cores are split into K equal sets, each
worker pinned to its set with ``cores // K`` threads, so K small trials run side by side instead of K thread
pools fighting over the same cores. CPU workers never share a core: more of them than cores is refused (two
trainings on one core slowed each other 5-20x on the 2-core development machine). Each worker is an ordinary
``hpsearch worker`` process (a crash of one does not end the others; the study's heartbeats retry its trial), its
output lines prefixed with its number.

What a worker gets, all on its command line (``worker_command``) except the storage URL:
``worker STUDY --no-summary --device D --threads T`` (its slot), then, where the launching command has them,
``--precision`` (not auto), ``--n-trials``, ``--timeout``, ``--data-dir``, ``--cache-dir``, ``--artifacts``,
``--keep-checkpoints`` (not 0), ``--compile`` and ``--no-artifacts``. The storage URL, a password often, goes in
its environment as HPSEARCH_STORAGE (``worker_env``), where other local users cannot read it with ``ps``; the
environment variables of the options above are taken out of it, so that the command line alone decides them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch

from hpsearch._errors import SpecError
from hpsearch.devices import available_cpus


@dataclass(frozen=True)
class Slot:
    """Where one worker runs."""

    device: str  # "cpu", "cuda:1", "mps"
    threads: int  # torch intra-op threads
    cpus: tuple[int, ...] | None  # CPU affinity; None where the platform cannot pin (macOS, Windows)


def plan(workers: int, device: torch.device, *, gpus: int, cpus: Sequence[int] | None) -> list[Slot]:
    """Slots for ``workers`` processes. ``device`` is the resolved ``--device``: plain ``cuda`` spreads the
    workers over ``gpus`` devices, ``cuda:N`` (and ``mps``, ``cpu``) puts them all on that one. ``cpus`` is the
    affinity set to split (None: do not pin; threads are then ``os.cpu_count() // workers``)."""
    if workers < 1:
        raise SpecError(f"--workers: the value is {workers}, but must be --workers >= 1")
    if device.type == "cuda" and device.index is None and gpus < 1:
        raise SpecError("--device: 'cuda' was asked for, but PyTorch sees no CUDA device here")
    n_cpus = len(cpus) if cpus is not None else (os.cpu_count() or 1)
    if device.type == "cpu" and workers > n_cpus:
        raise SpecError(f"--workers: the value is {workers}, but this process may use {n_cpus} CPU core"
                        f"{'s' * (n_cpus != 1)} and CPU workers do not share one; allowed: 1..{n_cpus}")
    threads = max(1, n_cpus // workers)
    slots = []
    for i in range(workers):
        if device.type == "cuda" and device.index is None:
            name = f"cuda:{i % gpus}"
        else:
            name = str(device)
        pinned = None
        if cpus is not None:
            cores = list(cpus)
            # More GPU workers than cores: each gets one core, shared round robin (the GPU does the work).
            pinned = tuple(cores[i * threads : (i + 1) * threads]) if workers <= n_cpus else (cores[i % n_cpus],)
        slots.append(Slot(device=name, threads=threads, cpus=pinned))
    return slots


def local_plan(workers: int, device: torch.device) -> list[Slot]:
    """``plan`` for this machine: its visible GPUs and this process's CPU affinity, cut to its cgroup's CPU quota
    (``devices.available_cpus``: a container limited to 2 CPUs on a 64-core host gets 2 cores' worth)."""
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    cpus = sorted(os.sched_getaffinity(0))[: available_cpus()] if hasattr(os, "sched_getaffinity") else None
    return plan(workers, device, gpus=gpus, cpus=cpus)


# The environment variables of worker options that worker_command puts on the command line when the launching
# command has them (its own values came from them where no flag was given). HPSEARCH_DATA and HPSEARCH_CACHE stay:
# a launching command that read one passes its value as --data-dir / --cache-dir, and the data's messages name them.
OPTION_ENV = ("HPSEARCH_PRECISION", "HPSEARCH_KEEP_CHECKPOINTS", "HPSEARCH_ARTIFACTS")


def worker_command(study: str, slot: Slot, *, n_trials: int | None, timeout: float | None,
                   data_dir: Path | None, cache_dir: Path | None, compile: bool, explain: bool = True,
                   precision: str = "auto", keep_checkpoints: int = 0, artifacts: str | None = None) -> list[str]:
    """The ``hpsearch worker`` command line of one slot (the module's docstring lists what it carries). The
    storage URL is not on it: see ``worker_env``."""
    # --no-summary: the launching command prints the one summary table once every worker has ended.
    cmd = [sys.executable, "-m", "hpsearch", "worker", study, "--no-summary",
           "--device", slot.device, "--threads", str(slot.threads)]
    valued = [("--precision", None if precision == "auto" else precision), ("--n-trials", n_trials),
              ("--timeout", timeout), ("--data-dir", data_dir), ("--cache-dir", cache_dir),
              ("--artifacts", artifacts), ("--keep-checkpoints", keep_checkpoints or None)]
    for flag, value in valued:
        if value is not None:
            cmd += [flag, str(value)]
    if compile:
        cmd.append("--compile")
    if not explain:
        cmd.append("--no-artifacts")
    return cmd


def worker_env(storage: str) -> dict[str, str]:
    """The workers' environment: the storage URL (a password, often) goes here, where only this user can read
    it, and not on the command line, which every local user sees with ``ps``. The variables of OPTION_ENV are
    left out: the command line carries those options."""
    return {**{k: v for k, v in os.environ.items() if k not in OPTION_ENV}, "HPSEARCH_STORAGE": storage}


def launch_workers(study: str, workers: int, device: torch.device, *, storage: str, n_trials: int | None,
                   timeout: float | None, data_dir: Path | None, cache_dir: Path | None, compile: bool,
                   out: IO[str] | None = None, explain: bool = True, precision: str = "auto",
                   keep_checkpoints: int = 0, artifacts: str | None = None) -> int:
    """Runs ``workers`` ``hpsearch worker`` processes on ``study`` (which must exist) until they end; returns
    the exit code for the command that launched them."""
    slots = local_plan(workers, device)
    commands = [worker_command(study, slot, n_trials=n_trials, timeout=timeout, data_dir=data_dir,
                               cache_dir=cache_dir, compile=compile, explain=explain, precision=precision,
                               keep_checkpoints=keep_checkpoints, artifacts=artifacts)
                for slot in slots]
    return start_and_wait(commands, slots, out=out, env=worker_env(storage))


def start_and_wait(commands: Sequence[list[str]], slots: Sequence[Slot], *, out: IO[str] | None = None,
                   env: dict[str, str] | None = None) -> int:
    """Starts one process per command (pinned to its slot's cores), relays their output line by line as
    ``[w<i> <device>] line``, and waits for all. Returns 0, 130 if any was interrupted, else the first
    failing worker's exit code; 143 after SIGTERM, which is forwarded to every worker."""
    out = out or sys.stdout
    lock = threading.Lock()
    procs: list[subprocess.Popen[str]] = []
    relays: list[threading.Thread] = []
    for i, (cmd, slot) in enumerate(zip(commands, slots, strict=True)):
        pin = slot.cpus
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env,
            # Affinity set in the child before torch starts its thread pool: threads inherit it.
            preexec_fn=(lambda cores=pin: os.sched_setaffinity(0, cores)) if pin else None,
        )
        procs.append(proc)
        relay = threading.Thread(target=_relay, args=(proc, f"[w{i} {slot.device}] ", out, lock), daemon=True)
        relay.start()
        relays.append(relay)
    terminated = False

    def forward(signum: int, frame: object) -> None:
        # docker stop / Kubernetes signal only this process: each worker ends its trial (marked FAIL, retried)
        nonlocal terminated
        terminated = True
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, forward) if threading.current_thread() is threading.main_thread() else None
    codes = []
    try:
        for proc in procs:
            codes.append(proc.wait())
    except KeyboardInterrupt:  # the terminal sent SIGINT to the workers too: let them mark their trials
        codes = [proc.wait() for proc in procs]
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    for relay in relays:
        relay.join()
    if terminated:
        return 128 + signal.SIGTERM
    if 130 in codes or any(c < 0 for c in codes):
        return 130
    return next((c for c in codes if c != 0), 0)


def _relay(proc: subprocess.Popen[str], prefix: str, out: IO[str], lock: threading.Lock) -> None:
    assert proc.stdout is not None  # Popen(stdout=PIPE) always has it
    for line in proc.stdout:
        with lock:
            out.write(prefix + line)
            out.flush()
