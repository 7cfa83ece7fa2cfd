"""Dataset readers on real files written by the tests: IDX (.gz and raw, our layout and torchvision's),
CIFAR-10 python batches (folder and tar.gz), image folders; splits; read-only data directories."""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hpsearch._errors import HpsearchError
from hpsearch.data import _load, load, read_raw

CPU = torch.device("cpu")


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx(directory: Path, *, gz: bool, n_train: int = 50, n_test: int = 10) -> tuple[np.ndarray, np.ndarray]:
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_x = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    train_y = rng.integers(0, 10, n_train, dtype=np.uint8)
    files = {
        "train-images-idx3-ubyte": train_x, "train-labels-idx1-ubyte": train_y,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in files.items():
        data = _idx_bytes(array)
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (directory / name).write_bytes(data)
    return train_x, train_y


@pytest.mark.parametrize("layout, gz", [("mnist", True), ("MNIST/raw", False), ("mnist/MNIST/raw", True)])
def test_idx_files_in_each_layout(tmp_path: Path, layout: str, gz: bool):
    train_x, train_y = _write_idx(tmp_path / "data" / layout, gz=gz)
    raw = read_raw("mnist", tmp_path / "data", tmp_path / "cache")
    assert raw.train[0].shape == (50, 1, 28, 28) and raw.train[0].dtype == torch.uint8
    assert torch.equal(raw.train[0][:, 0], torch.from_numpy(train_x))
    assert torch.equal(raw.train[1], torch.from_numpy(train_y.astype(np.int64)))
    assert raw.sealed_test[0].shape == (10, 1, 28, 28)


def test_truncated_idx_file_is_a_clear_error(tmp_path: Path):
    directory = tmp_path / "data" / "fashion-mnist"
    _write_idx(directory, gz=False)
    path = directory / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(HpsearchError, match=r"train-images-idx3-ubyte: truncated IDX file \(39195 bytes of data for "
                                            r"shape \(50, 28, 28\)\)"):
        read_raw("fashion-mnist", tmp_path / "data", tmp_path / "cache")


def _cifar_batches(n: int = 20) -> dict[str, dict]:
    rng = np.random.default_rng(1)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return {name: {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                   b"labels": list(rng.integers(0, 10, n))} for name in names}


@pytest.mark.parametrize("as_tar", [False, True])
def test_cifar_python_batches(tmp_path: Path, as_tar: bool):
    batches = _cifar_batches()
    root = tmp_path / "data" / "cifar10"
    if as_tar:
        root.mkdir(parents=True)
        with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
            for name, batch in batches.items():
                payload = pickle.dumps(batch)
                info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    else:
        (root / "cifar-10-batches-py").mkdir(parents=True)
        for name, batch in batches.items():
            (root / "cifar-10-batches-py" / name).write_bytes(pickle.dumps(batch))
    raw = read_raw("cifar10", tmp_path / "data", tmp_path / "cache")
    assert raw.train[0].shape == (100, 3, 32, 32) and raw.sealed_test[0].shape == (20, 3, 32, 32)
    first = batches["data_batch_1"][b"data"][0].reshape(3, 32, 32)
    assert torch.equal(raw.train[0][0], torch.from_numpy(first))
    assert raw.train[1][:20].tolist() == [int(v) for v in batches["data_batch_1"][b"labels"]]


def _write_folder(root: Path, classes: list[str], per_class: int, *, mode: str = "RGB", size=(8, 8)) -> None:
    rng = np.random.default_rng(2)
    for split, count in (("train", per_class), ("test", 2)):
        for i, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True)
            for j in range(count):
                shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
                pixels = np.full(shape, 20 * i, dtype=np.uint8) + rng.integers(0, 10, shape, dtype=np.uint8)
                Image.fromarray(pixels, mode).save(d / f"{j:04d}.png")


def test_image_folder_read_once_then_cached_outside_the_data_dir(tmp_path: Path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    _write_folder(data / "pets", ["cat", "dog", "eel"], per_class=6)
    before = _listing(data)  # (tests run as root here, so chmod cannot prove read-only use: compare listings)
    d = load("folder:pets", data_dir=data, cache_dir=cache, device=CPU, val_fraction=0.25)
    assert d.info.classes == ("cat", "dog", "eel") and d.info.channels == 3 and d.info.num_classes == 3
    assert len(d.train) + len(d.val) == 18
    assert len(list((cache / "folders").glob("pets-*.pt"))) == 1
    _load._RAW.clear()
    again = read_raw("folder:pets", data, cache)  # from the cache file now
    assert torch.equal(again.train[0], _load._read_folder_root(data / "pets", tmp_path / "other").train[0])
    assert _listing(data) == before


def test_grey_image_folder_has_one_channel_and_mixed_sizes_are_resized(tmp_path: Path):
    _write_folder(tmp_path / "data" / "g", ["a", "b"], per_class=3, mode="L")
    Image.fromarray(np.zeros((5, 7), dtype=np.uint8), "L").save(tmp_path / "data" / "g" / "train" / "a" / "odd.png")
    raw = read_raw("folder:g", tmp_path / "data", tmp_path / "cache")
    assert raw.train[0].shape == (7, 1, 8, 8)


def test_cifar10_as_image_folders(tmp_path: Path):
    classes = list(_load.CLASS_NAMES["cifar10"])
    _write_folder(tmp_path / "data" / "cifar10-jpeg", classes, per_class=1)
    raw = read_raw("cifar10", tmp_path / "data", tmp_path / "cache")
    assert raw.train[0].shape == (10, 3, 8, 8) and raw.classes == tuple(classes)


def test_split_is_fixed_by_seed_and_val_does_not_depend_on_train_fraction(tmp_path: Path):
    def split(train_fraction: float, seed: int = 0):
        return load("synthetic:train=400", data_dir=tmp_path, cache_dir=tmp_path, device=CPU, val_fraction=0.1,
                    train_fraction=train_fraction, seed=seed)

    full = split(1.0)
    assert (len(full.train), len(full.val)) == (360, 40)
    half = split(0.5)
    assert len(half.train) == 180 and torch.equal(half.val.x, full.val.x)
    assert not torch.equal(split(1.0, seed=1).val.x, full.val.x)
    # normalisation statistics come from the training split
    pixels = full.train.x.float().div(255)
    assert torch.allclose(torch.tensor(full.info.mean), pixels.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(torch.tensor(full.info.std), pixels.std(dim=(0, 2, 3)), atol=1e-5)


def test_synthetic_arguments(tmp_path: Path):
    raw = read_raw("synthetic:classes=5,size=10,channels=3,train=50,test=7", tmp_path, tmp_path)
    assert raw.train[0].shape == (50, 3, 10, 10) and raw.sealed_test[0].shape == (7, 3, 10, 10)
    assert sorted(set(raw.train[1].tolist())) == [0, 1, 2, 3, 4]


def _listing(root: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))
