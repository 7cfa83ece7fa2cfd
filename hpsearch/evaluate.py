"""Final evaluation: the best K complete trials retrained on train+val with S seeds, then measured on the TEST split.

The only module that reads the test split (``data.load_final``); the evaluate, reproduce and export-model commands
reach it through ``evaluate_study``. Per trial and seed:
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
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from hpsearch import trials as trial_facts
from hpsearch._errors import HpsearchError, SpecError, first_line
from hpsearch._preflight import check_writable_dir
from hpsearch.accuracy import accuracy_on
from hpsearch.data import Final, load_final
from hpsearch.devices import choose_precision, precision_candidates, precision_name
from hpsearch.results import attr_key, stored
from hpsearch.saved_model import built_info, replay, save_model, write_saved
from hpsearch.spec import StudySpec
from hpsearch.strategies import STRATEGIES
from hpsearch.train import BatchPrep, fit, probe_precisions
from hpsearch.train_types import Diverged, FitResult

EPOCH_MODES = ("best", "max")
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
    """The best ``top`` complete trials, best first."""
    return trial_facts.ranked(study)[:top]



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
    job = _Job(study, spec, final, mode=epochs, fraction=fraction, seeds=seeds, device=device, save_dir=save_dir,
               precision=precision, progress=progress, epoch_progress=epoch_progress)
    results = stored(study)
    return [_evaluate_trial(job, trial, results.get(trial.number)) for trial in picked]


@dataclass(frozen=True)
class _Job:
    """One evaluate's settings, the same for every trial it retrains."""

    study: optuna.Study
    spec: StudySpec
    final: Final
    mode: str  # --epochs: best, max or a number
    fraction: float
    seeds: int
    device: torch.device
    save_dir: Path | None
    precision: str
    progress: Progress | None
    epoch_progress: EpochProgress | None


def _evaluate_trial(job: _Job, trial: FrozenTrial, record: dict[str, Any] | None) -> Row:
    """Retrains the seeds of ``trial`` not stored yet under this budget, each stored as it ends; the trial's row."""
    n_epochs = epochs_for(trial, job.spec, job.mode)
    schedule_epochs = n_epochs if _stretched(job.mode) else job.spec.epochs
    setting: dict[str, Any] = {"epochs": n_epochs, "schedule_epochs": schedule_epochs, "train_fraction": job.fraction}
    if record is None or _setting(record, job.spec) != setting:  # another budget measures something else
        record = {**setting, "mode": job.mode, "runs": []}
    runs = record["runs"]
    for index in range(job.seeds):
        name = f"{job.study.study_name}-trial{trial.number}-seed{index}"
        stem = None if job.save_dir is None else job.save_dir / name
        if index < len(runs) and (stem is None or _saved_at(runs[index], stem)):
            continue  # stored (and saved where --save asks for it): a killed or repeated evaluate skips it
        # A seed stored without its model (evaluate first run without --save) is retrained with the same seed.
        on_epoch = (None if job.epoch_progress is None
                    else functools.partial(job.epoch_progress, trial.number, index, job.seeds))
        run, save = _retrain(trial, job.spec, job.final, n_epochs, index, job.device, schedule_epochs=schedule_epochs,
                             precision=job.precision, on_epoch=on_epoch)
        runs[index:index + 1] = [run]
        _store(job.study, trial.number, record)  # stored per seed, before saving: a killed run resumes here
        if stem is not None:
            run["saved"] = str(save(stem))
            _store(job.study, trial.number, record)
        if job.progress is not None:
            job.progress(trial.number, index, job.seeds, run["test_accuracy"])
    return _row(trial, n_epochs, runs[:job.seeds], saved=job.save_dir is not None)


def _row(trial: FrozenTrial, n_epochs: int, runs: list[dict[str, Any]], *, saved: bool) -> Row:
    accs = [r["test_accuracy"] for r in runs]
    return Row(
        number=trial.number, val_accuracy=float(trial.value or 0.0), epochs=n_epochs, accuracies=accs,
        mean=statistics.fmean(accs), std=statistics.stdev(accs) if len(accs) > 1 else 0.0,
        param_count=trial.user_attrs.get("param_count"),
        seconds_per_epoch=statistics.fmean(r["seconds_per_epoch"] for r in runs),
        diverged=sum(bool(r.get("diverged")) for r in runs),
        saved=[r["saved"] for r in runs if saved],
    )


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
        write_saved(stem.with_suffix(suffix), earlier.with_suffix(suffix).read_bytes())
    run["saved"] = str(weights)
    return True


def _setting(record: dict[str, Any], spec: StudySpec) -> dict[str, Any]:
    """The budget a stored result was trained with; a record without ``schedule_epochs`` or ``train_fraction`` was
    trained with the study's."""
    return {"epochs": record.get("epochs"), "schedule_epochs": record.get("schedule_epochs", spec.epochs),
            "train_fraction": record.get("train_fraction", spec.train_fraction)}


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
    amp = candidates[0] if len(candidates) == 1 else choose_precision(
        probe_precisions(built, final.data, config.train, device, candidates).cost)
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

