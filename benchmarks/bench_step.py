"""hpsearch's training loop against the plain-PyTorch reference's (benchmarks/reference_fast_cifar.py), side by side:
the same airbench94-class network (studies/cifar10-fast.toml's enqueued row), the same images, batch and precision.

    .venv/bin/python benchmarks/bench_step.py [--images 10496] [--epochs 4] [--repeats 2] [--precision auto]

Each side trains ``--epochs`` epochs on the same random uint8 CIFAR-shaped images (bench_train.as_data: 10,240 to train
by default; speed does not depend on what the pixels show), alternating sides ``--repeats`` times; printed: training
seconds per step of each side (the minimum over repeats: other processes only ever add time) and their ratio. What is
timed is the training loop only: for the reference its ``train``'s epoch times (its per-epoch augmentation pass
included, its test passes not), for hpsearch ``train._Training.train_epoch`` as ``train.fit`` calls it (the per-step
augmentation and normalisation, the optimizer, the schedule and weight averaging included; validation not). Both start
weight averaging within the first 4 epochs.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a fresh clone without installing
sys.path.insert(0, str(ROOT / "benchmarks"))

import reference_fast_cifar as reference  # noqa: E402
from bench_train import airbench_row, as_data  # noqa: E402

from hpsearch.data import Data  # noqa: E402
from hpsearch.devices import configure_threads, cpu_bf16_native  # noqa: E402
from hpsearch.strategies.scratch import build  # noqa: E402
from hpsearch.train import _Training  # noqa: E402
from hpsearch.train_types import FitResult  # noqa: E402


def hpsearch_seconds_per_step(data: Data, epochs: int, amp: torch.dtype | None) -> float:
    """Seconds per training step of hpsearch's loop over ``epochs`` epochs of the enqueued airbench row."""
    config = airbench_row(data.info)
    train = replace(config.train, epochs=epochs)
    torch.manual_seed(0)
    run = _Training(build(replace(config, train=train), data.info), data, train, device=torch.device("cpu"), seed=0,
                    amp=amp, fresh=True)
    seconds = 0.0
    for epoch in range(epochs):
        t0 = time.perf_counter()
        run.train_epoch(epoch, run.model, None)
        seconds += time.perf_counter() - t0
        run.validate(epoch, run.model, FitResult(), "none")  # the weight average's end of epoch, as fit's
    return seconds / (epochs * run.steps)


def reference_seconds_per_step(data: Data, epochs: int, amp: torch.dtype | None) -> float:
    recipe = reference.Recipe(epochs=epochs)
    out = reference.train(recipe, data.train.x, data.train.y, data.val.x, data.val.y, autocast=amp is not None, seed=0)
    return out["train_seconds"] / (epochs * (len(data.train) // recipe.batch_size))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=10_496, help="256 validate, the rest train (batch 1024)")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                    help="auto: bf16 where the CPU runs it natively (as the reference decides), else fp32")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: available cores)")
    args = ap.parse_args()
    threads = configure_threads(args.threads)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and cpu_bf16_native())
    amp = torch.bfloat16 if bf16 else None
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (args.images,), generator=g)
    data = as_data(x, y, torch.device("cpu"))  # bench_train's: 256 images set aside for validation
    print(f"{len(data.train)} random CIFAR-shaped images, batch 1024, {args.epochs} epochs, "
          f"{'bf16 autocast' if bf16 else 'fp32'}, {threads} threads; torch {torch.__version__}; "
          f"{platform.processor() or platform.machine()}", flush=True)
    best = {"reference": float("inf"), "hpsearch": float("inf")}
    for repeat in range(args.repeats):
        for side, measure in (("reference", reference_seconds_per_step), ("hpsearch", hpsearch_seconds_per_step)):
            seconds = measure(data, args.epochs, amp)
            best[side] = min(best[side], seconds)
            print(f"  repeat {repeat}: {side:<9} {seconds * 1000:7.0f} ms per step", flush=True)
    ratio = best["hpsearch"] / best["reference"]
    print(f"ms per step (min of {args.repeats}): reference {best['reference'] * 1000:.0f}, hpsearch "
          f"{best['hpsearch'] * 1000:.0f}: hpsearch/reference {ratio:.3f}")


if __name__ == "__main__":
    main()
