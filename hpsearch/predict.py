"""``hpsearch predict``: class probabilities of image files from a model ``hpsearch export-model`` wrote.

model   = FILE (.onnx: onnxruntime; TorchScript: torch.jit.load) with its card FILE.json beside it, checked against
          the card's sha256 (a card beside another model would name the wrong classes)
images  = files as given, and folders walked recursively for the suffixes the folder datasets read, sorted
decode  = PIL, converted to the model's channels (L or RGB) and resized (bilinear) to its H x W when different, as
          the folder datasets are read; a JPEG much larger than that is decoded at a reduced scale first (PIL's draft
          mode: a 4000x3000 photo decodes ~10x faster)
run     = numpy uint8 batches [B, C, H, W] -> logits -> softmax -> top K

On an .onnx model nothing here imports torch (numpy, PIL and onnxruntime only): torch takes seconds to import.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hpsearch._errors import HpsearchError, SpecError, first_line

# The suffixes hpsearch/data/_readers.py reads in image folders (that module imports torch; a test keeps the two equal).
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
FORMATS = ("onnx", "torchscript")


@dataclass(frozen=True)
class Model:
    path: Path
    card: dict[str, Any]
    channels: int
    height: int
    width: int
    classes: tuple[str, ...]
    runtime: str
    logits: Callable[[np.ndarray], np.ndarray]  # uint8 [B, C, H, W] -> float logits [B, K]

    @property
    def mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"


def open_model(path: Path) -> Model:
    """The exported model and its card, or one SpecError line naming the file and what is wrong."""
    where = f"MODEL {str(path)!r}"
    if not path.exists():
        raise SpecError(f"{where}: no such file (a file written by hpsearch export-model)")
    if not path.is_file():
        raise SpecError(f"{where} is a directory; give the model file (.onnx or .pt) hpsearch export-model wrote")
    card_file = path.with_name(path.name + ".json")
    try:
        card = json.loads(card_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"{where}: its model card {card_file.name!r} is not beside it (hpsearch export-model writes "
                        "FILE.json with FILE)") from None
    except (OSError, ValueError) as e:
        raise SpecError(f"{where}: cannot read its model card {str(card_file)!r} ({first_line(e)})") from None
    fmt, channels, height, width, classes = _card_fields(card, where=f"{where}: its model card {card_file.name!r}")
    try:
        digest = _sha256(path)
    except OSError as e:
        raise SpecError(f"{where}: cannot read it ({e.strerror or e})") from None
    if digest != card.get("sha256"):
        raise SpecError(f"{where}: the file does not match its model card {card_file.name!r} (sha256 differs): it "
                        "was changed or damaged after export, or the card belongs to another model")
    run, runtime = _onnx(path, where) if fmt == "onnx" else _torchscript(path, where)
    return Model(path=path, card=card, channels=channels, height=height, width=width, classes=classes,
                 runtime=runtime, logits=run)


def _card_fields(card: Any, *, where: str) -> tuple[str, int, int, int, tuple[str, ...]]:
    try:
        fmt = card["format"]
        _, channels, height, width = card["input"]["shape"]
        classes = tuple(str(c) for c in card["classes"])
        ok = fmt in FORMATS and channels in (1, 3) and int(height) >= 1 and int(width) >= 1 and len(classes) >= 2
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise SpecError(f"{where} lacks or garbles format, input.shape [B, C, H, W] (C 1 or 3) or classes")
    return fmt, int(channels), int(height), int(width), classes


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _onnx(path: Path, where: str) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise HpsearchError("predict on an .onnx model needs onnxruntime: pip install 'hpsearch[onnx]'") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # InvalidProtobuf, Fail, ...: onnxruntime's own types
        raise SpecError(f"{where}: onnxruntime cannot load it ({first_line(e)})") from None
    name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return np.asarray(session.run(None, {name: x})[0])

    return run, f"onnxruntime {ort.__version__}"


def _torchscript(path: Path, where: str) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    import torch  # TorchScript needs torch (seconds to import): only here

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit's deprecation notice
            module = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as e:  # RuntimeError for a file that is not a TorchScript archive, ...
        raise SpecError(f"{where}: torch.jit.load cannot load it ({first_line(e)})") from None

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x)).float().numpy()

    return run, f"torch.jit {torch.__version__}"


# ---------------------------------------------------------------- images


def image_files(paths: list[Path]) -> list[Path]:
    """Files as given (read, or reported, whatever their suffix); folders walked recursively for image suffixes,
    sorted. An empty result is bad input."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        else:
            files.append(p)
    if not files:
        shown = ", ".join(repr(str(p)) for p in paths[:3]) + (", ..." if len(paths) > 3 else "")
        raise SpecError(f"IMAGE {shown}: no image files there (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


class Unreadable(Exception):
    """An image file that cannot be decoded; the message says why."""


def read_image(path: Path, *, mode: str, size: tuple[int, int]) -> np.ndarray:
    """uint8 [C, H, W] of ``path`` in ``mode`` (L or RGB) at ``size`` (W, H)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.format == "JPEG" and im.width >= 2 * size[0] and im.height >= 2 * size[1]:
                im.draft(mode, size)  # DCT-domain downscale, never below size
            image = im.convert(mode)  # decodes (a truncated file fails here)
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # OSError: missing, not an image, truncated
        reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
        raise Unreadable(reason) from None
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    arr = np.asarray(image, dtype=np.uint8)
    return arr[None] if mode == "L" else arr.transpose(2, 0, 1)


# ---------------------------------------------------------------- prediction


@dataclass(frozen=True)
class Prediction:
    path: Path
    top: list[tuple[str, float]]  # (class, probability), most probable first


@dataclass(frozen=True)
class Failure:
    path: Path
    reason: str


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def predict(model: Model, files: list[Path], *, top: int, batch_size: int) -> Iterator[Prediction | Failure]:
    """One result per file, in order within each batch (a failure is yielded as soon as it is met)."""
    k = min(top, len(model.classes))
    size = (model.width, model.height)
    for start in range(0, len(files), batch_size):
        batch: list[np.ndarray] = []
        paths: list[Path] = []
        for path in files[start : start + batch_size]:
            try:
                batch.append(read_image(path, mode=model.mode, size=size))
                paths.append(path)
            except Unreadable as e:
                yield Failure(path, str(e))
        if not batch:
            continue
        probs = softmax(model.logits(np.stack(batch)))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        for path, row, idx in zip(paths, probs, order, strict=True):
            yield Prediction(path, [(model.classes[i], float(row[i])) for i in idx])
