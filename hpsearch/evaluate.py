"""Final evaluation: the best K complete trials retrained on train+val with S seeds, then measured on the TEST split.

The only module that reads the test split (``data.load_final``). Per trial and seed:
config   = strategy.suggest(FixedTrial(trial.params), spec.space, ...)   # the trial's own configuration
data     = train+val of the search's split, normalisation statistics recomputed on it
model    = strategy.build(config, info)                                    # seed: derived from the study seed
fit      for best_epoch+1 epochs ("best"), the trial's budget ("max") or N epochs with the schedule stretched to N
         (a final training longer than the search could afford), on the search's training subset or, with
         ``train_fraction``, on another part of the training set (1.0: all of it)
accuracy on the test split, stored before the next seed starts (a killed evaluate resumes with the next seed)

Where results are stored: Optuna refuses to change a finished trial (``set_trial_user_attr`` on a COMPLETE trial
raises UpdateFinishedTrialError, also through the storage API), so each trial's results are a study user attr
``evaluate:<trial number>`` (public ``Study.set_user_attr``); ``show``, ``show --json`` and ``export`` merge them
into the trial's row, and the dashboard lists them with the study's user attrs.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import io
import json
import math
import pickle
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import optuna
import torch
import torch.nn as nn
from optuna.trial import FrozenTrial, TrialState

from hpsearch._errors import HpsearchError, SpecError, first_line
from hpsearch._preflight import check_writable_dir
from hpsearch.data import DataInfo, Final, load_final
from hpsearch.devices import choose_precision, precision_candidates, precision_name
from hpsearch.results import attr_key, stored
from hpsearch.space import Fixed, Space
from hpsearch.spec import StudySpec, spec_from_dict
from hpsearch.strategies import STRATEGIES
from hpsearch.train import PROBE_BATCH, BatchPrep, Diverged, FitResult, fit, probe_steps, tta_logits
from hpsearch.train import evaluate as accuracy_on

EPOCH_MODES = ("best", "max")
MODEL_FORMAT = 1
STARTED_ATTR = "hpsearch:evaluate_started"  # study user attr: when the last evaluate began (UTC)

# progress(trial_number, seed_index, seeds, test_accuracy) after every retrained seed
Progress = Callable[[int, int, int, float], None]
# epoch_progress(trial_number, seed_index, seeds, epoch, epochs, seconds since the retraining began) after each epoch
EpochProgress = Callable[[int, int, int, int, int, float], None]



def eval_seed(study_seed: int, trial_number: int, index: int) -> int:
    """Seed of evaluation run ``index`` of a trial: derived from the study seed, distinct from the search's
    per-trial seeds (a hash, so neighbouring trials or seeds never share a stream)."""
    digest = hashlib.sha256(f"hpsearch-evaluate/{study_seed}/{trial_number}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 2**63


@dataclass(frozen=True)
class Row:
    number: int
    val_accuracy: float
    epochs: int
    accuracies: list[float]
    mean: float
    std: float
    param_count: int | None
    seconds_per_epoch: float
    diverged: int  # seeds whose training loss became NaN/inf (their accuracy is that of the broken model)
    saved: list[str]  # the models' .pt files (--save)


def ranked(study: optuna.Study, top: int) -> list[FrozenTrial]:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return sorted(complete, key=lambda t: (-(t.value or 0.0), t.number))[:top]


def chosen(study: optuna.Study, numbers: list[int]) -> list[FrozenTrial]:
    """The trials ``--trial N`` names, in that order; each must be complete (a pruned trial has no final value)."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    out = []
    for n in dict.fromkeys(numbers):
        trial = trials.get(n)
        if trial is None or trial.state != TrialState.COMPLETE:
            complete = [t.number for t in trials.values() if t.state == TrialState.COMPLETE]
            what = "does not exist" if trial is None else f"is {trial.state.name}"
            shown = ", ".join(map(str, complete[:20])) + (", ..." if len(complete) > 20 else "")
            raise SpecError(f"--trial {n}: trial {n} of study {study.study_name!r} {what}; only complete trials are "
                            f"evaluated (complete: {shown or 'none'})")
        out.append(trial)
    return out


def check_options(*, top: int, seeds: int, epochs: str, train_fraction: float | None = None) -> None:
    if top < 1:
        raise SpecError(f"--top {top}: must be >= 1")
    if seeds < 1:
        raise SpecError(f"--seeds {seeds}: must be >= 1")
    if epochs not in EPOCH_MODES and not _stretched(epochs):
        raise SpecError(f"--epochs {epochs!r}: allowed: best (best_epoch+1 of the trial), max (its full budget), "
                        f"or a number of epochs >= 1 (the LR schedule stretched to it)")
    if train_fraction is not None and not (math.isfinite(train_fraction) and 0 < train_fraction <= 1):
        raise SpecError(f"--train-fraction {train_fraction:g}: must be a number with 0 < F <= 1")


def _stretched(mode: str) -> bool:
    """``--epochs N``: N epochs with the schedule over N (not the trial's budget cut short)."""
    return mode.isdigit() and int(mode) >= 1


def epochs_for(trial: FrozenTrial, spec: StudySpec, mode: str) -> int:
    if _stretched(mode):
        return int(mode)
    if mode == "max":
        return int(trial.user_attrs.get("config", {}).get("train", {}).get("epochs", spec.epochs))
    best = trial.user_attrs.get("best_epoch")
    if best is None:
        raise HpsearchError(f"trial {trial.number} has no best_epoch (not run by hpsearch?); use --epochs max")
    return int(best) + 1


def evaluate_study(
    study: optuna.Study,
    spec: StudySpec,
    *,
    top: int,
    seeds: int,
    epochs: str | None,
    data_dir: Path,
    cache_dir: Path,
    device: torch.device,
    train_fraction: float | None = None,
    save_dir: Path | None = None,
    progress: Progress | None = None,
    precision: str = "auto",
    trials: list[int] | None = None,
    epoch_progress: EpochProgress | None = None,
) -> list[Row]:
    """Retrains and tests the best ``top`` complete trials (or the ``trials`` named) ``seeds`` times; seeds already
    stored are skipped. ``epochs`` None and ``train_fraction`` None: the study file's ``final`` training, else the
    trial's best epoch count and the study's train_fraction.
    ``train_fraction`` (default: the study's) is the part of the training set retrained on, plus val. ``precision``:
    --precision (auto: measured on the retrained model, as a trial does)."""
    epochs = epochs or (str(spec.final_epochs) if spec.final_epochs is not None else "best")
    train_fraction = spec.final_train_fraction if train_fraction is None else train_fraction
    check_options(top=top, seeds=seeds, epochs=epochs, train_fraction=train_fraction)
    picked = chosen(study, trials) if trials else ranked(study, top)
    if not picked:
        raise HpsearchError(f"study {study.study_name!r} has no complete trial to evaluate")
    fraction = spec.train_fraction if train_fraction is None else train_fraction
    # Everything this writes is tried before minutes of training: the models' folder and the database.
    if save_dir is not None:
        check_writable_dir(save_dir, option="--save")
    _check_can_store(study)
    final = load_final(spec.dataset, data_dir=data_dir, cache_dir=cache_dir, device=device,
                       val_fraction=spec.val_fraction, train_fraction=fraction, seed=spec.seed)
    results = stored(study)
    rows = []
    for trial in picked:
        n_epochs = epochs_for(trial, spec, epochs)
        schedule_epochs = n_epochs if _stretched(epochs) else spec.epochs
        setting: dict[str, Any] = {"epochs": n_epochs, "schedule_epochs": schedule_epochs, "train_fraction": fraction}
        record = results.get(trial.number)
        if record is None or _setting(record, spec) != setting:  # another budget measures something else
            record = {**setting, "mode": epochs, "runs": []}
        runs = record["runs"]
        for index in range(seeds):
            stem = None if save_dir is None else save_dir / f"{study.study_name}-trial{trial.number}-seed{index}"
            if index < len(runs) and (stem is None or _saved_at(runs[index], stem)):
                continue  # stored (and saved where --save asks for it): a killed or repeated evaluate skips it
            # A seed stored without its model (evaluate first run without --save) is retrained with the same seed.
            on_epoch = None if epoch_progress is None else functools.partial(epoch_progress, trial.number, index, seeds)
            run, save = _retrain(trial, spec, final, n_epochs, index, device, schedule_epochs=schedule_epochs,
                                 precision=precision, on_epoch=on_epoch)
            runs[index:index + 1] = [run]
            _store(study, trial.number, record)  # stored per seed, before saving: a killed run resumes here
            if stem is not None:
                run["saved"] = str(save(stem))
                _store(study, trial.number, record)
            if progress is not None:
                progress(trial.number, index, seeds, run["test_accuracy"])
        runs = runs[:seeds]
        accs = [r["test_accuracy"] for r in runs]
        rows.append(Row(
            number=trial.number, val_accuracy=float(trial.value or 0.0), epochs=n_epochs, accuracies=accs,
            mean=statistics.fmean(accs), std=statistics.stdev(accs) if len(accs) > 1 else 0.0,
            param_count=trial.user_attrs.get("param_count"),
            seconds_per_epoch=statistics.fmean(r["seconds_per_epoch"] for r in runs),
            diverged=sum(bool(r.get("diverged")) for r in runs),
            saved=[r["saved"] for r in runs if save_dir is not None],
        ))
    return rows


def _check_can_store(study: optuna.Study) -> None:
    """Results are stored on the study: a database that refuses writes (a read-only file or role) is found before
    anything is trained, by storing when this evaluate started (a write of an unchanged value would be skipped)."""
    try:
        study.set_user_attr(STARTED_ATTR, datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    except Exception as e:
        raise HpsearchError(f"study {study.study_name!r}: the database refuses to store results ({first_line(e)}); "
                            "nothing was trained") from None


def _store(study: optuna.Study, number: int, record: dict[str, Any]) -> None:
    accs = [r["test_accuracy"] for r in record["runs"]]
    record["mean"] = statistics.fmean(accs)
    record["std"] = statistics.stdev(accs) if len(accs) > 1 else 0.0
    study.set_user_attr(attr_key(number), record)


def _saved_at(run: dict[str, Any], stem: Path) -> bool:
    """Whether a stored seed's model is at ``stem`` (.pt and .json). One saved elsewhere by an earlier
    ``--save`` is copied there (no retraining); one never saved is not."""
    weights = stem.with_suffix(".pt")
    if weights.is_file() and stem.with_suffix(".json").is_file():
        run["saved"] = str(weights)
        return True
    earlier = Path(run.get("saved", ""))
    if not run.get("saved") or not (earlier.is_file() and earlier.with_suffix(".json").is_file()):
        return False
    for suffix in (".pt", ".json"):
        _write_atomically(stem.with_suffix(suffix), earlier.with_suffix(suffix).read_bytes())
    run["saved"] = str(weights)
    return True


def _setting(record: dict[str, Any], spec: StudySpec) -> dict[str, Any]:
    """What a stored result was trained with (records older than --epochs N / --train-fraction had the study's)."""
    return {"epochs": record.get("epochs"), "schedule_epochs": record.get("schedule_epochs", spec.epochs),
            "train_fraction": record.get("train_fraction", spec.train_fraction)}


def replay(params: dict[str, Any], space: Space) -> optuna.Trial:
    """A trial that answers the strategy's suggest calls with stored ``params``: the strategy's own suggest
    rebuilds the config. Fixed values of the space fill parameters a trial stored before they existed (a
    study older than ``milestones`` or ``pool_after``)."""
    fixed = {k: d.value for k, d in space.dims.items() if isinstance(d, Fixed) and space.params[k].per is None}
    return cast(optuna.Trial, optuna.trial.FixedTrial({**fixed, **params}))


class _Enough(Exception):
    """Ends fit after the requested epochs; the schedule runs over ``schedule_epochs`` (best/max: the trial's
    budget)."""


def _retrain(trial: FrozenTrial, spec: StudySpec, final: Final, n_epochs: int, index: int, device: torch.device, *,
             schedule_epochs: int, precision: str, on_epoch: Callable[[int, int, float], None] | None = None,
             ) -> tuple[dict[str, Any], Callable[[Path], Path]]:
    """One seed's run record, and a function that saves its model at a given stem (``save_model``).
    ``on_epoch(epoch, epochs, seconds since the start)`` after every epoch."""
    strategy = STRATEGIES[spec.strategy]
    info = final.data.info
    config = strategy.suggest(replay(trial.params, spec.space), spec.space, schedule_epochs, info)
    seed = eval_seed(spec.seed, trial.number, index)
    torch.manual_seed(seed)  # weight initialisation
    built = strategy.build(config, info)
    candidates = precision_candidates(precision, device)
    amp = candidates[0] if len(candidates) == 1 else choose_precision(probe_steps(
        built, final.data, config.train, device, candidates, batch=min(PROBE_BATCH, config.train.batch_size), warmup=2
    ).cost)
    seen: list[FitResult] = []

    def after_epoch(epoch: int, result: FitResult) -> None:
        seen[:] = [result]
        if on_epoch is not None:
            on_epoch(epoch, n_epochs, time.perf_counter() - start)
        if epoch + 1 >= n_epochs:
            raise _Enough

    diverged = None
    start = time.perf_counter()
    try:
        fit(built, final.data, config.train, device=device, seed=seed, on_epoch=after_epoch, amp=amp)
    except _Enough:
        pass
    except Diverged as e:
        diverged = str(e)  # measured anyway: the report's diverged row is the accuracy of such a model
    seconds = time.perf_counter() - start
    epochs_run = len(seen[0].seconds_per_epoch) if seen else 1
    model = built.model.to(device)
    # The study's test-time augmentation, the same for every trial (the search validated with it). Measured in fp32
    # whatever the training's precision: the accuracy is then that of the model saved, loaded and exported (fp32
    # weights, fp32 inference); bf16 inference moved a few of 10,000 CIFAR-10 test images (benchmarks/README.md).
    test_accuracy = accuracy_on(model, final.test, BatchPrep(final.data, built, device), device, amp=None,
                                tta=spec.tta, flip=info.flip)
    run: dict[str, Any] = {
        "seed": seed, "test_accuracy": test_accuracy, "epochs_run": epochs_run,
        "seconds_per_epoch": seconds / max(1, epochs_run), "precision": precision_name(amp),
    }
    if diverged:
        run["diverged"] = diverged
    return run, functools.partial(save_model, model, built_info(built, info), trial, spec, config, seed)


def built_info(built: Any, info: DataInfo) -> dict[str, Any]:
    """The input pipeline a saved model needs: normalisation statistics and the resize, as fit fed it."""
    return {"mean": list(built.mean or info.mean), "std": list(built.std or info.std),
            "input_size": built.input_size, "info": asdict(info)}


def save_model(model: nn.Module, pipeline: dict[str, Any], trial: FrozenTrial, spec: StudySpec, config: Any,
               seed: int, stem: Path) -> Path:
    """``<stem>.pt`` (state_dict) and ``<stem>.json`` (what ``load_model`` needs to rebuild the architecture), each
    whole or not at all; a failure (disk full) is one HpsearchError naming the file."""
    meta = {"format": MODEL_FORMAT, "study": spec.to_dict(), "trial": trial.number, "params": trial.params,
            "seed": seed, "config": asdict(config), **pipeline}
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
    weights = stem.with_suffix(".pt")
    _write_atomically(weights, buffer.getvalue())
    _write_atomically(stem.with_suffix(".json"), json.dumps(meta, indent=2).encode())
    return weights


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError as e:
        raise HpsearchError(f"--save: cannot write {str(path)!r} ({e.strerror or e}); the test accuracy is stored, "
                            "run the same command again to save the model") from None
    finally:
        tmp.unlink(missing_ok=True)


class Classifier(nn.Module):
    """A saved model with its input pipeline: uint8 (or 0..255 float) images [B, C, H, W] -> logits, with the
    study's test-time augmentation (``tta``) as its test accuracy was measured."""

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, model: nn.Module, *, mean: list[float], std: list[float], input_size: int | None,
                 tta: str = "none", flip: bool = True) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, -1, 1, 1)))
        self.register_buffer("shift", -torch.tensor(mean).view(1, -1, 1, 1) / torch.tensor(std).view(1, -1, 1, 1))
        self.input_size = input_size
        self.tta, self.flip = tta, flip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.addcmul(self.shift, x.float(), self.scale)
        if self.input_size is not None and self.input_size != x.shape[-1]:
            x = nn.functional.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                                          align_corners=False)
        return tta_logits(self.model, x, self.tta, flip=self.flip)


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
