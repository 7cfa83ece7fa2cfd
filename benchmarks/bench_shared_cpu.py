"""A shared CPU (issue #23): how much one training step slows down beside another busy process, per thread count and
OpenMP wait policy, and what the cost clock (hpsearch.devices.cost_clock: the training thread's CPU time) reads.

    .venv/bin/python benchmarks/bench_shared_cpu.py [--steps 30] [--hogs 1] [--model mnist|airbench]

Each setting runs in a fresh child process (OpenMP reads OMP_WAIT_POLICY when torch loads), first alone, then beside
``--hogs`` single-threaded busy processes (``while True: pass``) started just before it. Printed per setting: the
median wall time of one SGD step, the median cost-clock time of one step (hpsearch's: process CPU time over the
configured threads), and the ratio beside/alone of each. The last setting is hpsearch's own: OpenMP's wait policy and
``LoadAwareThreads`` (here looking every 0.3 s; the first steps of a run beside a busy process still use 2 threads). The
model: ``mnist`` a 3-block 32-64-128 BatchNorm CNN on 28x28 grey images, batch 128 (the issue's small MNIST CNN);
``airbench`` the airbench94-class CIFAR network of studies/cifar10-fast.toml in bf16 where the CPU has it, batch 256.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [  # (label, threads, OMP_WAIT_POLICY or None for OpenMP's default, hpsearch.devices.LoadAwareThreads)
    ("2 threads, OpenMP default (spin, then sleep)", 2, None, False),
    ("2 threads, OMP_WAIT_POLICY=ACTIVE", 2, "ACTIVE", False),
    ("2 threads, OMP_WAIT_POLICY=PASSIVE", 2, "PASSIVE", False),
    ("1 thread", 1, None, False),
    ("2 threads, PASSIVE + LoadAwareThreads", 2, "PASSIVE", True),
    ("2 threads, OpenMP default + LoadAwareThreads (hpsearch's default)", 2, None, True),
]


def child(threads: int, steps: int, model_name: str, load_aware: bool) -> None:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT))
    from hpsearch.devices import LoadAwareThreads, configure_threads, cost_clock, cpu_bf16_native

    configure_threads(None if load_aware else threads)  # a fixed count (--threads) would keep LoadAwareThreads off
    amp = None
    model: nn.Module
    if model_name == "mnist":
        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]
        model = nn.Sequential(*block(1, 32), *block(32, 64), *block(64, 128), nn.Flatten(), nn.Linear(128 * 9, 10))
        x, batch = torch.randn(128, 1, 28, 28), 128
    else:
        import optuna

        from hpsearch.saved_model import replay
        from hpsearch.spec import load_spec
        from hpsearch.strategies.scratch import build, suggest

        spec = load_spec(ROOT / "studies" / "cifar10-fast.toml")
        from hpsearch.data import DataInfo

        info = DataInfo(name="cifar10", channels=3, height=32, width=32, num_classes=10, mean=(0.5,) * 3,
                        std=(0.25,) * 3, flip=True, classes=tuple("abcdefghij"))
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        model = build(suggest(replay(spec.enqueue[0], spec.space), spec.space, 10, info), info).model
        x, batch = torch.randn(256, 3, 32, 32), 256
        amp = torch.bfloat16 if cpu_bf16_native() else None
    model = model.to(memory_format=torch.channels_last).train()
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    clock = cost_clock(torch.device("cpu"))
    governor = LoadAwareThreads(interval=0.3, first_look=0.25) if load_aware else None  # as fit starts one
    walls, costs, procs = [], [], []
    for i in range(steps + 3):
        if governor is not None:
            governor.poll()
        t0, c0, p0 = time.perf_counter(), clock(), time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp is not None):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()
        if i >= 3:
            walls.append(time.perf_counter() - t0)
            costs.append(clock() - c0)
            procs.append((time.process_time() - p0) / threads)
    print(json.dumps({"wall": sorted(walls)[len(walls) // 2], "cost": sorted(costs)[len(costs) // 2],
                      "proc": sorted(procs)[len(procs) // 2]}))


def measure(threads: int, wait: str | None, load_aware: bool, steps: int, model: str, hogs: int) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if wait is not None:
        env["OMP_WAIT_POLICY"] = wait
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(hogs)]
    try:
        time.sleep(0.5 if hogs else 0)
        out = subprocess.run([sys.executable, __file__, "--child", str(threads), "--steps", str(steps),
                              "--model", model] + (["--load-aware"] if load_aware else []),
                             env=env, capture_output=True, text=True, check=True).stdout
    finally:
        for p in busy:
            p.kill()
            p.wait()
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--hogs", type=int, default=1)
    parser.add_argument("--model", choices=("mnist", "airbench"), default="mnist")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--load-aware", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, args.model, args.load_aware)
        return
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"{cpu}, {len(os.sched_getaffinity(0))} cores; model {args.model}; {args.steps} steps; "
          f"{args.hogs} busy process(es) beside")
    print("| setting | wall ms alone | wall ms beside | wall x | cost-clock ms alone | cost-clock ms beside | "
          "cost-clock x |")
    print("|---|---|---|---|---|---|---|")
    for label, threads, wait, load_aware in SETTINGS:
        alone = measure(threads, wait, load_aware, args.steps, args.model, 0)
        beside = measure(threads, wait, load_aware, args.steps, args.model, args.hogs)
        print(f"| {label} | {alone['wall'] * 1e3:.0f} | {beside['wall'] * 1e3:.0f} | "
              f"{beside['wall'] / alone['wall']:.2f} | {alone['cost'] * 1e3:.0f} | {beside['cost'] * 1e3:.0f} | "
              f"{beside['cost'] / alone['cost']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
