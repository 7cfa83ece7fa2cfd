"""``hpsearch export-model``: one trial's model as a self-contained file (TorchScript or ONNX) plus its model card.

source   = the model ``evaluate --save`` saved for (trial, seed), else retrained on the spot by ``evaluate_study``
           (so its test accuracy is stored, as evaluate stores it)
classify = ``load_model(source)``: uint8 [B, C, H, W] -> logits, normalisation / resize / TTA inside
export   = torch.jit.trace (TorchScript) or torch.onnx.export (ONNX, dynamo exporter; the legacy one as a fallback),
           dynamic batch axis, written to a temporary file beside ``--out``
verify   = the exported file, run by its own runtime (torch.jit.load / onnxruntime), against PyTorch's logits on up
           to VERIFY_IMAGES VALIDATION images (never the test split): argmax agreement >= MIN_AGREEMENT and
           max |logit diff| <= MAX_LOGIT_DIFF, else refused with nothing left behind
card     = ``FILE.json`` beside ``FILE`` (``model_card``), written just before the file is moved into place
           (``model.onnx`` -> ``model.onnx.json``: a .pt export and an .onnx export of one stem never share a card,
           and evaluate's ``<stem>.json`` beside ``<stem>.pt`` is never overwritten)

The exported file needs no hpsearch to run: ``torch.jit.load`` (torch only) or ``onnxruntime`` (no torch).
"""

from __future__ import annotations

import functools
import hashlib
import json
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from hpsearch._errors import HpsearchError, SpecError, first_line
from hpsearch._paths import write_atomically
from hpsearch._preflight import check_writable_dir
from hpsearch.data import load
from hpsearch.evaluate import evaluate_study
from hpsearch.model_card import INPUT_NAME, OUTPUT_NAME, build_card
from hpsearch.results import stored
from hpsearch.saved_model import Classifier, load_model
from hpsearch.spec import StudySpec
from hpsearch.trials import best_first

# --format -> the suffixes --out may end in (the default format is read from the suffix)
FORMATS = {"torchscript": (".pt", ".pth", ".ts"), "onnx": (".onnx",)}
VERIFY_IMAGES = 512  # validation images the export is checked on
VERIFY_BATCH = 64  # several batches (the last one shorter): the dynamic batch axis is exercised too
MIN_AGREEMENT = 0.999  # argmax identical on at least this share of the images
MAX_LOGIT_DIFF = 1e-3  # and no logit further than this from PyTorch's
OPSET = 18  # the dynamo exporter's own opset (>= 17, where LayerNormalization and the Resize modes exist)
LATENCY_BATCHES = (1, 64)
LATENCY_SECONDS = 5.0  # per batch size: at least 3 timed runs, at most 7 (a VGG16 at 224 px with TTA is slow)

Say = Callable[[str], None]


def card_path(out: Path) -> Path:
    """The model card beside an exported file: ``model.onnx`` -> ``model.onnx.json``."""
    return out.with_name(out.name + ".json")


def resolve_format(fmt: str | None, out: Path) -> str:
    """``--format`` as given, else from ``--out``'s suffix; the suffix must fit the format either way."""
    suffix = out.suffix.lower()
    allowed = ", ".join(f"{s} ({name})" for name, suffixes in FORMATS.items() for s in suffixes)
    if fmt is not None and fmt not in FORMATS:
        raise SpecError(f"--format {fmt!r}: allowed: {', '.join(FORMATS)}")
    by_suffix = next((name for name, suffixes in FORMATS.items() if suffix in suffixes), None)
    if by_suffix is None:
        raise SpecError(f"--out {str(out)!r}: the file name must end in {allowed}")
    if fmt is not None and by_suffix != fmt:
        raise SpecError(f"--out {str(out)!r}: --format {fmt} needs a file name ending in {', '.join(FORMATS[fmt])}")
    return by_suffix


@dataclass(frozen=True)
class Exported:
    path: Path
    card_path: Path
    card: dict[str, Any]
    retrained: bool


def export_model(study: optuna.Study, spec: StudySpec, *, trial: int | None, seed_index: int, fmt: str | None,
                 out: Path, data_dir: Path, cache_dir: Path, device: torch.device, say: Say,
                 precision: str = "auto") -> Exported:
    """Writes ``out`` and its card (both whole or not at all) and returns the card."""
    fmt = _check_request(fmt, seed_index, out)
    check_writable_dir(out.parent, option="--out")
    picked = pick_trial(study, trial)
    source, retrained = _source(study, spec, picked, seed_index, data_dir=data_dir, cache_dir=cache_dir,
                                device=device, say=say, precision=precision)
    if out.resolve() in (source.resolve(), source.with_suffix(".json").resolve()):
        raise SpecError(f"--out {str(out)!r} is the model evaluate saved (the source of this export); "
                        "give another file name")
    meta = json.loads(source.with_suffix(".json").read_text(encoding="utf-8"))
    model = load_model(source)
    record = stored(study)[picked.number]
    info = meta["info"]
    shape = (int(info["channels"]), int(info["height"]), int(info["width"]))
    images = _verify_images(study, spec, source, shape, data_dir=data_dir, cache_dir=cache_dir)
    card_of = functools.partial(build_card, fmt=fmt, out=out, spec=spec, trial=picked, seed_index=seed_index,
                                run=record["runs"][seed_index], record=record, meta=meta, model=model, source=source,
                                retrained=retrained)
    card = _export_verified(model, fmt, out, images, shape, card_of)
    return Exported(path=out, card_path=card_path(out), card=card, retrained=retrained)


def _check_request(fmt: str | None, seed_index: int, out: Path) -> str:
    """The export's format; the options that fail before anything is opened or trained."""
    fmt = resolve_format(fmt, out)
    if seed_index < 0:
        raise SpecError(f"--seed {seed_index}: must be >= 0 (the evaluation seed's index, as in evaluate's "
                        "<study>-trial<N>-seed<i>.pt)")
    if out.is_dir():
        raise SpecError(f"--out {str(out)!r} is a directory; give a file name ending in "
                        f"{', '.join(FORMATS[fmt])}")
    if fmt == "onnx":
        _need_onnx()
    return fmt


def _verify_images(study: optuna.Study, spec: StudySpec, source: Path, shape: tuple[int, int, int], *,
                   data_dir: Path, cache_dir: Path) -> torch.Tensor:
    """The first ``VERIFY_IMAGES`` validation images of the study's split (never the test split)."""
    val = load(spec.dataset, data_dir=data_dir, cache_dir=cache_dir, device=torch.device("cpu"),
               val_fraction=spec.val_fraction, train_fraction=spec.train_fraction, seed=spec.seed).val
    images = val.x[:VERIFY_IMAGES].contiguous()
    if tuple(images.shape[1:]) != shape:  # cannot happen for one study's data; a clear line if it ever does
        raise HpsearchError(f"study {study.study_name!r}: its validation images are {list(images.shape[1:])}, the "
                            f"saved model {str(source)!r} expects {list(shape)}")
    return images


def _export_verified(model: Classifier, fmt: str, out: Path, images: torch.Tensor, shape: tuple[int, int, int],
                     card_of: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """Exports ``model`` to a temporary file beside ``out``, verifies and times that file as a user will run it, then
    publishes it and its card (``card_of`` of what was measured): both, or neither and no folder made for them."""
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # removed again on failure
    written = False
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        exporter = _export(model, fmt, tmp, shape)
        runtime = _open_runtime(fmt, tmp)
        verification = _verification(fmt, model, runtime, images)
        latency = {f"batch_{b}": _latency_ms(runtime, images.numpy(), b) for b in LATENCY_BATCHES}
        card = card_of(exporter=exporter, runtime=runtime.name, sha256=hashlib.sha256(tmp.read_bytes()).hexdigest(),
                       size=tmp.stat().st_size, verification=verification, latency=latency)
        # The card first: a full disk fails there, before an earlier export at ``out`` is replaced.
        write_atomically(card_path(out), json.dumps(card, indent=2) + "\n")
        try:
            tmp.replace(out)  # the very file verified
        except OSError:
            card_path(out).unlink(missing_ok=True)  # a card without its model is half an export
            raise
        written = True
        return card
    except OSError as e:
        raise HpsearchError(f"--out: cannot write {str(out)!r} ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)
        for p in made if not written else []:  # deepest first: a refused export leaves no empty folders
            try:
                p.rmdir()
            except OSError:
                break


def _verification(fmt: str, model: Classifier, runtime: Runtime, images: torch.Tensor) -> dict[str, Any]:
    """The card's verification entry, or a refusal when the exported model disagrees with PyTorch's."""
    agreement, max_diff = verify(model, runtime, images)
    if agreement < MIN_AGREEMENT or not max_diff <= MAX_LOGIT_DIFF:
        raise HpsearchError(
            f"export-model: the exported {fmt} model disagrees with PyTorch's on {len(images)} validation images "
            f"(argmax agreement {agreement:.4%}, needs >= {MIN_AGREEMENT:.1%}; max |logit diff| {max_diff:.3g}, "
            f"needs <= {MAX_LOGIT_DIFF:g}); nothing was written")
    return {"split": "validation", "images": len(images), "argmax_agreement": agreement, "max_abs_logit_diff": max_diff,
            "rule": f"argmax agreement >= {MIN_AGREEMENT}, max |logit diff| <= {MAX_LOGIT_DIFF:g}"}


def _need_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise HpsearchError(f"--format onnx needs the onnx extra ({e.name} is missing): "
                            "pip install 'hpsearch[onnx]'") from None


# ---------------------------------------------------------------- which model


def pick_trial(study: optuna.Study, number: int | None) -> FrozenTrial:
    """``--trial N`` (a complete trial), else the best complete trial."""
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if number is None:
        best = best_first(complete)
        if not best:
            raise HpsearchError(f"study {study.study_name!r} has no complete trial to export")
        return best[0]
    trial = next((t for t in trials if t.number == number), None)
    if trial is None or trial.state != TrialState.COMPLETE:
        what = "does not exist" if trial is None else f"is {trial.state.name}"
        shown = ", ".join(str(t.number) for t in complete[:20]) + (", ..." if len(complete) > 20 else "")
        raise SpecError(f"--trial {number}: trial {number} of study {study.study_name!r} {what}; only complete "
                        f"trials have a final model to export (complete: {shown or 'none'})")
    return trial


def saved_model(study: optuna.Study, number: int, seed_index: int) -> Path | None:
    """The .pt ``evaluate --save`` stored for (trial, seed) when it and its .json are still there and are that
    seed's (a later evaluate with another budget may have written another model under the same name)."""
    record = stored(study).get(number)
    runs = record.get("runs", []) if record else []
    if seed_index >= len(runs) or not runs[seed_index].get("saved"):
        return None
    path = Path(runs[seed_index]["saved"])
    try:
        meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return path if path.is_file() and meta.get("seed") == runs[seed_index].get("seed") else None


def _source(study: optuna.Study, spec: StudySpec, trial: FrozenTrial, seed_index: int, *, data_dir: Path,
            cache_dir: Path, device: torch.device, say: Say, precision: str = "auto") -> tuple[Path, bool]:
    saved = saved_model(study, trial.number, seed_index)
    if saved is not None:
        say(f"trial {trial.number} seed {seed_index}: the model evaluate saved, {saved}")
        return saved, False
    # Retrained with evaluate's own rules and budget: the budget a stored result was measured with (so its seeds
    # are kept), else the study's final training; its test accuracy is stored like evaluate's.
    record = stored(study).get(trial.number)
    epochs = None if record is None else str(record.get("mode", record.get("epochs")))
    fraction = None if record is None else record.get("train_fraction", spec.train_fraction)
    models = cache_dir / "models"
    say(f"trial {trial.number} seed {seed_index}: no saved model (evaluate --save), retraining it as evaluate does "
        f"(its test accuracy is stored); models in {models}")

    def progress(number: int, index: int, total: int, accuracy: float) -> None:
        say(f"trial {number:>4} seed {index + 1}/{total}  test acc {accuracy:.4f}")

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    evaluate_study(study, spec, top=1, seeds=seed_index + 1, epochs=epochs, data_dir=data_dir, cache_dir=cache_dir,
                   device=device, train_fraction=fraction, save_dir=models, progress=progress, trials=[trial.number],
                   precision=precision)
    saved = saved_model(study, trial.number, seed_index)
    if saved is None:  # evaluate_study saves every seed it is asked for: a bug if it did not
        raise HpsearchError(f"trial {trial.number} seed {seed_index}: retrained, but no saved model was recorded")
    return saved, True


# ---------------------------------------------------------------- export and run


def _export(model: Classifier, fmt: str, path: Path, shape: tuple[int, int, int]) -> str:
    """Writes ``model`` to ``path``; returns how (for the card). The example batch has 2 images: a batch of 1 lets
    an exporter specialise the batch axis to 1."""
    example = torch.randint(0, 256, (2, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices, the exporters' tracer warnings
        if fmt == "torchscript":
            try:
                with torch.no_grad():
                    traced = torch.jit.trace(model, example, check_trace=False)
                torch.jit.save(traced, str(path))
            except OSError:
                raise
            except Exception as e:
                raise HpsearchError(f"export-model: torch.jit.trace cannot trace this model ({first_line(e)})") \
                    from None
            return f"torch.jit.trace (torch {torch.__version__})"
        batch = torch.export.Dim("batch", min=1)
        try:
            torch.onnx.export(model, (example,), str(path), dynamo=True, verbose=False, opset_version=OPSET,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},),
                              external_data=False, report=False)
            return f"torch.onnx.export(dynamo=True), opset {OPSET} (torch {torch.__version__})"
        except OSError:
            raise
        except Exception as first:
            # The torch.export-based exporter refuses some graphs the TorchScript-based one still takes.
            path.unlink(missing_ok=True)
            try:
                torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17,
                                  input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                  dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
            except OSError:
                raise
            except Exception as e:
                raise HpsearchError(f"export-model: torch.onnx.export cannot export this model (dynamo: "
                                    f"{first_line(first)}; TorchScript-based: {first_line(e)})") from None
            return f"torch.onnx.export(dynamo=False), opset 17 (torch {torch.__version__})"


@dataclass(frozen=True)
class Runtime:
    name: str
    run: Callable[[np.ndarray], np.ndarray]  # uint8 [B, C, H, W] -> float32 logits [B, K]


def _open_runtime(fmt: str, path: Path) -> Runtime:
    """The exported file as a user will run it: torch.jit.load, or an onnxruntime CPU session."""
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = torch.jit.load(str(path), map_location="cpu").eval()

        def run_ts(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return loaded(torch.from_numpy(x)).float().numpy()

        return Runtime(name=f"torch.jit.load (torch {torch.__version__}), CPU", run=run_ts)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def run_onnx(x: np.ndarray) -> np.ndarray:
        return np.asarray(session.run(None, {input_name: x})[0], dtype=np.float32)

    return Runtime(name=f"onnxruntime {ort.__version__} CPUExecutionProvider", run=run_onnx)


def verify(model: Classifier, runtime: Runtime, images: torch.Tensor) -> tuple[float, float]:
    """(argmax agreement, max |logit diff|) of the exported model against PyTorch's, batch by batch."""
    same, worst = 0, 0.0
    for i in range(0, len(images), VERIFY_BATCH):
        x = images[i : i + VERIFY_BATCH]
        with torch.inference_mode():
            expected = model(x).float().numpy()
        got = exported_logits(runtime, x.numpy())
        if got.shape != expected.shape:
            return 0.0, float("inf")
        same += int((got.argmax(1) == expected.argmax(1)).sum())
        diff = np.abs(got.astype(np.float64) - expected)
        worst = max(worst, float(diff.max()) if np.isfinite(diff).all() else float("inf"))
    return same / max(1, len(images)), worst


def exported_logits(runtime: Runtime, x: np.ndarray) -> np.ndarray:
    """The exported model's logits (one place, so a test can make the export disagree)."""
    return runtime.run(np.ascontiguousarray(x))


def _latency_ms(runtime: Runtime, images: np.ndarray, batch: int) -> float:
    """Milliseconds per image at ``batch``: the median of 3 to 7 timed runs after one warm-up."""
    x = np.ascontiguousarray(images[np.arange(batch) % len(images)])
    runtime.run(x)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < 7 and (len(times) < 3 or time.perf_counter() - started < LATENCY_SECONDS):
        t = time.perf_counter()
        runtime.run(x)
        times.append(time.perf_counter() - t)
    return round(1000 * statistics.median(times) / batch, 4)
