"""Readers for the standard on-disk formats. Each returns uint8 NCHW images and int64 labels on the CPU."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import tarfile
import zlib
from collections import Counter
from pathlib import Path
from typing import IO

import numpy as np
import torch

from hpsearch._errors import HpsearchError, SpecError, first_line

Arrays = tuple[torch.Tensor, torch.Tensor]  # images uint8 [N, C, H, W], labels int64 [N]

# ---------------------------------------------------------------- IDX (MNIST, Fashion-MNIST, KMNIST...)

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def find_idx(directory: Path) -> bool:
    return all(_idx_path(directory, f) is not None for pair in IDX_FILES.values() for f in pair)


def _idx_path(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):  # the last: some mirrors' naming
        if (directory / name).is_file():
            return directory / name
    return None


def _read_idx(path: Path) -> np.ndarray:
    raw = _gunzip(path) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise SpecError(f"{path}: not an IDX file of unsigned bytes (magic {raw[:4].hex()})")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise SpecError(f"{path}: truncated IDX file ({data.size} bytes of data for shape {shape})")
    return data.reshape(shape)


def _gunzip(path: Path) -> bytes:
    # gzip's EOFError must not escape: Click takes an EOFError for the user ending input and prints "Aborted".
    try:
        return gzip.decompress(path.read_bytes())
    except EOFError:
        raise SpecError(f"{path}: truncated gzip file (it ends before its compressed data does)") from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise SpecError(f"{path}: not a valid gzip file ({first_line(e)})") from None


def read_idx(directory: Path, split: str) -> Arrays:
    images_name, labels_name = IDX_FILES[split]
    images_path, labels_path = _idx_path(directory, images_name), _idx_path(directory, labels_name)
    assert images_path is not None and labels_path is not None
    images, labels = _read_idx(images_path), _read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise HpsearchError(f"{directory}: IDX images {images.shape} and labels {labels.shape} do not match")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


# ---------------------------------------------------------------- CIFAR-10 python batches

CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST = ["test_batch"]


def find_cifar(directory: Path) -> Path | None:
    """``cifar-10-batches-py/`` (or the batches themselves) or the ``cifar-10-python.tar.gz`` archive."""
    for candidate in (directory / "cifar-10-batches-py", directory):
        if all((candidate / b).is_file() for b in CIFAR_TRAIN + CIFAR_TEST):
            return candidate
    archive = directory / "cifar-10-python.tar.gz"
    return archive if archive.is_file() else None


def read_cifar(location: Path, split: str) -> Arrays:
    names = CIFAR_TRAIN if split == "train" else CIFAR_TEST
    batches = []
    if location.is_file():  # the tar.gz straight from the CIFAR page: read members without extracting
        try:
            with tarfile.open(location, "r:gz") as tar:
                for name in names:
                    member = tar.extractfile(f"cifar-10-batches-py/{name}")
                    if member is None:
                        raise HpsearchError(f"{location}: no cifar-10-batches-py/{name} inside")
                    batches.append(_cifar_batch(member, f"{location}: cifar-10-batches-py/{name}"))
        except KeyError as e:  # tarfile's way of saying that a member is missing
            raise SpecError(f"{location}: not a CIFAR-10 archive ({first_line(e)})") from None
        except (EOFError, OSError, tarfile.TarError, zlib.error) as e:
            raise SpecError(f"{location}: not a readable tar.gz archive ({first_line(e)})") from None
    else:
        for name in names:
            with open(location / name, "rb") as f:
                batches.append(_cifar_batch(f, str(location / name)))
    images = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([np.asarray(b[b"labels"], dtype=np.int64) for b in batches])
    return torch.from_numpy(images), torch.from_numpy(labels)


def _cifar_batch(f: IO[bytes], where: str) -> dict:
    """One pickled batch, checked for the two arrays read from it."""
    try:
        batch = pickle.load(f, encoding="bytes")
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, ImportError, IndexError,
            KeyError, OSError, zlib.error) as e:  # a broken pickle raises any of these
        raise SpecError(f"{where}: not a CIFAR-10 batch ({type(e).__name__}: {first_line(e)})") from None
    data = batch.get(b"data") if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or \
            len(batch.get(b"labels", ())) != len(data):
        raise SpecError(f"{where}: not a CIFAR-10 batch (expected b'data' of N x 3072 bytes and N b'labels')")
    return batch


# ---------------------------------------------------------------- image folders (torchvision ImageFolder layout)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def folder_classes(root: Path) -> list[str]:
    train = root / "train"
    return sorted(p.name for p in train.iterdir() if p.is_dir()) if train.is_dir() else []


def folder_files(root: Path, split: str, classes: list[str]) -> list[tuple[Path, int]]:
    files = []
    for label, cls in enumerate(classes):
        directory = root / split / cls
        if directory.is_dir():
            files += [(p, label) for p in sorted(directory.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    return files


def folder_fingerprint(root: Path) -> str:
    """Changes when any image is added, removed or rewritten (names, sizes and mtimes; no reading)."""
    h = hashlib.sha256(str(root.resolve()).encode())
    for split in ("train", "test"):
        for p in sorted((root / split).rglob("*")):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def read_folder(root: Path, split: str, classes: list[str], *, size: tuple[int, int] | None) -> Arrays:
    """Decodes every image once (PIL); a mixed-size folder is resized to ``size`` (the train split's commonest)."""
    from PIL import Image

    files = folder_files(root, split, classes)
    if not files:
        raise HpsearchError(f"{root / split}: no images in any class folder ({', '.join(classes)})")
    images: list[Image.Image] = []
    for path, _ in files:
        try:
            with Image.open(path) as im:
                images.append(im.convert("RGB") if im.mode not in ("L", "RGB") else im.copy())
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # OSError: not an image, or truncated
            raise SpecError(f"{path}: not a readable image ({first_line(e)})") from None
    grey = all(im.mode == "L" for im in images)
    target = size or Counter(im.size for im in images).most_common(1)[0][0]
    arrays = []
    for image in images:
        image = image.convert("L" if grey else "RGB")
        if image.size != target:
            image = image.resize(target, Image.Resampling.BILINEAR)
        arr = np.asarray(image, dtype=np.uint8)
        arrays.append(arr[None] if grey else arr.transpose(2, 0, 1))
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return torch.from_numpy(np.stack(arrays)), labels
