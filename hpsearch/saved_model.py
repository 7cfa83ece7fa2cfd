"""The files ``hpsearch evaluate --save`` writes and ``load_model`` reads back.

``<stem>.pt`` is the retrained model's state_dict; ``<stem>.json`` holds what rebuilds its architecture (the study,
the trial's params, the seed, the config) and its input pipeline (``built_info``: normalisation statistics, resize,
the dataset's info). ``load_model`` rebuilds the model with the strategy's own suggest and build, and wraps it in a
``Classifier``: uint8 images in, logits out, through ``preprocess.normalise`` as training fed it.
"""

from __future__ import annotations

import io
import json
import pickle
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import optuna
import torch
import torch.nn as nn
from optuna.trial import FrozenTrial

from hpsearch._errors import HpsearchError, first_line
from hpsearch._paths import write_atomically
from hpsearch.accuracy import tta_logits
from hpsearch.data import DataInfo
from hpsearch.preprocess import InputPipeline, normalise
from hpsearch.space import Fixed, Space
from hpsearch.spec import StudySpec, spec_from_dict
from hpsearch.strategies import STRATEGIES
from hpsearch.train_types import Built

MODEL_FORMAT = 1


def replay(params: dict[str, Any], space: Space) -> optuna.Trial:
    """A trial that answers the strategy's suggest calls with stored ``params``: the strategy's own suggest
    rebuilds the config. Fixed values of the space fill the parameters a stored trial lacks (a space key added
    after it ran, such as ``milestones`` or ``pool_after``)."""
    fixed = {k: d.value for k, d in space.dims.items() if isinstance(d, Fixed) and k in space.params
             and space.params[k].per is None}
    return cast(optuna.Trial, optuna.trial.FixedTrial({**fixed, **params}))



def built_info(built: Built, info: DataInfo) -> dict[str, Any]:
    """The input pipeline a saved model needs: normalisation statistics and the resize, as fit fed it."""
    pipeline = InputPipeline.of(built, info)
    return {"mean": list(pipeline.mean), "std": list(pipeline.std), "input_size": pipeline.input_size,
            "info": asdict(info)}


def save_model(model: nn.Module, pipeline: dict[str, Any], trial: FrozenTrial, spec: StudySpec, config: Any,
               seed: int, stem: Path) -> Path:
    """``<stem>.pt`` (state_dict) and ``<stem>.json`` (what ``load_model`` needs to rebuild the architecture), each
    whole or not at all; a failure (disk full) is one HpsearchError naming the file."""
    meta = {"format": MODEL_FORMAT, "study": spec.to_dict(), "trial": trial.number, "params": trial.params,
            "seed": seed, "config": asdict(config), **pipeline}
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
    weights = stem.with_suffix(".pt")
    write_saved(weights, buffer.getvalue())
    write_saved(stem.with_suffix(".json"), json.dumps(meta, indent=2).encode())
    return weights


def write_saved(path: Path, data: bytes) -> None:
    """One file of a saved model, whole or not at all; a failure is one HpsearchError line naming it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, data)
    except OSError as e:
        raise HpsearchError(f"--save: cannot write {str(path)!r} ({e.strerror or e}); the test accuracy is stored, "
                            "run the same command again to save the model") from None


class Classifier(nn.Module):
    """A saved model with its input pipeline: uint8 (or 0..255 float) images [B, C, H, W] -> logits, with the
    study's test-time augmentation (``tta``) as its test accuracy was measured."""

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, model: nn.Module, *, mean: list[float], std: list[float], input_size: int | None,
                 tta: str = "none", flip: bool = True) -> None:
        super().__init__()
        self.model = model
        scale, shift = InputPipeline(tuple(mean), tuple(std), input_size).constants()
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)
        self.input_size = input_size
        self.tta, self.flip = tta, flip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tta_logits(self.model, normalise(x, self.scale, self.shift, self.input_size), self.tta, flip=self.flip)


def load_model(path: str | Path) -> Classifier:
    """Rebuilds a model saved by ``hpsearch evaluate --save DIR`` (``path``: its .pt or .json) in eval mode.

    The result takes uint8 images [B, C, H, W] of the dataset's size and returns logits; normalisation (and the
    resize a zoo/finetune model wants) happens inside. Fine-tuned models are rebuilt with the study's weights
    setting before the saved state_dict replaces them, so their weights file (or torch hub cache) must exist.
    """
    p = Path(path)
    meta_path, weights_path = p.with_suffix(".json"), p.with_suffix(".pt")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise HpsearchError(f"load_model: cannot read {str(meta_path)!r} ({e})") from None
    if meta.get("format") != MODEL_FORMAT:
        raise HpsearchError(f"load_model: {str(meta_path)!r} is not a model saved by `hpsearch evaluate --save`")
    spec = spec_from_dict(meta["study"], where=str(meta_path))
    info = DataInfo(**{**meta["info"], "mean": tuple(meta["info"]["mean"]), "std": tuple(meta["info"]["std"]),
                       "classes": tuple(meta["info"]["classes"])})
    strategy = STRATEGIES[spec.strategy]
    config = strategy.suggest(replay(meta["params"], spec.space), spec.space, spec.epochs, info)
    model = strategy.build(config, info).model
    state = _load_weights(weights_path)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # "Error(s) in loading state_dict for X:" then one line per missing key or shape
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
        raise HpsearchError(f"load_model: {str(weights_path)!r} does not fit the model {str(meta_path)!r} "
                            f"describes ({lines[1] if len(lines) > 1 else first_line(e)})") from None
    return Classifier(model, mean=meta["mean"], std=meta["std"], input_size=meta["input_size"], tta=spec.tta,
                      flip=info.flip).eval()


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The state_dict ``save_model`` wrote, or a one-line HpsearchError naming the file (torch's own errors do not
    name it, run to many lines, and advise ``weights_only=False``: unsafe for a file from elsewhere)."""
    expected = f"expected the weights `hpsearch evaluate --save` writes beside {path.with_suffix('.json').name!r}"
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError as e:
        raise HpsearchError(f"load_model: cannot read {str(path)!r} ({e.strerror or e})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged file fails with many types: RuntimeError, OSError, EOFError, KeyError, ...
        if not head:
            what = "an empty file"
        elif not head.startswith(b"PK"):  # torch.save writes a zip archive
            what = "not a PyTorch file"
        elif isinstance(e, pickle.UnpicklingError):
            what = "a PyTorch file that holds more than tensors"
        else:
            what = "a truncated or damaged PyTorch file"
        raise HpsearchError(f"load_model: cannot read {str(path)!r} ({what}; {expected})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HpsearchError(f"load_model: cannot read {str(path)!r} (a {type(state).__name__}, not a state_dict; "
                            f"{expected})")
    return state
