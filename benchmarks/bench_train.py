"""Training-path benchmark: hpsearch's device-resident batch step against a seed-style PIL/DataLoader pipeline, the
compute floor, the augmentation levels, Optuna's per-trial overhead, one trial's peak memory, and fp32 against bf16
for three network sizes (with what ``--precision auto`` picks for each).

    .venv/bin/python benchmarks/bench_train.py --data-dir ../shared/datasets

Every row is a ratio measured side by side in this one run, on CIFAR-10-shaped data (CIFAR-10 when --data-dir has
it, else random uint8 images of the same shape; the table says which). Times are the minimum over --repeats runs:
other processes on a shared machine only ever add time. Results and the machine are in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import math
import platform
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import optuna
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a fresh clone without installing

from hpsearch.data import Data, DataInfo, Split, default_cache_dir, read_raw  # noqa: E402
from hpsearch.data import _readers as readers  # noqa: E402
from hpsearch.devices import choose_precision, configure_threads, cpu_bf16_native, resolve_device  # noqa: E402
from hpsearch.preprocess import channels_last  # noqa: E402
from hpsearch.saved_model import replay  # noqa: E402
from hpsearch.spec import load_spec, spec_from_dict, split_row  # noqa: E402
from hpsearch.storage import open_storage  # noqa: E402
from hpsearch.strategies.scratch import ScratchConfig, build, suggest  # noqa: E402
from hpsearch.study import open_study, run_trials  # noqa: E402
from hpsearch.train import PROBE_BATCH, fit, probe_batch, probe_precisions, probe_steps  # noqa: E402
from hpsearch.train_types import Built, TrainConfig  # noqa: E402

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
BATCH = 64  # the report's batch size, both pipelines
VAL_IMAGES = 256  # hpsearch's fit evaluates after each epoch: a small split keeps that out of the epoch time


# ---------------------------------------------------------------- data


def find_cifar(data_dir: Path | None) -> str | None:
    """What --data-dir holds, without downloading: 'CIFAR-10', 'CIFAR-10 (JPEG copy)' or None."""
    if data_dir is None:
        return None
    for d in (data_dir / "cifar10", data_dir):
        if readers.find_cifar(d) is not None:
            return "CIFAR-10"
    for d in (data_dir / "cifar10", data_dir / "cifar10-jpeg"):
        if readers.folder_classes(d) == CIFAR_CLASSES:
            jpeg = next((d / "train" / CIFAR_CLASSES[0]).iterdir()).suffix.lower() in (".jpg", ".jpeg")
            return "CIFAR-10 (JPEG copy)" if jpeg else "CIFAR-10 (image folders)"
    return None


def load_images(data_dir: Path | None, cache_dir: Path, n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """n + VAL_IMAGES training images as uint8 [N, 3, 32, 32] and labels, and what they are."""
    what = find_cifar(data_dir)
    if what is not None and data_dir is not None:
        x, y = read_raw("cifar10", data_dir, cache_dir).train
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[: n + VAL_IMAGES]
        return x[perm].contiguous(), y[perm].contiguous(), what
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n + VAL_IMAGES, 3, 32, 32), dtype=torch.uint8, generator=g)
    return x, torch.randint(0, 10, (n + VAL_IMAGES,), generator=g), "random uint8 images, CIFAR-10 shape"


def as_data(x: torch.Tensor, y: torch.Tensor, device: torch.device) -> Data:
    xf = x[VAL_IMAGES:].float().div_(255)
    info = DataInfo(name="cifar10", channels=3, height=32, width=32, num_classes=10,
                    mean=tuple(xf.mean(dim=(0, 2, 3)).tolist()), std=tuple(xf.std(dim=(0, 2, 3)).tolist()),
                    flip=True, classes=tuple(CIFAR_CLASSES))
    return Data(train=Split(x[VAL_IMAGES:].to(device), y[VAL_IMAGES:].to(device)),
                val=Split(x[:VAL_IMAGES].to(device), y[:VAL_IMAGES].to(device)), info=info)


# ---------------------------------------------------------------- the model and one epoch each way

TRAIN = TrainConfig(epochs=1, batch_size=BATCH, optimizer="sgd", lr=0.01, weight_decay=0.0, momentum=0.9)
BASE_CNN = ScratchConfig(channels=(6, 16), kernel_size=5, padding=0, stride=1, pool="max", pool_kernel=2,
                         pool_after="each", batch_norm=False, fc_widths=(120, 84), dropout=0.0, train=TRAIN)


def base_cnn(info: DataInfo) -> Built:
    """The report's base CNN, Conv(3,6,5)-pool-Conv(6,16,5)-pool-FC 120-84-10, built by hpsearch's scratch code."""
    torch.manual_seed(0)
    return build(BASE_CNN, info)


def hpsearch_epoch(data: Data, augmentation: str, device: torch.device, *, compile: bool = False) -> float:
    """One epoch through hpsearch.train.fit (model set-up and a 256-image evaluation included)."""
    t0 = time.perf_counter()
    fit(base_cnn(data.info), data, replace(TRAIN, augmentation=augmentation), device=device, seed=0,
        compile=compile)
    return time.perf_counter() - t0


def floor_epoch(data: Data, device: torch.device) -> float:
    """The compute floor: the same model, batch and optimizer on pre-made normalised tensors (shuffled once,
    batches are contiguous slices: no gather, no conversion, no augmentation)."""
    mean = torch.tensor(data.info.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(data.info.std, device=device).view(1, 3, 1, 1)
    perm = torch.randperm(len(data.train), device=device)
    fmt = torch.channels_last if channels_last(device) else torch.contiguous_format  # as fit: same kernels
    x = ((data.train.x[perm].float() / 255 - mean) / std).contiguous(memory_format=fmt)
    y = data.train.y[perm].contiguous()
    built = base_cnn(data.info)
    model = built.model.to(device).to(memory_format=fmt)
    optimizer = torch.optim.SGD(model.parameters(), lr=TRAIN.lr, momentum=TRAIN.momentum)
    t0 = time.perf_counter()
    for i in range(0, len(y) - BATCH + 1, BATCH):
        loss = F.cross_entropy(model(x[i : i + BATCH]), y[i : i + BATCH])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    _sync(device)
    return time.perf_counter() - t0


class SeedCifar(torch.utils.data.Dataset):
    """torchvision.datasets.CIFAR10's __getitem__ (``Image.fromarray`` of an HWC uint8 array, then the transform)
    over the arrays already in memory, whatever their source: the JPEG copy is not in CIFAR10's file format, and
    ImageFolder would add a JPEG decode per sample that the seed never paid."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform: object) -> None:
        self.data = x.permute(0, 2, 3, 1).numpy()  # HWC, as CIFAR10.data
        self.targets = y.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = Image.fromarray(self.data[i])
        return self.transform(img), self.targets[i]  # type: ignore[operator]


def seed_epoch(data: Data, x_cpu: torch.Tensor, y_cpu: torch.Tensor, device: torch.device) -> float:
    """The report's pipeline: per-sample PIL RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor +
    Normalize in a DataLoader (batch 64, 2 workers, shuffled), a step per batch with ``loss.item()``."""
    import torchvision.transforms as T

    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(data.info.mean, data.info.std)])
    dataset = SeedCifar(x_cpu, y_cpu, transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=2)
    model = base_cnn(data.info).model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=TRAIN.lr, momentum=TRAIN.momentum)
    t0 = time.perf_counter()
    model.train()
    running = 0.0
    for xb, yb in loader:  # workers start here, as in the seed (not persistent)
        xb, yb = xb.to(device), yb.to(device)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        optimizer.step()
        running += loss.item()
    return time.perf_counter() - t0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- Optuna overhead and peak memory


def optuna_overhead(trials: int) -> tuple[float, float]:
    """Seconds per trial of a trivial objective through hpsearch's storage, study and run loop (SQLite file,
    TPE, heartbeats): over all trials, and over the last quarter (TPE's cost grows with the history)."""
    spec = spec_from_dict({"name": "overhead", "dataset": "synthetic", "strategy": "scratch", "epochs": 1,
                           "n_trials": trials}, where="bench")
    ends: list[float] = []

    def objective(trial: optuna.Trial) -> float:
        return trial.suggest_float("x", -1, 1) ** 2 + trial.suggest_float("lr", 1e-4, 1e-1, log=True)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        storage = open_storage(f"sqlite:///{tmp}/bench.db")
        study = open_study(spec, storage)
        t0 = time.perf_counter()
        run_trials(study, objective, n_trials=trials, timeout=None,
                   on_trial_end=lambda s, t: ends.append(time.perf_counter()))
    total = ends[-1] - t0
    q = len(ends) * 3 // 4
    return total / len(ends), (ends[-1] - ends[q - 1]) / (len(ends) - q)


def trial_peak_rss(data_dir: Path | None, cache_dir: Path, dataset_found: bool, threads: int) -> tuple[float, str]:
    """Peak RSS (MiB) of a real `hpsearch run` process: one trial, one epoch, the base CNN, 10% validation."""
    dataset = "cifar10" if dataset_found else "synthetic:classes=10,size=32,channels=3,train=50000,test=16"
    study = textwrap.dedent(f"""\
        name = "rss"
        dataset = "{dataset}"
        strategy = "scratch"
        epochs = 1
        n_trials = 1
        [space]
        batch_size = {BATCH}
        augmentation = "base"
        optimizer = "sgd"
        scheduler = "none"
        [[enqueue]]
        conv_layers = 2
        channels_0 = 6
        channels_1 = 16
        kernel_size = 5
        padding = 0
        stride = 1
        pool = "max"
        pool_kernel = 2
        batch_norm = false
        fc_layers = 3
        fc_width_0 = 120
        fc_width_1 = 84
        """)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rss.toml"
        path.write_text(study)
        cmd = [sys.executable, "-m", "hpsearch", "run", str(path), "--storage", f"sqlite:///{tmp}/rss.db",
               "--cache-dir", str(cache_dir), "--device", "cpu", "--threads", str(threads)]
        if data_dir is not None:
            cmd += ["--data-dir", str(data_dir)]
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        if proc.returncode != 0:
            raise SystemExit(f"hpsearch run failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux; the largest child so far
    note = "" if peak > before else " (a larger child ran earlier: this is an upper bound)"
    return peak / 1024, ("CIFAR-10" if dataset_found else "synthetic 50,000x3x32x32") + note


# ---------------------------------------------------------------- the table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=None, help="where CIFAR-10 is looked for (else random data)")
    ap.add_argument("--cache-dir", type=Path, default=None, help="hpsearch's cache (decoded image folders)")
    ap.add_argument("--images", type=int, default=50_000, help="training images per epoch (default: all 50,000)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per measurement; the minimum is reported")
    ap.add_argument("--trials", type=int, default=200, help="trials for the Optuna overhead row")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (rows 1-3 run on it)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: available cores)")
    ap.add_argument("--compile", action="store_true", help="also time hpsearch base with torch.compile")
    ap.add_argument("--skip", default="", help="comma-separated rows to skip: seed,floor,levels,optuna,rss,precision")
    ap.add_argument("--precision-images", type=int, default=10_240, help="training images per precision epoch")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # as hpsearch's CLI does
    skip = set(filter(None, args.skip.split(",")))
    device = resolve_device(args.device)
    threads = configure_threads(args.threads)
    cache_dir = args.cache_dir or default_cache_dir()

    x, y, what = load_images(args.data_dir, cache_dir, args.images)
    data = as_data(x, y, device)
    n = len(data.train)
    cpu = platform.processor() or platform.machine()
    print(f"data: {what}, {n} training images, batch {BATCH}; device {device}, {threads} threads; "
          f"torch {torch.__version__}; {cpu}", flush=True)

    hpsearch_epoch(data, "base", device)  # warm-up: oneDNN primitives, allocator, thread pool
    rows: list[tuple[str, str, str, str]] = []  # (row, measured, ratio, goal)

    runs: dict[str, Callable[[], float]] = {}
    if "seed" not in skip:
        runs["seed"] = lambda: seed_epoch(data, x[VAL_IMAGES:], y[VAL_IMAGES:], device)
    for level in ("base",) + (() if "levels" in skip else ("none", "strong", "stronger")):
        runs[level] = lambda level=level: hpsearch_epoch(data, level, device)  # type: ignore[misc]
    if "floor" not in skip:
        runs["floor"] = lambda: floor_epoch(data, device)
    if args.compile:
        runs["compiled"] = lambda: hpsearch_epoch(data, "base", device, compile=True)
    # Round robin over the configurations, repeated: a burst of load from another process then hits one run of
    # several configurations instead of every run of one, and the minimum filters it out.
    times = {k: math.inf for k in runs}
    for _ in range(args.repeats):
        for k, run in runs.items():
            times[k] = min(times[k], run())
    for k, v in times.items():
        print(f"  {k:>9}: {v:7.2f} s/epoch  ({n / v:8.0f} img/s)", flush=True)

    if "seed" in times:
        r = times["seed"] / times["base"]
        rows.append(("1. seed PIL+DataLoader vs hpsearch base",
                     f"{times['seed']:.2f} s vs {times['base']:.2f} s", f"{r:.1f}x faster", _goal(r >= 5, ">= 5x")))
    if "floor" in times:
        r = times["floor"] / times["base"]
        rows.append(("2. hpsearch base vs compute floor", f"{times['base']:.2f} s vs {times['floor']:.2f} s",
                     f"{r:.2f} of floor throughput", _goal(r >= 0.85, ">= 0.85")))
        if "none" in times:
            r = times["floor"] / times["none"]
            rows.append(("   (hpsearch none vs compute floor)", f"{times['none']:.2f} s vs {times['floor']:.2f} s",
                         f"{r:.2f} of floor throughput", "-"))
    for level, goal in (("strong", 1.3), ("stronger", 1.6)):
        if level in times:
            r = times[level] / times["none"]
            rows.append((f"3. {level} vs none", f"{times[level]:.2f} s vs {times['none']:.2f} s",
                         f"{r:.2f}x the time", _goal(r <= goal, f"<= {goal}x")))
    if "compiled" in times:
        r = times["base"] / times["compiled"]
        rows.append(("   torch.compile vs eager (base)", f"{times['compiled']:.2f} s vs {times['base']:.2f} s",
                     f"{r:.2f}x faster (compile time included)", "-"))
    if "optuna" not in skip:
        mean, late = optuna_overhead(args.trials)
        rows.append((f"4. Optuna+SQLite per trial ({args.trials} trials)", f"mean {mean * 1e3:.1f} ms",
                     f"last quarter {late * 1e3:.1f} ms", _goal(max(mean, late) < 0.05, "< 50 ms")))
    if "rss" not in skip:
        mib, which = trial_peak_rss(args.data_dir, cache_dir, what.startswith("CIFAR-10"), threads)
        rows.append(("5. peak RSS, one trial (base CNN, 1 epoch)", f"{mib:.0f} MiB", which, "report"))
    if "precision" not in skip and device.type == "cpu":
        rows += precision_rows(data, device, min(args.precision_images, n), args.repeats)

    widths = [max(len(r[i]) for r in rows + [("row", "measured", "ratio", "goal")]) for i in range(4)]
    line = "| " + " | ".join(f"{{:<{w}}}" for w in widths) + " |"
    print()
    print(line.format("row", "measured", "ratio", "goal"))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line.format(*row))


# ---------------------------------------------------------------- fp32 against bf16 (issue #23)

ROOT = Path(__file__).resolve().parents[1]


def precision_models(info: DataInfo) -> dict[str, tuple[ScratchConfig, int]]:
    """Three sizes: the report's base CNN (0.65 M MACs), a 3-block 32-64-128 BatchNorm CNN (~40 M MACs at 32 px) and
    studies/cifar10-fast.toml's enqueued airbench94-class network (118 M MACs), each at its own batch size."""
    three = replace(BASE_CNN, channels=(32, 64, 128), kernel_size=3, padding="same", batch_norm=True, fc_widths=(),
                    train=replace(TRAIN, batch_size=128))
    airbench = airbench_row(info)
    return {"base CNN (report), batch 64": (BASE_CNN, 64), "3-block 32-64-128 BN CNN, batch 128": (three, 128),
            "airbench94-class (cifar10-fast), batch 1024": (replace(airbench, train=replace(airbench.train, epochs=1)),
                                                            1024)}


def airbench_row(info: DataInfo) -> ScratchConfig:
    """studies/cifar10-fast.toml's first enqueued row: the airbench94-class network and recipe, 1 epoch."""
    spec = load_spec(ROOT / "studies" / "cifar10-fast.toml")
    return suggest(replay(split_row(spec.enqueue[0])[0], spec.space), spec.space, 1, info)


def precision_epoch(config: ScratchConfig, data: Data, device: torch.device, amp: torch.dtype | None) -> float:
    """One epoch of ``config`` through hpsearch.train.fit in ``amp`` (set-up and a 256-image evaluation included)."""
    torch.manual_seed(0)
    built = build(config, data.info)
    t0 = time.perf_counter()
    fit(built, data, config.train, device=device, seed=0, amp=amp)
    return time.perf_counter() - t0


def precision_rows(data: Data, device: torch.device, images: int, repeats: int) -> list[tuple[str, str, str, str]]:
    subset = Data(train=Split(data.train.x[:images], data.train.y[:images]), val=data.val, info=data.info)
    rows = []
    for name, (config, batch) in precision_models(data.info).items():
        dtypes: tuple[torch.dtype | None, ...] = (None, torch.bfloat16) if cpu_bf16_native() else (None,)
        times = {d: math.inf for d in dtypes}
        precision_epoch(config, subset, device, dtypes[-1])  # warm-up: bf16 kernels are built on first use
        for _ in range(repeats):
            for d in dtypes:
                times[d] = min(times[d], precision_epoch(config, subset, device, d))
        torch.manual_seed(0)
        built = build(config, data.info)
        auto = "bf16" if choose_precision(probe_precisions(built, subset, config.train, device, dtypes).cost
                                          ) == torch.bfloat16 else "fp32"
        if len(dtypes) == 1:
            rows.append((f"6. {name}", f"fp32 {images / times[None]:.0f} img/s", "no native bf16 on this CPU",
                         f"auto: {auto}"))
            continue
        # What the probe saw at its first look and at the training's own batch (capped), beside the epochs' ratio.
        looks = {b: probe_steps(built, subset, config.train, device, dtypes, batch=b, warmup=2).cost
                 for b in sorted({min(PROBE_BATCH, batch), probe_batch(batch)})}
        seen = ", ".join(f"{c[None] / c[torch.bfloat16]:.2f}x at {b}" for b, c in looks.items())
        r = times[None] / times[torch.bfloat16]
        goal = _goal(r >= 2.5, ">= 2.5x") if name.startswith("airbench") else "report"
        rows.append((f"6. {name}", f"fp32 {images / times[None]:.0f} img/s, bf16 {images / times[torch.bfloat16]:.0f}"
                     f" img/s", f"bf16 {r:.2f}x faster; probe {seen}; auto: {auto}", goal))
    return rows


def _goal(met: bool, goal: str) -> str:
    return f"{goal}: {'met' if met else 'MISSED'}"


if __name__ == "__main__":
    main()
