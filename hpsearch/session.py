"""The run session: what ``hpsearch run``, ``worker``, ``create`` and ``reproduce`` do between parsing their options
and their exit code, as named steps in the order they run.

``run_study(spec, options, consoles)`` checks every option (bad input fails before anything is read or written),
opens the storage once, stops early when the study already holds its target, hands ``--workers K`` to K
``hpsearch worker`` processes (hpsearch.launch), and otherwise runs the trials here: data, the dead-trial rule, the
study, the artifact store, the study's note, the live display, the objective, ``study.run_trials``; its outcome
becomes the command's ending (an exception or SystemExit that the CLI turns into a line and an exit code).

The session prints its progress on the consoles it is given (the CLI's stdout and stderr), in the order the steps
run. Modules that import torch are imported inside the steps that need them: ``create`` and the commands that only
read import this module too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from rich.console import Console

from hpsearch import signals
from hpsearch._db_errors import database_error
from hpsearch._display import RunDisplay, TrainingProgress, summary_table
from hpsearch._errors import HpsearchError, SpecError, first_line
from hpsearch._optuna import fail_stale
from hpsearch._paths import default_cache_dir, default_data_dir
from hpsearch._preflight import check_run_writes, new_sqlite_file
from hpsearch._secrets import scrub
from hpsearch.stopping import dead_trial_rule
from hpsearch.storage import MAX_RETRY, heartbeat_settings, open_storage, storage_url
from hpsearch.study import (
    VAL_IMAGES_ATTR,
    finished_if_exists,
    load_existing,
    load_spec_from_study,
    open_study,
    run_trials,
)
from hpsearch.trials import count_finished
from hpsearch.warm_start import WARM_START_ATTR

if TYPE_CHECKING:
    import torch

    from hpsearch.artifacts import ArtifactStore
    from hpsearch.data import Data
    from hpsearch.spec import StudySpec
    from hpsearch.stopping import DeadTrialRule
    from hpsearch.study import RunOutcome


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """A run's options as the command parsed them; None: not given (the study file's value or the default)."""

    storage: str | None = None  # SQLAlchemy or grpc:// URL; None: $HPSEARCH_STORAGE, else sqlite:///hpsearch.db
    n_trials: int | None = None  # run until the study holds this many finished trials
    timeout: float | None = None  # seconds after which no trial is started
    data_dir: Path | None = None
    cache_dir: Path | None = None
    device: str = "auto"
    threads: int | None = None
    workers: int = 1  # > 1: that many `hpsearch worker` processes on this machine
    compile: bool = False
    precision: str = "auto"
    explain: bool = True  # per-trial PNGs and notes (--no-artifacts: False); checkpoints go to the store either way
    force: bool = False  # run even if the stored study was made from a different study file
    artifacts_location: str | None = None  # --artifacts
    keep_checkpoints: int = 0  # the checkpoints of the K best complete trials are kept
    summary: bool = True  # end with the study's summary table (--workers' children do not)


@dataclass(frozen=True)
class Consoles:
    """Where a session prints: ``out`` (stdout: progress, tables) and ``err`` (stderr: warnings, interruptions)."""

    out: Console
    err: Console


@dataclass(frozen=True)
class _Run:
    """One run's settings, resolved once by ``run_study`` and read by each step."""

    spec: StudySpec
    options: RunOptions
    url: str  # storage_url(options.storage): the storage URL, computed once
    cache: Path
    device: torch.device
    target: int | None  # finished trials to reach: --n-trials, else the study file's n_trials
    say: Consoles


def run_study(spec: StudySpec, options: RunOptions, say: Consoles) -> None:
    """Runs ``spec``'s study until it holds its target of finished trials, its timeout passes or it is interrupted.

    Raises SpecError (bad input), HpsearchError (a failure), signals.Terminated (SIGTERM: ``sigterm_ends_trial``
    turns it into its line and exit 143) or SystemExit (130 after Ctrl-C; a --workers child's failing exit code)."""
    run = _check_options(spec, options, say)
    # A new SQLite file is made only once the data has been read: a run that fails on its data leaves none behind.
    rdb = None if new_sqlite_file(run.url) else open_storage(run.url)
    if rdb is not None and _already_finished(run, rdb):
        return
    if options.workers > 1:
        _launch_workers(run, rdb)
    else:
        _run_here(run, rdb)


def _check_options(spec: StudySpec, options: RunOptions, say: Consoles) -> _Run:
    """Every option checked before anything is read or written: a bad value is bad input (exit 2)."""
    from hpsearch import artifacts
    from hpsearch.devices import check_precision, resolve_device

    if options.artifacts_location is not None:
        artifacts.normalize_location(options.artifacts_location)
    device = resolve_device(options.device)
    check_precision(options.precision, device)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    heartbeat_settings()  # a bad HPSEARCH_*_SECONDS is bad input too
    run = _Run(spec, options, url=storage_url(options.storage), cache=options.cache_dir or default_cache_dir(),
               device=device, target=options.n_trials or spec.n_trials, say=say)
    check_run_writes(storage=run.url, cache=run.cache,
                     artifacts=options.artifacts_location or artifacts.default_location(run.cache))
    return run


def _already_finished(run: _Run, rdb: optuna.storages.BaseStorage) -> bool:
    """True, after saying so, when the study already holds the target: nothing to run."""
    finished = finished_if_exists(rdb, run.spec.name)
    if run.target is None or finished is None or finished < run.target:
        return False
    study = open_study(run.spec, rdb, force=run.options.force)  # still refuses a changed study file
    fail_stale(study)
    run.say.out.print(f"study {run.spec.name!r} already holds {finished} finished trials (target {run.target}); "
                      "nothing to run. Raise --n-trials to run more.")
    if run.options.summary:
        run.say.out.print(summary_table(study))
    return True


def _launch_workers(run: _Run, rdb: optuna.storages.BaseStorage | None) -> None:
    """--workers K: the study is made (and its artifact store recorded) here; K worker processes train it."""
    from hpsearch import artifacts
    from hpsearch import data as datasets
    from hpsearch.launch import launch_workers
    from hpsearch.study import study_gone, study_identity

    o = run.options
    # Read once here: a bad dataset fails before the study exists, and a folder's decoded cache is written
    # once instead of raced by K workers. Each worker then loads it onto its own device.
    datasets.read_raw(run.spec.dataset, o.data_dir or default_data_dir(), run.cache)
    study = open_study(run.spec, rdb or open_storage(run.url), force=o.force)
    # recorded on the study now, so the workers find it (also checks it before K processes start)
    artifacts.open_artifact_store(artifacts.resolve_location(study, o.artifacts_location,
                                                             artifacts.default_location(run.cache)))
    identity = study_identity(study)
    code = launch_workers(run.spec.name, o.workers, run.device, storage=run.url, out=run.say.out.file,
                          n_trials=run.target, timeout=o.timeout, data_dir=o.data_dir, cache_dir=o.cache_dir,
                          compile=o.compile, explain=o.explain, precision=o.precision,
                          keep_checkpoints=o.keep_checkpoints, artifacts=o.artifacts_location)
    gone = study_gone(study, identity)  # deleted while the workers trained it: no summary to show
    if gone is not None:
        raise HpsearchError(gone)
    run.say.out.print(summary_table(study))
    if code:
        raise SystemExit(code)


def _run_here(run: _Run, rdb: optuna.storages.BaseStorage | None) -> None:
    """The trials in this process: data, study and store, the trials under the live display, then the outcome."""
    from hpsearch import artifacts
    from hpsearch.devices import configure_threads

    if run.device.type == "cpu":
        configure_threads(run.options.threads)
    data = _load_data(run)  # first: a dataset that cannot be read leaves the database untouched
    dead = _dead_trial_rule(run, data)
    study = open_study(run.spec, rdb or open_storage(run.url), force=run.options.force, dead=dead)
    if study.user_attrs.get(VAL_IMAGES_ATTR) != len(data.val):
        study.set_user_attr(VAL_IMAGES_ATTR, len(data.val))
    store = artifacts.open_artifact_store(artifacts.resolve_location(study, run.options.artifacts_location,
                                                                     artifacts.default_location(run.cache)))
    _say_start(run, study, data)
    started = time.monotonic()
    outcome, display = _run_trials_shown(run, study, data, dead, store)
    term = signals.take_terminated()  # first: from here on a resent SIGTERM is ignored
    if outcome.interrupted and term is not None:  # next: the SIGKILL that follows a SIGTERM must find it queued
        signals.retry_terminated(study, term, max_retry=MAX_RETRY)
    _update_study_note(run, study)
    if run.options.summary:
        run.say.out.print(summary_table(study))
        run.say.out.print(display.budget_line(time.monotonic() - started), soft_wrap=True)
    _end_with_outcome(run, study, outcome, term)


def _load_data(run: _Run) -> Data:
    from hpsearch import data as datasets

    spec = run.spec
    return datasets.load(spec.dataset, data_dir=run.options.data_dir or default_data_dir(), cache_dir=run.cache,
                         device=run.device, val_fraction=spec.val_fraction, train_fraction=spec.train_fraction,
                         seed=spec.seed)


def _dead_trial_rule(run: _Run, data: Data) -> DeadTrialRule | None:
    from hpsearch.objective import chance_accuracy

    return dead_trial_rule(run.spec, chance_accuracy(data.val))


def _say_start(run: _Run, study: optuna.Study, data: Data) -> None:
    """The study's note, then the run's first line (and the warm start's lines on a study's first run)."""
    spec = run.spec
    finished = count_finished(study)
    _save_study_note(study, spec, explain=run.options.explain)
    run.say.out.print(f"study {spec.name!r}: {spec.strategy} on {spec.dataset} "
                      f"({len(data.train)} train / {len(data.val)} val images) on {run.device}; "
                      f"{finished} finished trials so far" + (f", running to {run.target}" if run.target else "")
                      + (f", or until a trial reaches {spec.target:.4f}" if spec.target is not None else ""),
                      soft_wrap=True)
    if finished == 0:
        for line in warm_start_lines(study):
            run.say.out.print(line, soft_wrap=True)


def _run_trials_shown(run: _Run, study: optuna.Study, data: Data, dead: DeadTrialRule | None,
                      store: ArtifactStore) -> tuple[RunOutcome, RunDisplay]:
    """``study.run_trials`` with the objective, the live display and the checkpoint clean-up after each trial."""
    from hpsearch import artifacts
    from hpsearch.objective import make_objective

    o, spec = run.options, run.spec
    with RunDisplay(run.say.out, study, run.target) as display:
        timeout = o.timeout or spec.timeout
        objective = make_objective(spec, data, device=run.device, progress=display.epoch, compile=o.compile,
                                   store=store, dead=dead, explain=o.explain, precision=o.precision,
                                   deadline=None if timeout is None else time.monotonic() + timeout)
        cleanup = artifacts.checkpoints_after_trial(store, keep_best=o.keep_checkpoints)

        def on_trial_end(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            cleanup(study, trial)  # the trial's final state is stored by now
            display.trial_end(study, trial)

        outcome = run_trials(study, objective, n_trials=run.target, timeout=timeout,
                             on_trial_end=on_trial_end, on_storage_error=partial(_say_storage_error, run.say.err),
                             on_taken_over=partial(_say_taken_over, run.say.err), target=spec.target)
    return outcome, display


def _update_study_note(run: _Run, study: optuna.Study) -> None:
    try:  # the note's training seconds as of this run's end; best effort: the run's own outcome comes next
        _save_study_note(study, run.spec, explain=run.options.explain)
    except Exception as e:
        run.say.err.print(f"warning: the study's note was not updated ({first_line(e)})", soft_wrap=True)


def _end_with_outcome(run: _Run, study: optuna.Study, outcome: RunOutcome, term: signals.Terminated | None) -> None:
    """The outcome as the command's ending: SIGTERM, Ctrl-C, the target's line, or an error."""
    if outcome.interrupted and term is not None:  # its retry is queued already
        raise term  # sigterm_ends_trial prints its one line and exits 143
    if outcome.interrupted:
        run.say.err.print("interrupted: the running trial was marked FAIL; run the same command to resume")
        raise SystemExit(130)
    if outcome.target_met is not None:
        met = outcome.target_met
        run.say.out.print(f"target {met['target']:.4f} reached by trial {met['trial']} ({met['value']:.4f}) at "
                          f"{met['at']}: the study ends here (every worker stops after its current trial)",
                          soft_wrap=True)
    if outcome.no_trainable is not None:
        raise SpecError(f"{run.spec.name}: {outcome.no_trainable}")
    if outcome.fatal is not None:
        raise HpsearchError(outcome.fatal)
    if outcome.error is not None:
        raise HpsearchError(f"every trial of this run failed; last error: {outcome.error}")


def _save_study_note(study: optuna.Study, spec: StudySpec, *, explain: bool) -> None:
    """The study's note for optuna-dashboard: its study file, strategy, dataset, training seconds so far by device
    (and artifact store, if used); written only when it changed."""
    from hpsearch.artifacts import ARTIFACTS_ATTR
    from hpsearch.explain import save_study_note

    save_study_note(study, spec, artifacts=study.user_attrs.get(ARTIFACTS_ATTR) if explain else None)


def _say_taken_over(err: Console) -> None:
    err.print("warning: this worker's trial was failed as stale while the database was out of reach; its retry "
              "resumes it from its checkpoint; going on", soft_wrap=True)


def _say_storage_error(err: Console, error: BaseException, retry_in: float) -> None:
    cause = database_error(error) or error  # the driver's words, not Optuna's secondary error while handling them
    err.print(f"warning: lost the database ({scrub(first_line(cause))}); going on in {retry_in:g} s", soft_wrap=True)


def warm_start_lines(study: optuna.Study) -> list[str]:
    """What the study file's warm_start enqueued from earlier studies, and what it skipped and why."""
    warm = study.user_attrs.get(WARM_START_ATTR)
    if not warm:
        return []
    enqueued = f" ({', '.join(warm['enqueued'])})" if warm["enqueued"] else ""
    return [f"warm start: {len(warm['enqueued'])} configurations of earlier studies enqueued first{enqueued}",
            *(f"warm start: skipped {line}" for line in warm["skipped"])]


@dataclass(frozen=True)
class Created:
    """What ``create_study`` did: made the study, or updated the stored study file of one that existed."""

    existed: bool
    finished: int  # finished trials of the study that existed (0 for a new one)
    warm_start: list[str]  # warm_start_lines of a new study


def create_study(spec: StudySpec, *, storage: str | None, force: bool) -> Created:
    """The study of ``spec`` made (or its stored study file updated) without running a trial."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not Optuna's "A new study created" log line
    rdb = open_storage(storage)
    existed = finished_if_exists(rdb, spec.name) is not None
    study = open_study(spec, rdb, force=force)
    if existed:
        return Created(existed=True, finished=count_finished(study), warm_start=[])
    return Created(existed=False, finished=0, warm_start=warm_start_lines(study))


def stored_spec(name: str, storage: str | None) -> StudySpec:
    """The study file stored with study ``name``, which ``worker`` runs; the storage is never created."""
    return load_spec_from_study(open_storage(storage, create=False), name)


@dataclass(frozen=True)
class Stored:
    """What ``evaluate`` and ``export-model`` retrain from: a stored study, its study file, and where it trains."""

    study: optuna.Study
    spec: StudySpec
    device: torch.device
    data_dir: Path
    cache_dir: Path


def open_stored(name: str, options: RunOptions, *, cpu_work: bool = False) -> Stored:
    """Study ``name`` from ``options.storage`` (never created), with ``options.device`` resolved and checked against
    ``options.precision``, and the threads set: on a CPU device, or always when ``cpu_work`` (export-model checks
    and times its export on the CPU whatever device trains)."""
    from hpsearch.devices import check_precision, configure_threads, resolve_device

    rdb = open_storage(options.storage, create=False)
    spec = load_spec_from_study(rdb, name)
    study = load_existing(rdb, name)
    device = resolve_device(options.device)
    check_precision(options.precision, device)
    if cpu_work or device.type == "cpu":
        configure_threads(options.threads)
    return Stored(study=study, spec=spec, device=device, data_dir=options.data_dir or default_data_dir(),
                  cache_dir=options.cache_dir or default_cache_dir())


def epoch_line(display: TrainingProgress, run: str) -> Callable[[int, int, int, int, int, float], None]:
    """evaluate_study's per-epoch callback, shown as ``trial 3 seed 1/3  epoch 4/10  0:42 elapsed, ~1:03 left``
    (``run``: what one retraining is called, "seed" or "test run")."""

    def show(trial: int, index: int, total: int, epoch: int, epochs: int, elapsed: float) -> None:
        display.epoch(f"trial {trial:>4} {run} {index + 1}/{total}", epoch, epochs, elapsed)

    return show
