"""Opening a study from a spec (stored on the study so workers can join by name) and running trials."""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any

import optuna
import sqlalchemy
from optuna.trial import TrialState

from hpsearch._errors import HpsearchError, SpecError, first_line
from hpsearch.spec import StudySpec, spec_from_dict

SPEC_ATTR = "hpsearch:spec"  # the study file's content, as JSON
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
DB_RETRY_SECONDS = 5  # after a lost database connection, wait this long before going on
DB_OUTAGE_SECONDS = 600  # give up (exit 1) when the database stays unreachable this long


def make_sampler(spec: StudySpec, seed: int | None) -> optuna.samplers.BaseSampler:
    knobs = {k: v for k, v in spec.sampler.items() if k != "type"}
    kind = spec.sampler["type"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if kind == "tpe":
            return optuna.samplers.TPESampler(seed=seed, **knobs)
        if kind == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if kind == "gp":
            return optuna.samplers.GPSampler(seed=seed, **knobs)
        if kind == "cmaes":
            return optuna.samplers.CmaEsSampler(seed=seed, **knobs)
        return optuna.samplers.QMCSampler(seed=seed, **knobs)


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    knobs = {k: v for k, v in spec.pruner.items() if k != "type"}
    kind = spec.pruner["type"]
    if kind == "none":
        return optuna.pruners.NopPruner()
    if kind == "median":
        return optuna.pruners.MedianPruner(**knobs)
    if kind == "percentile":
        return optuna.pruners.PercentilePruner(**{"percentile": 25.0, **knobs})
    if kind == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner(**knobs)
    # Steps are epochs, so a trial's full budget is known: hyperband needs no "auto" guess.
    return optuna.pruners.HyperbandPruner(**{"max_resource": spec.epochs, **knobs})


def open_study(spec: StudySpec, storage: optuna.storages.BaseStorage, *, force: bool = False) -> optuna.Study:
    """Creates the study (storing the spec, enqueueing [[enqueue]]) or resumes it, refusing a changed file."""
    created = False
    try:
        study = optuna.create_study(storage=storage, study_name=spec.name, direction="maximize",
                                    sampler=make_sampler(spec, spec.seed), pruner=make_pruner(spec))
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        # Another run (or worker) made it: a fresh per-process sampler seed, so workers explore different points.
        study = optuna.load_study(storage=storage, study_name=spec.name,
                                  sampler=make_sampler(spec, (spec.seed + os.getpid()) % 2**32),
                                  pruner=make_pruner(spec))
        stored = study.user_attrs.get(SPEC_ATTR)
        if stored is not None and not force:
            old = spec_from_dict(json.loads(stored), where=f"study {spec.name!r}").search_definition()
            new = spec.search_definition()
            if old != new:
                differs = ", ".join(k for k in new if old.get(k) != new.get(k))
                raise SpecError(f"study {spec.name!r} exists with different settings ({differs}); pass --force "
                                "to run it with this file, or give the study a new name") from None
    study.set_user_attr(SPEC_ATTR, json.dumps(spec.to_dict()))
    study.set_user_attr("strategy", spec.strategy)
    study.set_user_attr("dataset", spec.dataset)
    study.set_metric_names(["val_accuracy"])
    if created:
        for params in spec.enqueue:
            study.enqueue_trial(params, skip_if_exists=True)
    return study


def load_spec_from_study(storage: optuna.storages.BaseStorage, name: str) -> StudySpec:
    """What a worker needs to join: the spec the study was created from."""
    study = load_existing(storage, name)
    stored = study.user_attrs.get(SPEC_ATTR)
    if stored is None:
        raise HpsearchError(f"study {name!r} was not created by hpsearch (no stored study file)")
    return spec_from_dict(json.loads(stored), where=f"study {name!r}")


def load_existing(storage: optuna.storages.BaseStorage, name: str) -> optuna.Study:
    try:
        return optuna.load_study(storage=storage, study_name=name)
    except KeyError:
        names = optuna.get_all_study_names(storage)
        known = ", ".join(names) if names else "none"
        raise SpecError(f"study {name!r} does not exist in this storage; studies: {known}") from None


def finished_if_exists(storage: optuna.storages.BaseStorage, name: str) -> int | None:
    """Finished trials of study ``name``, or None when there is no such study (nothing is created)."""
    if name not in optuna.get_all_study_names(storage):
        return None
    return count_finished(optuna.load_study(storage=storage, study_name=name))


def fail_stale(study: optuna.Study) -> None:
    """Fails (and enqueues the retry of) trials whose worker died: their heartbeat is older than the grace period.
    Optuna does this before each trial; hpsearch also does it when a run has no trial to start, so a dead
    worker's trial does not stay RUNNING in a study that has reached its count."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def count_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


@dataclass
class RunOutcome:
    ran: int = 0  # trials this process ran
    interrupted: bool = False
    error: str | None = None  # set when every trial this process ran failed
    fatal: str | None = None  # an error no other configuration would escape (weights, files): the run stopped


def run_trials(
    study: optuna.Study,
    objective: Any,
    *,
    n_trials: int | None,
    timeout: float | None,
    on_trial_end: Any = None,
    on_storage_error: Any = None,
) -> RunOutcome:
    """Runs until the study holds ``n_trials`` finished (complete + pruned) trials, all workers counted,
    or ``timeout`` seconds pass. Every worker stops at the total; up to one trial per extra worker may
    already be running then and finishes too.

    A database outage (server restart, network) does not end the run: it waits and goes on. The trial that
    was running is left to its heartbeat: once stale it is failed and retried from its checkpoint.
    """
    finished = count_finished(study)
    outcome = RunOutcome()
    budget = None if n_trials is None else n_trials - finished  # bounds this process even if every trial fails
    deadline = None if timeout is None else time.monotonic() + timeout
    failures: list[str] = []
    outage_start: float | None = None  # when the current database outage began

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        nonlocal outage_start
        outcome.ran += 1
        outage_start = None
        if trial.state == TrialState.FAIL:
            failures.append(trial.user_attrs.get("error", "unknown error"))
        if on_trial_end is not None:
            on_trial_end(study, trial)
        if trial.user_attrs.get("fatal") and trial.state == TrialState.FAIL:
            outcome.fatal = trial.user_attrs["error"]
            study.stop()
        elif n_trials is not None and count_finished(study) >= n_trials:
            study.stop()

    # Records of Optuna's submodules reach the handlers of the "optuna" logger, not its filters: filter there.
    for handler in logging.getLogger("optuna").handlers:
        if _quiet_expected not in handler.filters:
            handler.addFilter(_quiet_expected)
    while budget is None or outcome.ran < budget:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            break
        try:
            study.optimize(
                objective,
                n_trials=None if budget is None else budget - outcome.ran,
                timeout=left,
                callbacks=[after_trial],
                catch=(Exception,),  # one broken configuration (out of memory, say) must not end the study
            )
            break
        except KeyboardInterrupt:
            outcome.interrupted = True  # Optuna has already marked the running trial FAIL
            break
        except Exception as e:
            if not _lost_database(e):
                raise
            outage_start = outage_start or time.monotonic()
            if time.monotonic() - outage_start > DB_OUTAGE_SECONDS:
                raise HpsearchError(f"the database has been unreachable for over {DB_OUTAGE_SECONDS} s "
                                    f"({first_line(e)}); finished trials are safe, run again to resume") from None
            if on_storage_error is not None:
                on_storage_error(e, DB_RETRY_SECONDS)
            time.sleep(DB_RETRY_SECONDS)
            finished_now = _count_or_none(study)
            if n_trials is not None and finished_now is not None and finished_now >= n_trials:
                break
    if failures and len(failures) == outcome.ran:
        outcome.error = failures[-1]
    return outcome


DB_ERRORS = (optuna.exceptions.StorageInternalError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)


def _lost_database(e: BaseException | None) -> bool:
    """Whether a database error is behind ``e``: Optuna can raise a secondary error while handling one
    (its own clean-up queries fail too), so the whole chain is searched."""
    while e is not None:
        # grpc.RpcError (by module name: grpc is an optional extra): the gRPC proxy is down or unreachable.
        if isinstance(e, DB_ERRORS) or type(e).__module__.startswith("grpc"):
            return True
        e = e.__cause__ or e.__context__
    return False


def _count_or_none(study: optuna.Study) -> int | None:
    try:
        return count_finished(study)
    except Exception as e:
        if _lost_database(e):
            return None
        raise


def _quiet_expected(record: logging.LogRecord) -> bool:
    # Conditional parameters (momentum for sgd only, ...) make TPE fall back to independent sampling for
    # them; Optuna warns each time. Expected here, so not shown. So are Optuna's reports of a failed trial
    # whose error is an HpsearchError (already a one-line message of ours) and its "failed with value None".
    message = record.getMessage()
    if "sampled independently" in message or (message.startswith("Trial ") and "failed with value None" in message):
        return False
    return not (record.exc_info and isinstance(record.exc_info[1], HpsearchError))
