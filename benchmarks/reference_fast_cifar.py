"""The limit, measured: an airbench94-class CIFAR-10 training in plain PyTorch for the CPU, with no hpsearch import.

What hpsearch's own search + final training is held against (benchmarks/README.md, "Accuracy per CPU-hour").
The recipe is Keller Jordan's airbench94 (github.com/KellerJordan/cifar10-airbench, airbench94.py: "94.01 average
accuracy in n=1000 runs", 3.83 s on an A100), re-written from its description for a CPU:
- network: a frozen 2x2 patch-whitening conv (24 filters: the eigenvectors of the training images' 2x2 patch
  covariance, and their negatives) + GELU, then three groups of 64/256/256 channels, each
  conv3x3 -> max-pool 2 -> BatchNorm -> GELU -> conv3x3 -> BatchNorm -> GELU; max-pool 3, a linear layer without
  bias, logits x 1/9. Convs start as identity (dirac) on their first in_channels filters; BatchNorm weights are
  frozen at 1, eps 1e-12, running-stat momentum 0.4.
- training: 9.9 epochs of batch 1024, Nesterov SGD (momentum 0.85; lr 11.5 and weight decay 0.0153 per 1024
  examples, decoupled), BatchNorm biases at 64x the lr, a triangular schedule (0.2 -> 1 at 23% of the steps ->
  0.07), label smoothing 0.2, lookahead weight averaging from epoch 3 (every 5 steps, decay 0.95^5 x progress^3),
  the whitening bias trained for the first 3 epochs only.
- data: flips that alternate per image every epoch (random first), translations of up to 2 px (reflect padding).
- test: test-time augmentation over 6 views (mirror x {no shift, 1 px up-left, 1 px down-right}).
- precision: bf16 autocast where the CPU runs bf16 natively (AMX / AVX512-BF16), else fp32 (``--precision``).

    python benchmarks/reference_fast_cifar.py --data-dir ../shared/datasets [--runs 3] [--epochs 9.9]

Reads CIFAR-10 from <data-dir>/cifar10/ or <data-dir>/cifar10-jpeg/: the python batches (cifar-10-batches-py) or
image folders train/<class>/*, test/<class>/* (the JPEG copy: then accuracies are "CIFAR-10 (JPEG copy)").
Decoded folders are cached as a .pt file under --cache-dir (default: a temporary directory's hpsearch-reference/).
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class Recipe:
    epochs: float = 9.9
    batch_size: int = 1024
    lr: float = 11.5  # per 1024 examples
    momentum: float = 0.85
    weight_decay: float = 0.0153  # per 1024 examples, decoupled from the lr
    bias_scaler: float = 64.0  # BatchNorm biases' lr multiplier (not their weight decay)
    label_smoothing: float = 0.2
    ema_start_epochs: int = 3
    ema_decay_base: float = 0.95
    ema_decay_pow: float = 3.0
    ema_every: int = 5
    whiten_bias_epochs: int = 3
    translate: int = 2
    widths: tuple[int, int, int] = (64, 256, 256)
    batchnorm_momentum: float = 0.6
    scaling_factor: float = 1 / 9
    tta_level: int = 2


# ---------------------------------------------------------------- data


def read_cifar(data_dir: Path, cache_dir: Path) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor,
                                                                                                    torch.Tensor], str]:
    """uint8 images [N, 3, 32, 32] and int64 labels for train and test; where they were read from."""
    for root in (data_dir / "cifar10", data_dir / "cifar10-jpeg", data_dir):
        batches = next((p for p in (root / "cifar-10-batches-py", root) if (p / "data_batch_1").is_file()), None)
        if batches is not None:
            train = _read_batches(batches, [f"data_batch_{i}" for i in range(1, 6)])
            return train, _read_batches(batches, ["test_batch"]), str(batches)
        if all((root / "train" / c).is_dir() for c in CLASSES):
            return (*_read_folders(root, cache_dir), f"{root} (image folders)")
    raise SystemExit(f"error: no CIFAR-10 under {data_dir} (cifar10/ or cifar10-jpeg/ with python batches or "
                     "train/<class>/ image folders)")


def _read_batches(folder: Path, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for n in names:
        with open(folder / n, "rb") as f:
            d = pickle.load(f, encoding="latin1")
        xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d["labels"]))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)).long()


def _read_folders(root: Path, cache_dir: Path) -> tuple[tuple[torch.Tensor, torch.Tensor],
                                                         tuple[torch.Tensor, torch.Tensor]]:
    from PIL import Image

    cache = cache_dir / f"{root.name}.pt"
    if cache.is_file():
        saved = torch.load(cache, weights_only=True)
        return (saved["train_x"], saved["train_y"]), (saved["test_x"], saved["test_y"])

    def split(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for label, c in enumerate(CLASSES):
            for f in sorted((root / name / c).iterdir()):
                with Image.open(f) as im:
                    xs.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
                ys.append(label)
        return torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous(), torch.tensor(ys)

    train, test = split("train"), split("test")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    torch.save({"train_x": train[0], "train_y": train[1], "test_x": test[0], "test_y": test[1]}, tmp)
    os.replace(tmp, cache)
    return train, test


def batch_crop(images: torch.Tensor, pad: int) -> torch.Tensor:
    """A random crop of the original size from images padded by ``pad`` (one shift per image, -pad..pad)."""
    n, c, hp, wp = images.shape
    h, w = hp - 2 * pad, wp - 2 * pad
    dy = torch.randint(0, 2 * pad + 1, (n,))
    dx = torch.randint(0, 2 * pad + 1, (n,))
    out = torch.empty((n, c, h, w), dtype=images.dtype).contiguous(memory_format=torch.channels_last)
    for sy in range(2 * pad + 1):  # one slice per shift: (2p+1)^2 copies of whole sub-batches, no per-image loop
        for sx in range(2 * pad + 1):
            mask = (dy == sy) & (dx == sx)
            out[mask] = images[mask, :, sy : sy + h, sx : sx + w]
    return out


# ---------------------------------------------------------------- network


class BatchNorm(nn.BatchNorm2d):
    def __init__(self, channels: int, momentum: float) -> None:
        super().__init__(channels, eps=1e-12, momentum=1 - momentum)
        self.weight.requires_grad = False  # stays at 1


class Conv(nn.Conv2d):
    def __init__(self, cin: int, cout: int, kernel_size: int = 3, padding: int | str = "same", bias: bool = False):
        super().__init__(cin, cout, kernel_size=kernel_size, padding=padding, bias=bias)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.bias is not None:
            self.bias.data.zero_()
        w = self.weight.data
        torch.nn.init.dirac_(w[: w.size(1)])  # identity on the first in_channels filters: an implicit residual


class ConvGroup(nn.Module):
    def __init__(self, cin: int, cout: int, bn_momentum: float) -> None:
        super().__init__()
        self.conv1, self.pool, self.norm1 = Conv(cin, cout), nn.MaxPool2d(2), BatchNorm(cout, bn_momentum)
        self.conv2, self.norm2, self.activ = Conv(cout, cout), BatchNorm(cout, bn_momentum), nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activ(self.norm1(self.pool(self.conv1(x))))
        return self.activ(self.norm2(self.conv2(x)))


class Mul(nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def make_net(r: Recipe) -> nn.Sequential:
    w1, w2, w3 = r.widths
    net = nn.Sequential(
        Conv(3, 24, kernel_size=2, padding=0, bias=True), nn.GELU(),
        ConvGroup(24, w1, r.batchnorm_momentum), ConvGroup(w1, w2, r.batchnorm_momentum),
        ConvGroup(w2, w3, r.batchnorm_momentum),
        nn.MaxPool2d(3), nn.Flatten(), nn.Linear(w3, 10, bias=False), Mul(r.scaling_factor),
    )
    net[0].weight.requires_grad = False
    return net.to(memory_format=torch.channels_last)


def init_whitening(conv: nn.Conv2d, images: torch.Tensor, eps: float = 5e-4) -> None:
    """The whitening filters: eigenvectors of the covariance of every 2x2 patch of ``images`` (normalised float),
    scaled by 1/sqrt(eigenvalue + eps), and their negatives."""
    c, (h, w) = images.shape[1], conv.weight.shape[2:]
    patches = images.unfold(2, h, 1).unfold(3, w, 1).transpose(1, 3).reshape(-1, c * h * w).double()
    cov = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.T.flip(0)
    filters = (eigenvectors / torch.sqrt(eigenvalues + eps)[:, None]).reshape(-1, c, h, w).float()
    conv.weight.data[:] = torch.cat((filters, -filters))


# ---------------------------------------------------------------- training


def triangle(steps: int, start: float, peak: float, end: float) -> torch.Tensor:
    """LR multiplier per step: linear from ``start`` to 1 at ``peak`` x steps, then linear to ``end``."""
    x = torch.arange(steps + 1, dtype=torch.float64)
    top = max(1, int(peak * steps))
    up = start + (1 - start) * x / top
    down = 1 + (end - 1) * (x - top) / max(1, steps - top)
    return torch.where(x < top, up, down)


def tta_logits(net: nn.Module, x: torch.Tensor, level: int) -> torch.Tensor:
    def mirror(v: torch.Tensor) -> torch.Tensor:
        return 0.5 * net(v) + 0.5 * net(v.flip(-1))

    if level == 0:
        return net(x)
    if level == 1:
        return mirror(x)
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    shifted = [padded[:, :, 0:32, 0:32], padded[:, :, 2:34, 2:34]]
    return 0.5 * mirror(x) + 0.5 * torch.stack([mirror(s) for s in shifted]).mean(0)


def evaluate(net: nn.Module, x: torch.Tensor, y: torch.Tensor, level: int, autocast: bool) -> float:
    net.eval()
    correct = 0
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for i in range(0, len(x), 1000):
            correct += int((tta_logits(net, x[i : i + 1000], level).argmax(1) == y[i : i + 1000]).sum())
    return correct / len(x)


def train(r: Recipe, train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *,
          autocast: bool, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    start = time.perf_counter()
    mean = train_x.float().mean(dim=(0, 2, 3)).view(1, 3, 1, 1) / 255
    std = train_x.float().std(dim=(0, 2, 3)).view(1, 3, 1, 1) / 255

    def normalise(x: torch.Tensor) -> torch.Tensor:
        return ((x.float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)

    images = normalise(train_x)
    tests = normalise(test_x)
    net = make_net(r)
    whiten = net[0]
    assert isinstance(whiten, nn.Conv2d)
    init_whitening(whiten, images[:5000])
    # Each image gets a random orientation once; then every image is mirrored every other epoch.
    flipped = torch.rand(len(images)) < 0.5
    images = torch.where(flipped.view(-1, 1, 1, 1), images.flip(-1), images)
    padded = F.pad(images, (r.translate,) * 4, mode="reflect")

    kilostep = 1024 * (1 + 1 / (1 - r.momentum))
    lr = r.lr / kilostep
    wd = r.weight_decay * r.batch_size / kilostep
    lr_biases = lr * r.bias_scaler
    norm_biases = [p for n, p in net.named_parameters() if "norm" in n and p.requires_grad]
    others = [p for n, p in net.named_parameters() if "norm" not in n and p.requires_grad]
    optimizer = torch.optim.SGD([dict(params=norm_biases, lr=lr_biases, weight_decay=wd / lr_biases),
                                 dict(params=others, lr=lr, weight_decay=wd / lr)],
                                momentum=r.momentum, nesterov=True)
    steps_per_epoch = len(images) // r.batch_size
    total_steps = math.ceil(steps_per_epoch * r.epochs)
    schedule = triangle(total_steps, start=0.2, peak=0.23, end=0.07)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    averaged: list[torch.Tensor] | None = None
    step = 0
    epoch_times = []
    for epoch in range(math.ceil(r.epochs)):
        t0 = time.perf_counter()
        net[0].bias.requires_grad = epoch < r.whiten_bias_epochs
        net.train()
        batch = batch_crop(padded, r.translate)
        if epoch % 2 == 1:
            batch = batch.flip(-1)
        order = torch.randperm(len(batch))
        for i in range(steps_per_epoch):
            idx = order[i * r.batch_size : (i + 1) * r.batch_size]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = F.cross_entropy(net(batch[idx]), train_y[idx], label_smoothing=r.label_smoothing,
                                       reduction="sum")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for g, base in zip(optimizer.param_groups, base_lrs, strict=True):
                g["lr"] = base * float(schedule[step])
            optimizer.step()
            step += 1
            if epoch >= r.ema_start_epochs and step % r.ema_every == 0:
                state = [t for t in net.state_dict().values() if t.is_floating_point()]
                if averaged is None:
                    averaged = [t.detach().clone() for t in state]
                else:
                    rho = r.ema_decay_base ** r.ema_every * (step / total_steps) ** r.ema_decay_pow
                    for a, t in zip(averaged, state, strict=True):
                        a.lerp_(t, 1 - rho)
                        t.copy_(a)
            if step >= total_steps:
                break
        if averaged is not None:  # the averaged weights, once more at the end of the epoch
            for a, t in zip(averaged, [t for t in net.state_dict().values() if t.is_floating_point()], strict=True):
                t.copy_(a)
        epoch_times.append(time.perf_counter() - t0)
        acc = evaluate(net, tests, test_y, 0, autocast)
        print(f"  epoch {epoch + 1:>2}  {epoch_times[-1]:6.1f} s  loss {loss.item() / r.batch_size:.4f}  "
              f"test acc (no TTA) {acc:.4f}", flush=True)
    tta = evaluate(net, tests, test_y, r.tta_level, autocast)
    return {"test_acc": tta, "seconds": time.perf_counter() - start, "train_seconds": sum(epoch_times)}


def bf16_native() -> bool:
    """Whether oneDNN has bf16 instructions here (AMX or AVX512-BF16); elsewhere bf16 is emulated and slow."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "hpsearch-reference")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--epochs", type=float, default=Recipe.epochs)
    parser.add_argument("--batch-size", type=int, default=Recipe.batch_size)
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    autocast = args.precision == "bf16" or (args.precision == "auto" and bf16_native())
    t0 = time.perf_counter()
    (train_x, train_y), (test_x, test_y), source = read_cifar(args.data_dir, args.cache_dir)
    loaded = time.perf_counter() - t0
    recipe = Recipe(epochs=args.epochs, batch_size=args.batch_size)
    print(f"data: {source}, {len(train_y)} train / {len(test_y)} test, loaded in {loaded:.1f} s; "
          f"{'bf16 autocast' if autocast else 'fp32'}, {args.threads} threads; torch {torch.__version__}; "
          f"{platform.processor() or platform.machine()}; {recipe.epochs} epochs of batch {recipe.batch_size}",
          flush=True)
    results = []
    for run in range(args.runs):
        result = train(recipe, train_x, train_y, test_x, test_y, autocast=autocast, seed=run)
        results.append(result)
        print(f"run {run}: test acc (TTA) {result['test_acc']:.4f}, {result['seconds']:.0f} s "
              f"(training {result['train_seconds']:.0f} s)", flush=True)
    accs = torch.tensor([r["test_acc"] for r in results])
    std = accs.std().item() if len(accs) > 1 else 0.0
    print(f"mean test acc {accs.mean():.4f} ± {std:.4f} over {len(accs)} runs; "
          f"mean {sum(r['seconds'] for r in results) / len(results):.0f} s per run + {loaded:.0f} s data")


if __name__ == "__main__":
    main()
