"""Frozen-trunk feature cache: seconds per epoch of a finetune trial with unfreeze = fc, cached vs uncached.

Both runs are the same trial (same seed, head, data and LR); the uncached one has ``Built.precomputed`` removed, so
the trunk runs on every batch of every epoch as it would with augmentation on. The cached run's one trunk pass over
the train and val images (what the first trial with a given key pays; later trials in the process get it free) is
reported separately from its per-epoch time.

Run (heavy: hold the shared CPU lock):
  flock /tmp/hpsearch-cpu.lock .venv/bin/python benchmarks/bench_finetune.py
  flock /tmp/hpsearch-cpu.lock .venv/bin/python benchmarks/bench_finetune.py --weights /tmp/resnet50-imagenet.pth \
      --dataset mnist --data-dir ../shared/datasets --train-fraction 0.05 --val-fraction 0.05
Without --weights a seeded random state_dict stands in (speed does not depend on the weight values).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torchvision.models as tvm

from hpsearch import data as datasets
from hpsearch import feature_cache
from hpsearch.devices import configure_threads, resolve_device
from hpsearch.strategies import finetune
from hpsearch.train import fit
from hpsearch.train_types import FitResult, TrainConfig


def run(config: finetune.FinetuneConfig, data: datasets.Data, device: torch.device, *,
        cached: bool) -> tuple[FitResult, float]:
    feature_cache.clear()  # the cached run pays for its trunk pass, as the first trial of a process does
    torch.manual_seed(0)
    built = finetune.build(config, data.info)
    if not cached:
        built.precomputed = None
    t0 = time.perf_counter()
    result = fit(built, data, config.train, device=device, seed=0)
    return result, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet50", choices=finetune.BACKBONES)
    parser.add_argument("--weights", help="state_dict file (default: a seeded random one)")
    parser.add_argument("--dataset", default="synthetic:channels=3,size=32,train=2048,test=16")
    parser.add_argument("--data-dir", type=Path, default=datasets.default_data_dir())
    parser.add_argument("--train-fraction", type=float, default=1.0)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()

    device = resolve_device(args.device)
    threads = configure_threads(args.threads) if device.type == "cpu" else 0
    data = datasets.load(args.dataset, data_dir=args.data_dir, cache_dir=datasets.default_cache_dir(), device=device,
                         val_fraction=args.val_fraction, train_fraction=args.train_fraction)
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights
        if weights is None:
            torch.manual_seed(0)
            weights = str(Path(tmp) / f"{args.backbone}-random.pth")
            torch.save(tvm.get_model(args.backbone).state_dict(), weights)
        train = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, optimizer="adam", lr=1e-3,
                            weight_decay=0.0, augmentation="none")
        config = finetune.FinetuneConfig(backbone=args.backbone, weights=weights, unfreeze="fc", head_widths=(),
                                         head_dropout=0.0, head_lr=1e-3, backbone_lr=0.0, layer_decay=1.0,
                                         input_size=args.input_size, train=train)
        print(f"{args.backbone} unfreeze=fc, {'random' if args.weights is None else weights} weights, {args.dataset} "
              f"({len(data.train)} train / {len(data.val)} val) at {args.input_size} px, batch {args.batch_size}, "
              f"{args.epochs} epochs, {device}" + (f" ({threads} threads)" if threads else ""))
        rows = {}
        for cached in (True, False):
            rows[cached] = run(config, data, device, cached=cached)
    print(f"{'path':<9} {'trunk pass s':>12} {'s/epoch':>9}  val accuracy per epoch")
    for cached, (result, total) in rows.items():
        per_epoch = sum(result.seconds_per_epoch) / len(result.seconds_per_epoch)
        once = total - sum(result.seconds_per_epoch) if cached else 0.0  # fit's set-up is ~ms of it
        accs = " ".join(f"{a:.4f}" for a in result.val_accuracy)
        print(f"{'cached' if cached else 'uncached':<9} {once:>12.2f} {per_epoch:>9.3f}  {accs}")
    speedup = sum(rows[False][0].seconds_per_epoch) / sum(rows[True][0].seconds_per_epoch)
    print(f"per-epoch speed-up: {speedup:.0f}x")


if __name__ == "__main__":
    main()
