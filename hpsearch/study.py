"""Opening a study from a spec (stored on the study so workers can join by name) and running trials.

The sampler (``samplers``), why a trial stops early (``stopping``), the warm start (``warm_start``) and which errors
mean a lost database (``_db_errors``) have their own modules: import those names from there.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from hpsearch._attrs import SPEC_ATTR
from hpsearch._db_errors import lost_database as _lost_database
from hpsearch._db_errors import taken_over
from hpsearch._errors import HpsearchError, SpecError, first_line
from hpsearch._optuna import quiet_expected_logs
from hpsearch.samplers import make_sampler
from hpsearch.stopping import DeadTrialRule, SuccessiveHalving, make_pruner
from hpsearch.trials import count_finished, is_rejected
from hpsearch.warm_start import enqueue as enqueue_warm_start
from hpsearch.warm_start import warm_start_rows

if TYPE_CHECKING:  # the spec pulls in the strategies and torch; commands that only read need neither
    from hpsearch.spec import StudySpec

TARGET_ATTR = "hpsearch:target_met"  # when and by which trial the study file's target was reached
VAL_IMAGES_ATTR = "val_images"  # images in the validation split every trial is scored on (its noise, in show)
DB_RETRY_SECONDS = 5  # after a lost database connection, wait this long before going on
DB_OUTAGE_SECONDS = 600  # give up (exit 1) when the database stays unreachable this long
# Trials rejected before training (a feature map below 1x1, or a cost cap: hpsearch.stopping) stay PRUNED, so TPE
# learns to avoid them, but cost no training and do not count toward n_trials. This many in a row means the space
# yields nothing trainable.
MAX_REJECTED_IN_A_ROW = 50


def open_study(spec: StudySpec, storage: optuna.storages.BaseStorage, *, force: bool = False,
               dead: DeadTrialRule | None = None) -> optuna.Study:
    """Creates the study (storing the spec, enqueueing [[enqueue]]) or resumes it, refusing a changed file."""
    from hpsearch.artifacts import new_study_id  # here, not at the top: optuna.artifacts imports boto3 (0.1 s)

    created = False
    # Read before the study exists: an earlier study that is missing or unreachable leaves nothing half made.
    warm = warm_start_rows(spec, storage) if spec.warm_start is not None and finished_if_exists(
        storage, spec.name) is None else None
    try:
        study = optuna.create_study(storage=storage, study_name=spec.name, direction="maximize",
                                    sampler=make_sampler(spec, spec.seed), pruner=make_pruner(spec, dead))
        created = True
        new_study_id(study)  # first: a worker joining now waits for it (artifacts.study_id)
    except optuna.exceptions.DuplicatedStudyError:
        # Another run (or worker) made it: a fresh per-process sampler seed, so workers explore different points.
        study = optuna.load_study(storage=storage, study_name=spec.name,
                                  sampler=make_sampler(spec, (spec.seed + os.getpid()) % 2**32),
                                  pruner=make_pruner(spec, dead))
        stored = stored_spec(study)  # a study another tool made is refused, not taken over
        if not force:
            from hpsearch.spec import spec_from_dict

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
        from hpsearch.spec import split_row

        for row in spec.enqueue:
            params, meta = split_row(row)
            study.enqueue_trial(params, user_attrs=meta or None, skip_if_exists=True)
        if warm is not None:
            enqueue_warm_start(study, warm)
    return study


def reached_target(study: optuna.Study, target: float) -> dict[str, Any] | None:
    """The first complete trial (by the time it completed) whose value is >= ``target``, as recorded on the study
    (user attr ``hpsearch:target_met``: target, trial, value, at) for show and the report; None while none has."""
    reached = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
               if t.value is not None and t.value >= target]
    if not reached:
        return None
    first = min(reached, key=lambda t: (t.datetime_complete or datetime.datetime.max, t.number))
    met = {"target": target, "trial": first.number, "value": first.value,
           "at": first.datetime_complete.isoformat(timespec="seconds") if first.datetime_complete else None}
    if study.user_attrs.get(TARGET_ATTR) != met:
        study.set_user_attr(TARGET_ATTR, met)
    return met


def target_status(study: optuna.Study) -> str | None:
    """``0.9900, reached by trial 12 (0.9912) at 2026-...`` or ``0.9900, not reached``: for show and the report;
    None when the study file sets no target."""
    target = json.loads(study.user_attrs.get(SPEC_ATTR, "{}")).get("target")
    if target is None:
        return None
    met = study.user_attrs.get(TARGET_ATTR)
    if not met or met.get("target") != target:
        return f"{target:.4f}, not reached"
    return f"{target:.4f}, reached by trial {met['trial']} ({met['value']:.4f}) at {met['at']}"


def load_spec_from_study(storage: optuna.storages.BaseStorage, name: str) -> StudySpec:
    """What a worker needs to join: the spec the study was created from."""
    from hpsearch.spec import spec_from_dict

    return spec_from_dict(json.loads(stored_spec(load_existing(storage, name))), where=f"study {name!r}")


def stored_spec(study: optuna.Study) -> str:
    """The study file stored on a study that hpsearch made (JSON). A study made by plain Optuna or another tool has
    none: it is refused, never taken over. One that another hpsearch process created a moment ago gets its id, then
    its study file, within moments: that is waited for (an empty study maximizing one value may be one)."""
    from hpsearch.artifacts import STUDY_ID_ATTR, STUDY_ID_WAIT_SECONDS

    deadline = time.monotonic() + STUDY_ID_WAIT_SECONDS
    while True:
        attrs = study.user_attrs
        if SPEC_ATTR in attrs:
            return str(attrs[SPEC_ATTR])
        being_made = STUDY_ID_ATTR in attrs or (
            study.directions == [optuna.study.StudyDirection.MAXIMIZE] and not study.get_trials(deepcopy=False))
        if not being_made or time.monotonic() > deadline:
            raise SpecError(f"study {study.study_name!r} was not made by hpsearch (it has no stored study file): it "
                            "belongs to another tool; give this study another name") from None
        time.sleep(0.1)


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


class StudyGone(BaseException):
    """The run's study was deleted (``hpsearch delete``, ``optuna.delete_study``) while the run trained it, and
    perhaps made again under its name by someone else. A BaseException, not an Exception: Optuna stores FAIL for a
    trial whose objective raises any Exception, and the running trial's id may by now be a trial of the new study
    (SQLite gives a freed id out again). The message is the run's one line of error."""


def study_identity(study: optuna.Study) -> str | None:
    """The study's hpsearch id (``artifacts.STUDY_ID_ATTR``, set when hpsearch made it), None for one without."""
    from hpsearch.artifacts import STUDY_ID_ATTR

    value = study.user_attrs.get(STUDY_ID_ATTR)
    return None if value is None else str(value)


def check_study(study: optuna.Study, identity: str | None) -> None:
    """Raises StudyGone when the storage no longer holds ``study`` as the study whose hpsearch id is ``identity``:
    it knows no study by its id (a storage's documented KeyError), or the study under that id now has another
    hpsearch id (deleted and made again: SQLite gives the freed id to the next study). A database error propagates."""
    try:
        replaced = identity is not None and study_identity(study) != identity
    except KeyError:
        replaced = False
    else:
        if not replaced:
            return
    since = " (a new study has its name now)" if replaced else ""
    raise StudyGone(f"study {study.study_name!r} was deleted while this run trained it{since}; nothing more to store")


def study_gone(study: optuna.Study, identity: str | None) -> str | None:
    """Why ``study`` is gone (``check_study``), or None while it is there or the database cannot tell."""
    try:
        check_study(study, identity)
    except StudyGone as e:
        return str(e)
    except Exception:
        return None
    return None


@dataclass
class RunOutcome:
    ran: int = 0  # trials this process ran, rejected architectures excepted
    rejected: int = 0  # trials this process rejected before training
    no_trainable: str | None = None  # set when MAX_REJECTED_IN_A_ROW rejections in a row ended the run
    interrupted: bool = False
    error: str | None = None  # set when every trial this process ran failed
    fatal: str | None = None  # an error no other configuration would escape (weights, files): the run stopped
    target_met: dict[str, Any] | None = None  # the study's target was reached (reached_target): the run stopped


def run_trials(
    study: optuna.Study,
    objective: Any,
    *,
    n_trials: int | None,
    timeout: float | None,
    on_trial_end: Any = None,
    on_storage_error: Any = None,
    on_taken_over: Any = None,
    target: float | None = None,
) -> RunOutcome:
    """Runs until the study holds ``n_trials`` finished (complete + pruned) trials, all workers counted,
    or ``timeout`` seconds pass. Every worker stops at the total; up to one trial per extra worker may
    already be running then and finishes too.

    A database outage (server restart, network) does not end the run: it waits and goes on. The trial that
    was running is left to its heartbeat: once stale it is failed and retried from its checkpoint.

    A study deleted meanwhile (and perhaps made again under its name) ends the run with HpsearchError: between
    epochs (the objective's ``check_study``), between trials (before the next is asked for) or when storing a
    trial fails. Nothing more is stored, and never in a new study of the same name.

    ``target``: once a complete trial of any worker reaches this value, every worker stops at its next trial (a study
    that has reached it runs nothing).
    """
    loop = _TrialLoop(study, objective, n_trials=n_trials, target=target, on_trial_end=on_trial_end,
                      on_storage_error=on_storage_error, on_taken_over=on_taken_over)
    if target is not None:
        loop.outcome.target_met = reached_target(study, target)
        if loop.outcome.target_met is not None:
            return loop.outcome
    return loop.run(timeout)


class _TrialLoop:
    """``run_trials``' state between ``study.optimize`` calls and its callback: what this process ran and rejected,
    the failures, the database outage being waited out."""

    def __init__(self, study: optuna.Study, objective: Any, *, n_trials: int | None, target: float | None,
                 on_trial_end: Any, on_storage_error: Any, on_taken_over: Any) -> None:
        self.study, self.objective, self.n_trials, self.target = study, objective, n_trials, target
        self.on_trial_end, self.on_storage_error, self.on_taken_over = on_trial_end, on_storage_error, on_taken_over
        self.identity = study_identity(study)
        # Bounds this process even if every trial fails.
        self.budget = None if n_trials is None else n_trials - count_finished(study)
        self.outcome = RunOutcome()
        self.failures: list[str] = []
        self.outage_start: float | None = None  # when the current database outage began
        self.rejected_in_a_row = 0

    def run(self, timeout: float | None) -> RunOutcome:
        deadline = None if timeout is None else time.monotonic() + timeout
        quiet_expected_logs()
        if isinstance(self.study.pruner, SuccessiveHalving):
            self.study.pruner.promote_late(self.study)  # what an earlier run left promotable
        while self.budget is None or self.outcome.ran < self.budget:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            try:
                if self.optimize(left):
                    break
            except StudyGone as e:
                raise HpsearchError(str(e)) from None
            except KeyboardInterrupt:
                self.outcome.interrupted = True  # Optuna has already marked the running trial FAIL
                break
            except Exception as e:
                # Asked first: Optuna fails on a deleted study's trial in its own ways (KeyError, then UnboundLocalError
                # from its clean-up), and on some databases with errors that look like an outage.
                self.raise_if_gone()
                if taken_over(e):
                    # This worker was cut off from the database past the heartbeat grace period (an outage), so another
                    # worker failed its trial as stale and queued the retry, which resumes from the trial's checkpoint;
                    # storing this worker's result is refused. Nothing is lost: go on with the next trial.
                    if self.on_taken_over is not None:
                        self.on_taken_over()
                    continue
                if not _lost_database(e):
                    raise
                if self.wait_out_outage(e):
                    break
        if self.failures and len(self.failures) == self.outcome.ran:
            self.outcome.error = self.failures[-1]
        return self.outcome

    def optimize(self, left: float | None) -> bool:
        """One ``study.optimize``; whether the run is over."""
        self.study.optimize(
            self.objective,
            n_trials=None if self.budget is None else self.budget - self.outcome.ran,
            timeout=left,
            callbacks=[self.after_trial],
            catch=(Exception,),  # one broken configuration (out of memory, say) must not end the study
        )
        # Rejected architectures used up some of optimize's n_trials without counting: go on for the rest.
        ended = self.outcome.fatal or self.outcome.no_trainable or self.outcome.target_met
        return bool(self.outcome.rejected == 0 or ended or self.budget is None or self.n_trials_reached())

    def n_trials_reached(self) -> bool:
        return self.n_trials is not None and count_finished(self.study) >= self.n_trials

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Optuna's callback after each trial of this process."""
        self.outage_start = None
        check_study(study, self.identity)  # before the next trial is asked for: never one in a new study of this name
        if is_rejected(trial):
            self.after_rejected(study, trial)
            return
        self.rejected_in_a_row = 0
        self.outcome.ran += 1
        if trial.state == TrialState.FAIL:
            self.failures.append(trial.user_attrs.get("error", "unknown error"))
        if self.on_trial_end is not None:
            self.on_trial_end(study, trial)
        if self.ends_run(study, trial):
            study.stop()
        elif isinstance(study.pruner, SuccessiveHalving):
            study.pruner.promote_late(study)  # before the next trial is asked for, which takes the first promoted

    def after_rejected(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.outcome.rejected += 1
        self.rejected_in_a_row += 1
        if self.on_trial_end is not None:
            self.on_trial_end(study, trial)
        if self.rejected_in_a_row >= MAX_REJECTED_IN_A_ROW:
            self.outcome.no_trainable = (
                f"{self.rejected_in_a_row} sampled architectures in a row were rejected before training (last: "
                f"{trial.user_attrs['rejected']}); make the [space] fit the input size (fewer conv_layers, "
                "smaller kernel_size/stride/pool_kernel, or padding) and max_flops, if set")
            study.stop()

    def ends_run(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        """Whether the run stops after ``trial``: an error no configuration escapes, the target reached (by this
        worker's trial or another's: every worker stops after its own), or n_trials finished."""
        if trial.user_attrs.get("fatal") and trial.state == TrialState.FAIL:
            self.outcome.fatal = trial.user_attrs["error"]
            return True
        if self.target is not None and (met := reached_target(study, self.target)) is not None:
            self.outcome.target_met = met
            return True
        return self.n_trials_reached()

    def raise_if_gone(self) -> None:
        gone = study_gone(self.study, self.identity)
        if gone is not None:
            raise HpsearchError(gone) from None

    def wait_out_outage(self, e: Exception) -> bool:
        """Waits DB_RETRY_SECONDS after a lost database connection (HpsearchError once the outage lasts over
        DB_OUTAGE_SECONDS); whether the study has reached n_trials meanwhile."""
        self.outage_start = self.outage_start or time.monotonic()
        if time.monotonic() - self.outage_start > DB_OUTAGE_SECONDS:
            raise HpsearchError(f"the database has been unreachable for over {DB_OUTAGE_SECONDS} s "
                                f"({first_line(e)}); finished trials are safe, run again to resume") from None
        if self.on_storage_error is not None:
            self.on_storage_error(e, DB_RETRY_SECONDS)
        time.sleep(DB_RETRY_SECONDS)
        self.raise_if_gone()  # deleted during the outage
        finished_now = _count_or_none(self.study)
        return self.n_trials is not None and finished_now is not None and finished_now >= self.n_trials


def _count_or_none(study: optuna.Study) -> int | None:
    try:
        return count_finished(study)
    except Exception as e:
        if _lost_database(e):
            return None
        raise
