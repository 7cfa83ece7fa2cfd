"""Opening a study from a spec (stored on the study so workers can join by name) and running trials."""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna
import sqlalchemy
from optuna.trial import TrialState

from hpsearch._attrs import SPEC_ATTR
from hpsearch._errors import HpsearchError, SpecError, first_line
from hpsearch._secrets import redact_url
from hpsearch.trials import count_finished, is_rejected

if TYPE_CHECKING:  # the spec pulls in the strategies and torch; commands that only read need neither
    from hpsearch.spec import StudySpec

TARGET_ATTR = "hpsearch:target_met"  # when and by which trial the study file's target was reached
WARM_START_ATTR = "hpsearch:warm_start"  # what the warm start enqueued and skipped, when the study was created
DB_RETRY_SECONDS = 5  # after a lost database connection, wait this long before going on
DB_OUTAGE_SECONDS = 600  # give up (exit 1) when the database stays unreachable this long
# Trials rejected before training (feature map below 1x1) stay PRUNED, so TPE learns to avoid them, but cost no
# training and do not count toward n_trials. This many in a row means the space yields nothing trainable.
MAX_REJECTED_IN_A_ROW = 50


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
        if kind == "enqueued":
            return EnqueuedOnly()
        return optuna.samplers.QMCSampler(seed=seed, **knobs)


class EnqueuedOnly(optuna.samplers.BaseSampler):
    """Replays [[enqueue]] rows and samples nothing: a parameter a row does not give is an error, not a guess
    (a fixed one-value parameter of the [space] excepted)."""

    def infer_relative_search_space(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
        return {}

    def sample_relative(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                        search_space: dict[str, Any]) -> dict[str, Any]:
        return {}

    def sample_independent(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, param_name: str,
                           param_distribution: optuna.distributions.BaseDistribution) -> Any:
        if isinstance(param_distribution, optuna.distributions.CategoricalDistribution) and len(
                param_distribution.choices) == 1:
            return param_distribution.choices[0]
        raise SpecError(f'sampler "enqueued": trial {trial.number} needs {param_name!r}, which no [[enqueue]] row '
                        "gives it (every row is used once; a row must name each parameter it uses)")


@dataclass(frozen=True)
class DeadTrialRule:
    """A trial whose validation accuracy is below ``threshold`` (chance plus a margin) after ``after`` epochs
    learns nothing: it is pruned at once instead of spending its whole budget at chance."""

    threshold: float
    after: int  # epochs

    def reason(self, epoch: int, value: float) -> str | None:
        """Why the trial is dead after 0-based ``epoch`` with validation accuracy ``value``; None when it is not."""
        if epoch + 1 < self.after or value >= self.threshold:
            return None
        return f"val accuracy {value:.4f} after {epoch + 1} epochs is at chance (below {self.threshold:.4f})"


DEAD_MARGIN = 0.02  # accuracy points above chance a trial must reach ...
DEAD_AFTER = 1  # ... after this many epochs


def dead_trial_rule(spec: StudySpec, chance: float) -> DeadTrialRule | None:
    """The study's dead-trial rule for a validation split where always guessing one class scores ``chance``;
    None when the study turns it off (``pruner = "none"`` or ``dead_trial = false``)."""
    threshold = chance + spec.pruner.get("dead_margin", DEAD_MARGIN)
    # A validation split (nearly) all of one class gives chance no meaning: nothing could beat the threshold.
    if spec.pruner["type"] == "none" or not spec.pruner.get("dead_trial", True) or threshold >= 1:
        return None
    return DeadTrialRule(threshold=threshold, after=spec.pruner.get("dead_after", DEAD_AFTER))


PRUNERS: dict[str, type[optuna.pruners.BasePruner]] = {
    "none": optuna.pruners.NopPruner,
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "successive-halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
}


def rung_step(spec: StudySpec, k: int) -> int:
    """The step rung ``k``'s value is reported at: ``reduction_factor ** k``, where Optuna's successive-halving
    pruner (min_resource 1) holds its k-th promotion."""
    return int(spec.pruner.get("reduction_factor", 3)) ** k


def make_pruner(spec: StudySpec, dead: DeadTrialRule | None = None) -> optuna.pruners.BasePruner:
    from hpsearch.spec import DEAD_KNOBS

    knobs = {k: v for k, v in spec.pruner.items() if k != "type" and k not in DEAD_KNOBS}
    kind = spec.pruner["type"]
    if spec.rungs:
        # Each rung is one step (rung_step). No dead-trial rule: a rung is short by design (objective.stages).
        if kind == "none":
            return optuna.pruners.NopPruner()
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, min_early_stopping_rate=0, **knobs)
    if kind == "percentile":
        knobs = {"percentile": 25.0, **knobs}
    if kind == "hyperband":
        # Steps are epochs, so a trial's full budget is known: hyperband needs no "auto" guess.
        knobs = {"max_resource": spec.epochs, **knobs}
    if dead is None:
        return PRUNERS[kind](**knobs)
    return _with_dead_trials(PRUNERS[kind])(dead=dead, **knobs)


def _with_dead_trials(base: type[optuna.pruners.BasePruner]) -> Any:
    """``base`` that also prunes dead trials with Optuna's ThresholdPruner. A subclass rather than a wrapper:
    Optuna shows samplers Hyperband's per-bracket trials only when ``isinstance(pruner, HyperbandPruner)``."""

    class WithDeadTrials(base):  # type: ignore[valid-type,misc]
        def __init__(self, *, dead: DeadTrialRule, **knobs: Any) -> None:
            super().__init__(**knobs)
            self._dead = optuna.pruners.ThresholdPruner(lower=dead.threshold, n_warmup_steps=dead.after - 1)

        def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
            return self._dead.prune(study, trial) or super().prune(study, trial)

    return WithDeadTrials


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
            for source, params in warm.rows:
                study.enqueue_trial(params, user_attrs={"warm_start": source}, skip_if_exists=True)
            study.set_user_attr(WARM_START_ATTR, {"enqueued": [source for source, _ in warm.rows],
                                                  "skipped": warm.skipped})
    return study


@dataclass(frozen=True)
class WarmRows:
    rows: list[tuple[str, dict[str, Any]]]  # ("<study>#<trial number>", params) to enqueue, best first per study
    skipped: list[str]  # "<study>#<trial>: <why it does not fit this space>"


def warm_start_rows(spec: StudySpec, storage: optuna.storages.BaseStorage) -> WarmRows:
    """The best ``top`` complete configurations of each earlier study that fit this study's space (every parameter
    known to this strategy and inside this space; those it does not set are sampled). A missing earlier study is bad
    input (exit 2); one without complete trials adds nothing."""
    from hpsearch.storage import open_storage

    assert spec.warm_start is not None
    warm = spec.warm_start
    source = storage if warm.storage is None else open_storage(warm.storage, create=False)
    names = optuna.get_all_study_names(source)
    rows: list[tuple[str, dict[str, Any]]] = []
    skipped: list[str] = []
    for name in warm.studies:
        if name not in names:
            raise SpecError(f"warm_start.studies: study {name!r} does not exist in "
                            f"{'this storage' if warm.storage is None else redact_url(warm.storage)}; studies: "
                            f"{', '.join(names) or 'none'}")
        complete = optuna.load_study(study_name=name, storage=source).get_trials(
            deepcopy=False, states=(TrialState.COMPLETE,))
        taken = 0
        for trial in sorted(complete, key=lambda t: (-(t.value or 0.0), t.number)):
            if taken == warm.top:
                break
            why = _does_not_fit(spec, trial.params)
            if why is None:
                rows.append((f"{name}#{trial.number}", trial.params))
                taken += 1
            else:
                skipped.append(f"{name}#{trial.number}: {why}")
    return WarmRows(rows, skipped)


def _does_not_fit(spec: StudySpec, params: dict[str, Any]) -> str | None:
    for key, value in params.items():
        try:
            spec.space.check_fixed_value(key, value)
        except ValueError as e:
            return f"{key} = {value!r} {e}"
    return None


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


def fail_stale(study: optuna.Study) -> None:
    """Fails (and enqueues the retry of) trials whose worker died: their heartbeat is older than the grace period.
    Optuna does this before each trial; hpsearch also does it when a run has no trial to start, so a dead
    worker's trial does not stay RUNNING in a study that has reached its count, and each worker's heartbeat thread
    and ``hpsearch proxy`` do it every ``storage.reap_seconds``. With ``storage.HeartbeatStorage`` a trial without
    a heartbeat (its worker died first) is given one, so it goes stale too, and each stale trial is retried once
    however many processes fail it at the same moment."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


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
    identity = study_identity(study)
    finished = count_finished(study)
    outcome = RunOutcome()
    if target is not None:
        outcome.target_met = reached_target(study, target)
        if outcome.target_met is not None:
            return outcome
    budget = None if n_trials is None else n_trials - finished  # bounds this process even if every trial fails
    deadline = None if timeout is None else time.monotonic() + timeout
    failures: list[str] = []
    outage_start: float | None = None  # when the current database outage began

    rejected_in_a_row = 0

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        nonlocal outage_start, rejected_in_a_row
        outage_start = None
        check_study(study, identity)  # before the next trial is asked for: never one in a new study of this name
        if is_rejected(trial):
            outcome.rejected += 1
            rejected_in_a_row += 1
            if on_trial_end is not None:
                on_trial_end(study, trial)
            if rejected_in_a_row >= MAX_REJECTED_IN_A_ROW:
                outcome.no_trainable = (
                    f"{rejected_in_a_row} sampled architectures in a row were rejected before training (last: "
                    f"{trial.user_attrs['rejected']}); make the [space] fit the input size (fewer conv_layers, "
                    "smaller kernel_size/stride/pool_kernel, or padding) and max_flops, if set")
                study.stop()
            return
        rejected_in_a_row = 0
        outcome.ran += 1
        if trial.state == TrialState.FAIL:
            failures.append(trial.user_attrs.get("error", "unknown error"))
        if on_trial_end is not None:
            on_trial_end(study, trial)
        if trial.user_attrs.get("fatal") and trial.state == TrialState.FAIL:
            outcome.fatal = trial.user_attrs["error"]
            study.stop()
        elif target is not None and (met := reached_target(study, target)) is not None:
            outcome.target_met = met  # this worker's trial or another's: every worker stops after its own
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
            # Rejected architectures used up some of optimize's n_trials without counting: go on for the rest.
            ended = outcome.fatal or outcome.no_trainable or outcome.target_met
            if outcome.rejected == 0 or ended or budget is None or (
                n_trials is not None and count_finished(study) >= n_trials
            ):
                break
        except StudyGone as e:
            raise HpsearchError(str(e)) from None
        except KeyboardInterrupt:
            outcome.interrupted = True  # Optuna has already marked the running trial FAIL
            break
        except Exception as e:
            # Asked first: Optuna fails on a deleted study's trial in its own ways (KeyError, then UnboundLocalError
            # from its clean-up), and on some databases with errors that look like an outage.
            gone = study_gone(study, identity)
            if gone is not None:
                raise HpsearchError(gone) from None
            if _taken_over(e):
                # This worker was cut off from the database past the heartbeat grace period (an outage), so another
                # worker failed its trial as stale and queued the retry, which resumes from the trial's checkpoint;
                # storing this worker's result is refused. Nothing is lost: go on with the next trial.
                if on_taken_over is not None:
                    on_taken_over()
                continue
            if not _lost_database(e):
                raise
            outage_start = outage_start or time.monotonic()
            if time.monotonic() - outage_start > DB_OUTAGE_SECONDS:
                raise HpsearchError(f"the database has been unreachable for over {DB_OUTAGE_SECONDS} s "
                                    f"({first_line(e)}); finished trials are safe, run again to resume") from None
            if on_storage_error is not None:
                on_storage_error(e, DB_RETRY_SECONDS)
            time.sleep(DB_RETRY_SECONDS)
            gone = study_gone(study, identity)  # deleted during the outage
            if gone is not None:
                raise HpsearchError(gone) from None
            finished_now = _count_or_none(study)
            if n_trials is not None and finished_now is not None and finished_now >= n_trials:
                break
    if failures and len(failures) == outcome.ran:
        outcome.error = failures[-1]
    return outcome


DB_ERRORS = (optuna.exceptions.StorageInternalError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)


def database_error(e: BaseException | None) -> BaseException | None:
    """The database error behind ``e`` (the first in its chain), or None: what to tell the user, not the secondary
    error Optuna raised while handling it (an UnboundLocalError from its clean-up, say)."""
    while e is not None:
        if isinstance(e, DB_ERRORS) or type(e).__module__.startswith("grpc"):
            return e
        e = e.__cause__ or e.__context__
    return None


def _lost_database(e: BaseException | None) -> bool:
    """Whether a database error is behind ``e``: Optuna can raise a secondary error while handling one
    (its own clean-up queries fail too), so the whole chain is searched."""
    return database_error(e) is not None


def _taken_over(e: BaseException) -> bool:
    """Optuna's refusal to store the result of a trial that another worker has failed as stale meanwhile."""
    return isinstance(e, optuna.exceptions.UpdateFinishedTrialError) or (
        isinstance(e, ValueError) and str(e).startswith("Cannot tell a FAIL trial"))


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
    # Ctrl-C and SIGTERM (a KeyboardInterrupt too): the CLI says in one line what happened to the trial; Optuna's
    # warning would add its traceback.
    # So is the refusal of a late write to a trial another worker failed as stale (run_trials says it in one line).
    return not (record.exc_info and isinstance(record.exc_info[1], HpsearchError | KeyboardInterrupt
                                               | optuna.exceptions.UpdateFinishedTrialError))
