"""What explaining a trial in optuna-dashboard costs (hpsearch.explain), against one CIFAR-10-sized epoch.

    .venv/bin/python benchmarks/bench_explain.py [--threads 2] [--repeats 3] [--train 45000]

Per trial: the layer table / MAC count (one batch-1 forward with hooks), two matplotlib PNGs, two artifact uploads
to a FileSystemArtifactStore and one note in an SQLite storage. Per epoch: the confusion counts inside evaluation
(a scatter_add_ per batch, on the device). The epoch is the report's base CNN through ``hpsearch.train.fit`` on
45,000 random uint8 CIFAR-shaped training images with a 5,000-image validation split (what val_fraction = 0.1
leaves); content does not change the time. With --train N < 45,000 (a busy machine) the epoch is measured on N
training images and its training part scaled to 45,000, linearly (fixed batch size). Times are minima over
--repeats: other processes only ever add time. Results are in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a fresh clone without installing

from hpsearch.accuracy import accuracy_on  # noqa: E402
from hpsearch.artifacts import open_artifact_store  # noqa: E402
from hpsearch.data import Data, DataInfo, Split  # noqa: E402
from hpsearch.devices import configure_threads  # noqa: E402
from hpsearch.explain import TrialExplainer, summarize  # noqa: E402
from hpsearch.strategies.scratch import ScratchConfig, build  # noqa: E402
from hpsearch.train import BatchPrep, fit  # noqa: E402
from hpsearch.train_types import Built, TrainConfig  # noqa: E402

TRAIN, VAL, CLASSES = 45_000, 5_000, 10
CONFIG = TrainConfig(epochs=1, batch_size=64, optimizer="sgd", lr=0.01, weight_decay=0.0, momentum=0.9)
BASE_CNN = ScratchConfig(channels=(6, 16), kernel_size=5, padding=0, stride=1, pool="max", pool_kernel=2,
                         pool_after="each", batch_norm=False, fc_widths=(120, 84), dropout=0.0, train=CONFIG)


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train", type=int, default=TRAIN, help="training images in the measured epoch")
    args = ap.parse_args()
    configure_threads(args.threads)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    device = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.train + VAL, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, CLASSES, (args.train + VAL,), generator=g)
    info = DataInfo(name="cifar10", channels=3, height=32, width=32, num_classes=CLASSES, mean=(0.5,) * 3,
                    std=(0.25,) * 3, flip=True, classes=tuple(f"class{i}" for i in range(CLASSES)))
    data = Data(train=Split(x[VAL:], y[VAL:]), val=Split(x[:VAL], y[:VAL]), info=info)

    def base() -> Built:
        torch.manual_seed(0)
        return build(BASE_CNN, info)

    print(f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"repeats {args.repeats}")
    measured = best_of(args.repeats, lambda: fit(base(), data, CONFIG, device=device, seed=0))

    built = base()
    model = built.model.to(memory_format=torch.channels_last)
    prep = BatchPrep(data, built, device)
    conf = torch.zeros(CLASSES * CLASSES, dtype=torch.int64)
    plain = best_of(args.repeats * 2, lambda: accuracy_on(model, data.val, prep, device))
    counted = best_of(args.repeats * 2, lambda: accuracy_on(model, data.val, prep, device, confusion=conf))
    print(f"evaluation of {VAL} images: {plain * 1e3:.1f} ms plain, {counted * 1e3:.1f} ms with confusion counts "
          f"(+{(counted - plain) * 1e3:.1f} ms per epoch)")
    epoch = (measured - counted) * TRAIN / args.train + counted
    print(f"one epoch, base CNN, {args.train} train + {VAL} val images (fit, with confusion): {measured:.3f} s"
          + (f"; scaled to {TRAIN} train images: {epoch:.3f} s" if args.train != TRAIN else ""))

    s_base = best_of(args.repeats, lambda: summarize(base().model, channels=3, size=32))
    resnet = torchvision.models.resnet18(num_classes=CLASSES)
    s_resnet = best_of(args.repeats, lambda: summarize(resnet, channels=3, size=32))
    print(f"layer table + MACs: base CNN {s_base * 1e3:.1f} ms "
          f"({summarize(base().model, channels=3, size=32).macs:,} MACs), ResNet18 at 32 px {s_resnet * 1e3:.1f} ms "
          f"({summarize(resnet, channels=3, size=32).macs:,} MACs)")

    result = fit(base(), data, CONFIG, device=device, seed=0)
    result.train_loss, result.val_accuracy = result.train_loss * 10, result.val_accuracy * 10  # a 10-epoch curve
    result.seconds_per_epoch = result.seconds_per_epoch * 10
    with tempfile.TemporaryDirectory() as tmp:
        study = optuna.create_study(storage=f"sqlite:///{tmp}/bench.db", direction="maximize")
        store = open_artifact_store(str(Path(tmp) / "artifacts"))
        explainer = TrialExplainer(store, base(), info, device=device)
        explainer.observe(result)

        def finish() -> None:
            trial = study.ask()
            explainer.finish(trial, complete=True)
            study.tell(trial, 0.0)

        first = best_of(1, finish)  # the first trial of a process also pays matplotlib's import and font set-up
        upload = best_of(args.repeats, finish)
    print(f"end of trial: 2 PNGs + 2 uploads + note (SQLite): {upload * 1e3:.1f} ms "
          f"(first trial of a process: {first * 1e3:.1f} ms)")
    per_trial = s_base + upload
    print(f"per trial: {per_trial * 1e3:.1f} ms = {100 * per_trial / epoch:.2f}% of one epoch; "
          f"per epoch (confusion): {100 * (counted - plain) / epoch:.2f}% of one epoch")


if __name__ == "__main__":
    main()
