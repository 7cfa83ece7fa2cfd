"""The model card ``hpsearch export-model`` writes beside an exported file (``FILE.json``): what goes in, what comes
out, where the model came from, its test accuracy, its verification against PyTorch, and its measured latency."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
from pathlib import Path
from typing import Any

import torch
from optuna.trial import FrozenTrial

import hpsearch
from hpsearch.explain import summarize
from hpsearch.saved_model import Classifier
from hpsearch.spec import StudySpec

CARD_FORMAT = 1
INPUT_NAME, OUTPUT_NAME = "images", "logits"


def tta_views(tta: str, flip: bool) -> int:
    """Forward passes per image under test-time augmentation (hpsearch.accuracy.tta_logits)."""
    per = 2 if flip else 1
    return {"none": 1, "flip": per, "flip-translate": 3 * per}[tta]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions(fmt: str) -> dict[str, str]:
    versions = {"hpsearch": hpsearch.__version__, "torch": torch.__version__, "python": platform.python_version()}
    if fmt == "onnx":
        import onnx
        import onnxruntime

        versions |= {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    return versions


def build_card(*, fmt: str, out: Path, spec: StudySpec, trial: FrozenTrial, seed_index: int, run: dict[str, Any],
               record: dict[str, Any], meta: dict[str, Any], model: Classifier, exporter: str, runtime: str,
               sha256: str, size: int, verification: dict[str, Any], latency: dict[str, float], source: Path,
               retrained: bool) -> dict[str, Any]:
    """The card of one exported file (``CARD_FORMAT``); every figure in it is measured on that file or stored."""
    info = meta["info"]
    c, h, w = int(info["channels"]), int(info["height"]), int(info["width"])
    classes = list(info["classes"])
    input_size = meta.get("input_size")
    summary = summarize(model.model, channels=c, size=(input_size, input_size) if input_size else (h, w))
    views = tta_views(spec.tta, bool(info["flip"]))
    accs = [r["test_accuracy"] for r in record["runs"]]
    return {
        "card_format": CARD_FORMAT,
        "format": fmt,
        "file": out.name,
        "sha256": sha256,
        "bytes": size,
        "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": ["B", c, h, w], "layout": "NCHW",
                  "channels": "L" if c == 1 else "RGB" if c == 3 else f"{c} channels",
                  "range": "0..255 (normalisation, resize and test-time augmentation are inside the model)"},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["B", len(classes)],
                   "meaning": "class logits in the order of `classes` (softmax gives probabilities)"},
        "classes": classes,
        "dataset": spec.dataset,
        "study": spec.name,
        "trial": trial.number,
        "seed_index": seed_index,
        "seed": run["seed"],
        "params": trial.params,
        "config": meta.get("config"),
        "preprocessing": {"mean": meta["mean"], "std": meta["std"], "resize_to": input_size, "tta": spec.tta},
        "validation_accuracy": trial.value,
        "test_accuracy": run["test_accuracy"],
        "test_accuracy_mean": statistics.fmean(accs),
        "test_accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "test_seeds": len(accs),
        "evaluate": {"epochs": record.get("epochs"), "mode": record.get("mode"),
                     "train_fraction": record.get("train_fraction", spec.train_fraction),
                     "precision": run.get("precision")},  # what the test accuracy was measured in
        "param_count": summary.total_params,
        "macs_per_image": summary.macs * views,
        "macs_per_view": summary.macs,
        "tta_views": views,
        "verification": verification,
        "latency_ms_per_image": latency,
        "latency_runtime": runtime,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "exporter": exporter,
        "versions": _versions(fmt),
        "source": {"model": str(source), "retrained": retrained},
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
