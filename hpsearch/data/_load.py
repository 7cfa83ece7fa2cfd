"""Datasets as uint8 tensors on the training device: read once per process, split train/val with a fixed seed.

Lookup order for a named dataset under the data directory (first hit wins):
``<dir>/<name>/`` with the raw files, torchvision's own layout (``<dir>/MNIST/raw``, ...), then a download
with torchvision into the cache directory (the data directory may be read-only). CIFAR-10 is also read
from image folders with its ten class names (``<dir>/cifar10/`` or ``<dir>/cifar10-jpeg/``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from hpsearch._errors import HpsearchError, SpecError
from hpsearch._paths import default_cache_dir as default_cache_dir  # re-exported by hpsearch.data
from hpsearch._paths import default_data_dir as default_data_dir
from hpsearch.data import _readers as readers
from hpsearch.data._synthetic import make_synthetic, parse_synthetic

NAMED = ("mnist", "fashion-mnist", "cifar10")
DIGITS = {"mnist"}  # horizontal flips change a digit's meaning; no flip augmentation for these
CLASS_NAMES = {
    "mnist": [str(i) for i in range(10)],
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
}
# torchvision's folder names, so a directory torchvision downloaded into works as is.
TORCHVISION_DIRS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "cifar-10-batches-py"}
DATASET_RULE = "mnist, fashion-mnist, cifar10, folder:<path>, synthetic[:key=value,...]"


def check_dataset_name(name: str) -> None:
    """Load-time check of a study file's ``dataset`` (files are looked for only when a trial runs)."""
    if name in NAMED:
        return
    if name.startswith("synthetic"):
        if name == "synthetic" or name.startswith("synthetic:"):
            parse_synthetic(name)
            return
    if name.startswith("folder:") and len(name) > len("folder:"):
        return
    raise SpecError(f"dataset {name!r} is not known; allowed: {DATASET_RULE}")


@dataclass(frozen=True)
class DataInfo:
    name: str
    channels: int
    height: int
    width: int
    num_classes: int
    mean: tuple[float, ...]  # per channel, of the training split, in [0, 1] units
    std: tuple[float, ...]
    flip: bool  # whether horizontal flips are label-preserving
    classes: tuple[str, ...]


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # uint8 [N, C, H, W] on the training device
    y: torch.Tensor  # int64 [N] on the training device

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Data:
    train: Split
    val: Split
    info: DataInfo


class SealedTestSplit(HpsearchError):
    """The test split was touched outside final evaluation (a bug: the search must never see test images)."""


# Test-split reads so far in this process: the test suite checks that a search leaves it at 0.
TEST_READS = {"count": 0}
_OPEN = {"depth": 0}


@contextmanager
def _test_open() -> Iterator[None]:
    _OPEN["depth"] += 1
    try:
        yield
    finally:
        _OPEN["depth"] -= 1


@dataclass(frozen=True)
class Raw:
    """The files as read. ``test`` is sealed: it raises unless opened by ``load_test`` (final evaluation only),
    so the search cannot select hyperparameters on the test images even by mistake."""

    train: readers.Arrays
    sealed_test: readers.Arrays = field(repr=False)
    classes: tuple[str, ...]
    source: str  # where it was read from, for messages

    @property
    def test(self) -> readers.Arrays:
        if _OPEN["depth"] <= 0:
            raise SealedTestSplit("the test split is read only by the final retraining of evaluate, reproduce "
                                  "and export-model (data.load_test); the search uses the train/val split")
        TEST_READS["count"] += 1
        return self.sealed_test


# ---------------------------------------------------------------- reading (cached per process)

_RAW: dict[tuple[str, str], Raw] = {}
_SPLITS: dict[tuple, Data] = {}


def read_raw(name: str, data_dir: Path, cache_dir: Path) -> Raw:
    key = (name, str(data_dir))
    if key not in _RAW:
        _RAW[key] = _read_raw(name, data_dir, cache_dir)
    return _RAW[key]


def _read_raw(name: str, data_dir: Path, cache_dir: Path) -> Raw:
    check_dataset_name(name)
    if name.startswith("synthetic"):
        args = parse_synthetic(name)
        classes = tuple(f"class{i}" for i in range(args.classes))
        return Raw(make_synthetic(args, "train"), make_synthetic(args, "test"), classes, "generated")
    if name.startswith("folder:"):
        return _read_folder(name, data_dir, cache_dir)
    _check_data_dir(data_dir)  # before the lookup: a file there would end in "no files found" and a download
    classes = tuple(CLASS_NAMES[name])
    looked = []
    for root in (data_dir, cache_dir / "downloads"):
        for directory in _candidates(name, root):
            looked.append(str(directory))
            if name == "cifar10":
                location = readers.find_cifar(directory)
                if location is not None:
                    return Raw(readers.read_cifar(location, "train"), readers.read_cifar(location, "test"),
                               classes, str(location))
                if readers.folder_classes(directory) == sorted(classes):  # CIFAR-10 saved as image folders
                    return _read_folder_root(directory, cache_dir)
            elif readers.find_idx(directory):
                return Raw(readers.read_idx(directory, "train"), readers.read_idx(directory, "test"),
                           classes, str(directory))
        if root == data_dir:
            download_error = _download(name, cache_dir / "downloads")
    raise HpsearchError(
        f"dataset {name!r}: no files found in {', '.join(dict.fromkeys(looked))} and the download failed "
        f"({download_error}); put {_expected(name)} in {data_dir / name} (or pass --data-dir)"
    )


def _check_data_dir(data_dir: Path) -> None:
    """A data directory that is a file (or lies under one) is bad input (exit 2), said as such before any lookup.
    One that does not exist is not: a named dataset is then downloaded into the cache directory."""
    for path in (data_dir, *data_dir.parents):
        if path.exists():
            if not path.is_dir():
                where = "" if path == data_dir else f" is under {str(path)!r}, which"
                raise SpecError(f"{_data_dir_option(data_dir)}: {str(data_dir)!r}{where} is a "
                                f"{'file' if path.is_file() else 'special file'}, not a directory; give the folder "
                                "datasets are looked for in")
            return


def _data_dir_option(data_dir: Path) -> str:
    """How the user gave the data directory: the CLI takes HPSEARCH_DATA when --data-dir is not given."""
    env = os.environ.get("HPSEARCH_DATA")
    return "HPSEARCH_DATA" if env and Path(env) == data_dir else "--data-dir"


def _candidates(name: str, root: Path) -> list[Path]:
    tv = TORCHVISION_DIRS[name]
    if name == "cifar10":
        return [root / name, root / "cifar10-jpeg", root]
    return [root / name, root / tv / "raw", root / name / tv / "raw", root]


def _expected(name: str) -> str:
    if name == "cifar10":
        return "cifar-10-batches-py/, cifar-10-python.tar.gz or image folders train/<class>/*"
    return "the four IDX files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-...)"


def _download(name: str, root: Path) -> str:
    """torchvision's downloader (the path users with internet get); returns why it failed, or '' on success."""
    import torchvision.datasets as tvd

    cls = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10}[name]
    try:
        root.mkdir(parents=True, exist_ok=True)
        for train in (True, False):
            cls(str(root / name), train=train, download=True)
    except Exception as e:  # network errors come as many types (URLError, RuntimeError, OSError)
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no message'}"
    return ""


def _read_folder(name: str, data_dir: Path, cache_dir: Path) -> Raw:
    path = Path(name.removeprefix("folder:")).expanduser()
    if not path.is_absolute():
        _check_data_dir(data_dir)
    root = path if path.is_absolute() else data_dir / path
    if root.exists() and not root.is_dir():
        raise SpecError(f"dataset {name!r}: {str(root)!r} is a file, not a directory (expected a folder with "
                        "train/<class>/*)")
    if not readers.folder_classes(root):  # a bad path in the study file (or --data-dir): bad input, exit 2
        raise SpecError(f"dataset {name!r}: {root / 'train'} has no class folders (expected train/<class>/*)")
    return _read_folder_root(root, cache_dir)


def _read_folder_root(root: Path, cache_dir: Path) -> Raw:
    name = f"folder:{root}"
    classes = readers.folder_classes(root)
    if not classes:
        raise HpsearchError(f"dataset {name!r}: {root / 'train'} has no class folders (expected train/<class>/*)")
    if len(classes) < 2:
        raise SpecError(f"dataset {name!r}: {root / 'train'} has a single class folder ({classes[0]!r}); nothing to "
                        "classify: a classifier needs at least 2 classes (train/<class>/* for each)")
    cache = cache_dir / "folders" / f"{root.name}-{readers.folder_fingerprint(root)}.pt"
    if cache.is_file():
        saved = torch.load(cache, weights_only=True)
        _check_labels(name, root, classes, saved["train_y"])
        return Raw((saved["train_x"], saved["train_y"]), (saved["test_x"], saved["test_y"]), tuple(classes), str(root))
    train = readers.read_folder(root, "train", classes, size=None)
    _check_labels(name, root, classes, train[1])  # before the cache is written
    size = (train[0].shape[3], train[0].shape[2])
    has_test = bool(readers.folder_files(root, "test", classes))
    test = readers.read_folder(root, "test", classes, size=size) if has_test else (train[0][:0], train[1][:0])
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    torch.save({"train_x": train[0], "train_y": train[1], "test_x": test[0], "test_y": test[1]}, tmp)
    os.replace(tmp, cache)  # atomic: a concurrent worker never reads a half-written cache
    return Raw(train, test, tuple(classes), str(root))


def _check_labels(name: str, root: Path, classes: list[str], labels: torch.Tensor) -> None:
    """At least two classes with training images: the other class folders may be empty."""
    present = set(labels.unique().tolist())
    if len(present) < 2:
        empty = [c for i, c in enumerate(classes) if i not in present]
        shown = ", ".join(map(repr, empty[:5])) + (", ..." if len(empty) > 5 else "")
        raise SpecError(f"dataset {name!r}: only class {classes[min(present)]!r} has images in {root / 'train'} "
                        f"(none in {shown}); nothing to classify: a classifier needs at least 2 classes")


# ---------------------------------------------------------------- split and move to the device


def load(
    name: str,
    *,
    data_dir: Path,
    cache_dir: Path,
    device: torch.device,
    val_fraction: float,
    train_fraction: float = 1.0,
    seed: int = 0,
) -> Data:
    """Train/val split of the training set, on ``device``. The test set is not part of it (final evaluation only)."""
    key = (name, str(data_dir), str(device), val_fraction, train_fraction, seed)
    if key not in _SPLITS:
        raw = read_raw(name, data_dir, cache_dir)
        _SPLITS.clear()  # keep one split on the device at a time: a process runs one study
        _SPLITS[key] = _split(name, raw, device, val_fraction, train_fraction, seed)
    return _SPLITS[key]


def _split(name: str, raw: Raw, device: torch.device, val_fraction: float, train_fraction: float, seed: int) -> Data:
    x, y = raw.train
    n = len(y)
    # The validation split depends on the seed alone, not on train_fraction: trials with different
    # budgets are compared on the same images.
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(n * val_fraction))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    train_idx = train_idx[: max(1, round(len(train_idx) * train_fraction))]
    if len(train_idx) < 2:
        raise HpsearchError(f"dataset {name!r}: {n} training images leave {len(train_idx)} to train on")
    train_x = x[train_idx]
    mean, std = _channel_stats(train_x)
    info = DataInfo(
        name=name,
        channels=x.shape[1],
        height=x.shape[2],
        width=x.shape[3],
        num_classes=len(raw.classes),
        mean=mean,
        std=std,
        flip=name not in DIGITS,
        classes=raw.classes,
    )
    return Data(
        train=Split(train_x.to(device), y[train_idx].to(device)),
        val=Split(x[val_idx].to(device), y[val_idx].to(device)),
        info=info,
    )


def _channel_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units, summed in float64 over chunks: converting a whole CIFAR-10
    training split to float at once would cost ~0.55 GB of temporary memory."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    squares = torch.zeros(x.shape[1], dtype=torch.float64)
    for i in range(0, len(x), chunk):
        part = x[i : i + chunk].to(torch.float64)
        total += part.sum(dim=(0, 2, 3))
        squares += part.square().sum(dim=(0, 2, 3))
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / n
    var = (squares - n * mean.square()) / max(1, n - 1)  # unbiased, as torch.std
    return tuple((mean / 255).tolist()), tuple((var.clamp_min(0).sqrt() / 255).clamp_min(1e-3).tolist())


# ---------------------------------------------------------------- final evaluation only


@dataclass(frozen=True)
class Final:
    """What final evaluation trains and tests on: ``data.train`` is train+val (statistics recomputed on it),
    ``data.val`` the former validation images (now trained on: a learning-rate schedule that watches
    accuracy still gets a signal, but no held-out one), ``test`` the test split."""

    data: Data
    test: Split


def load_final(
    name: str,
    *,
    data_dir: Path,
    cache_dir: Path,
    device: torch.device,
    val_fraction: float,
    train_fraction: float = 1.0,
    seed: int = 0,
) -> Final:
    """The search's own split (same seed and fractions) with val merged into train, plus the test split.
    The only caller is ``hpsearch.evaluate``."""
    raw = read_raw(name, data_dir, cache_dir)
    searched = _split(name, raw, torch.device("cpu"), val_fraction, train_fraction, seed)
    x = torch.cat([searched.train.x, searched.val.x])
    y = torch.cat([searched.train.y, searched.val.y])
    mean, std = _channel_stats(x)
    info = replace(searched.info, mean=mean, std=std)
    return Final(
        data=Data(train=Split(x.to(device), y.to(device)), val=Split(searched.val.x.to(device),
                                                                      searched.val.y.to(device)), info=info),
        test=load_test(name, data_dir=data_dir, cache_dir=cache_dir, device=device),
    )


def load_test(name: str, *, data_dir: Path, cache_dir: Path, device: torch.device) -> Split:
    """The test split, on ``device``. Raises when the dataset has no test images (a folder without test/)."""
    raw = read_raw(name, data_dir, cache_dir)
    with _test_open():
        x, y = raw.test
    if len(y) == 0:
        raise HpsearchError(f"dataset {name!r} has no test images (for a folder dataset: add test/<class>/*)")
    return Split(x.to(device), y.to(device))
