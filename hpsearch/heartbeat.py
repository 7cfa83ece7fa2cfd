"""Heartbeat recovery: ``HeartbeatStorage``, Optuna's RDBStorage with the holes in its recovery of dead workers'
trials closed (see the class), and how often stale trials are looked for. ``storage.open_storage`` builds it."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import optuna
import sqlalchemy
from optuna.storages._rdb import models
from optuna.trial import TrialState

from hpsearch._errors import first_line
from hpsearch._optuna import fail_stale


def reap_seconds(heartbeat: int, grace: int) -> int:
    """How often stale trials are looked for while trials run (by each worker's heartbeat thread, and by
    ``hpsearch proxy``). A quarter of the grace period (a heartbeat at least): a dead worker's trial is failed
    within two grace periods of its death, even one killed before its first heartbeat (``HeartbeatStorage``)."""
    return max(heartbeat, grace // 4)


class HeartbeatStorage(optuna.storages.RDBStorage):
    """Optuna's RDBStorage with three holes in its heartbeat recovery closed:

    - A trial whose worker died before its first heartbeat has no heartbeat row, and Optuna finds stale only the
      trials that have one: it stayed RUNNING for good. Looking for stale trials now first gives such a trial a
      heartbeat row, dated now by the database's clock (the clock of every heartbeat; a worker's clock would
      differ). A live worker overwrites it within a heartbeat; a dead one's goes stale a grace period later.
    - Two processes failing the same stale trial at once could both succeed and both queue a retry (SQLite has
      no ``SELECT ... FOR UPDATE``): a change of state now first claims the trial with an ``UPDATE ... WHERE
      state = <the state it changes from>``, which the database serialises, and only the claimant changes it.
    - Optuna stores a stale trial's FAIL and queues its retry in two transactions: a reaper that died between them
      (a killed worker's heartbeat thread, a database restart) left the trial FAIL with no retry, its work lost.
      A stale trial's FAIL and its retry are now one transaction (``_fail_and_retry``), and so are those of a trial
      SIGTERM ended (``retry_with_fail``).
    - Stale trials were only looked for when a worker started its next trial. Each worker's heartbeat thread now
      also does it every ``reap_seconds`` (``reap_while_beating``; ``hpsearch proxy`` has its own reaper instead).
    """

    reap_while_beating = True

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._studies: dict[int, optuna.Study] = {}  # study id -> the study, for the heartbeat thread's look
        self._trial_study: dict[int, int] = {}  # trial id -> study id
        self._last_look: dict[int, float] = {}  # study id -> time.monotonic() of the last look for stale trials
        self._retry_with_fail: set[int] = set()  # trials whose coming FAIL queues their retry (``retry_with_fail``)

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        # Caches, and Study objects, do not travel.
        state.update(_studies={}, _trial_study={}, _last_look={}, _retry_with_fail=set())
        return state

    @property
    def reap_seconds(self) -> int:
        assert self.heartbeat_interval is not None
        return reap_seconds(self.heartbeat_interval, self.grace_period or 2 * self.heartbeat_interval)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        if state == TrialState.FAIL and trial_id in self._retry_with_fail:
            self._retry_with_fail.discard(trial_id)
            if self._fail_and_retry(trial_id):
                return True
            # Not RUNNING any more (failed as stale by another process): Optuna's own answer, below.
        if state == TrialState.RUNNING:
            before: tuple[TrialState, ...] = (TrialState.WAITING,)
        elif state.is_finished():
            before = (TrialState.RUNNING, TrialState.WAITING)
        else:
            return super().set_trial_state_values(trial_id, state, values)
        # Optuna's own update runs in the claim's transaction, so no other process can change the trial between
        # the two; not claimed (finished already, taken by another worker, or no such trial), it runs alone and
        # gives Optuna's own answer for each (UpdateFinishedTrialError, False, KeyError).
        self._claim(trial_id, before)
        return super().set_trial_state_values(trial_id, state, values)

    def _claim(self, trial_id: int, before: tuple[TrialState, ...]) -> bool:
        """Begins a transaction in this thread's session (Optuna's next call on this storage ends it) with a write
        that changes nothing: it takes the trial's lock (the database's, on SQLite) and says whether the trial is
        still in one of the states ``before``. Not claimed, the transaction is ended here."""
        trials = models.TrialModel.__table__
        session = self.scoped_session()
        try:
            claim = session.execute(
                sqlalchemy.update(trials)
                .where(trials.c.trial_id == trial_id, trials.c.state.in_(before))
                .values(state=trials.c.state))
            claimed = claim.rowcount == 1  # type: ignore[attr-defined]
        except sqlalchemy.exc.SQLAlchemyError as e:
            session.rollback()
            session.close()
            raise optuna.exceptions.StorageInternalError(f"cannot update trial {trial_id}: {first_line(e)}") from e
        if not claimed:
            session.rollback()
            session.close()
        return claimed

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        """Optuna's ``fail_stale_trials`` (before each trial, and hpsearch's ``fail_stale``) asks this for the
        stale trials, then fails each and queues its retry in two transactions. Each is failed here instead, with
        its retry (``_fail_and_retry``), and none is left for Optuna to fail."""
        self._date_heartbeatless(study_id)
        for trial_id in super()._get_stale_trial_ids(study_id):
            self._fail_and_retry(trial_id)
        return []

    def retry_with_fail(self, trial_id: int) -> None:
        """The trial's coming FAIL (Optuna's, for the trial SIGTERM ended) also queues its retry, in the same
        transaction: a SIGKILL right after the SIGTERM cannot leave it FAIL without one."""
        self._retry_with_fail.add(trial_id)

    def _fail_and_retry(self, trial_id: int) -> bool:
        """Marks a RUNNING trial FAIL and queues its retry in one transaction: a process killed halfway (or a
        database that goes away) leaves the trial RUNNING, hence stale, and the next look fails and retries it.
        Only the process that claims the trial while it is RUNNING does it, so the retry is queued once. False:
        not claimed (finished, or failed by another process)."""
        retry = self._retry_of(self.get_trial(trial_id))  # read first: Optuna's reads end the transaction
        study_id = self._study_of(trial_id)
        if not self._claim(trial_id, (TrialState.RUNNING,)):
            return False
        session = self.scoped_session()
        try:
            if retry is not None:
                # Optuna's create_new_trial, without its commit: the study's lock numbers the trial (Optuna 5.1).
                models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
                self._get_prepared_new_trial(study_id, retry, session)
        except sqlalchemy.exc.SQLAlchemyError as e:
            session.rollback()
            session.close()
            raise optuna.exceptions.StorageInternalError(f"cannot retry trial {trial_id}: {first_line(e)}") from e
        return optuna.storages.RDBStorage.set_trial_state_values(self, trial_id, TrialState.FAIL)  # commits both

    def _study_of(self, trial_id: int) -> int:
        study_id = self._trial_study.get(trial_id)
        if study_id is None:
            trials = models.TrialModel.__table__
            with self.engine.connect() as con:
                study_id = con.execute(sqlalchemy.select(trials.c.study_id)
                                       .where(trials.c.trial_id == trial_id)).scalar_one()
            self._trial_study[trial_id] = study_id
        return study_id

    def _retry_of(self, trial: optuna.trial.FrozenTrial) -> optuna.trial.FrozenTrial | None:
        """The retry Optuna's stale-trial callback would queue (same system attrs, inherited intermediate values),
        or None: no callback, or the trial's retries are used up."""
        callback = self.get_heartbeat_stale_trial_callback()
        if callback is None:
            return None
        kept = _KeptTrial()
        callback(kept, trial)  # type: ignore[arg-type]  # the callback only calls add_trial on its study
        return kept.trial

    def _date_heartbeatless(self, study_id: int) -> None:
        """Gives each RUNNING trial of the study that has no heartbeat row one, dated now by the database."""
        trials, beats = models.TrialModel.__table__, models.TrialHeartbeatModel.__table__
        with self.engine.connect() as con:
            orphans = con.execute(
                sqlalchemy.select(trials.c.trial_id).where(
                    trials.c.study_id == study_id, trials.c.state == TrialState.RUNNING,
                    ~sqlalchemy.exists().where(beats.c.trial_id == trials.c.trial_id))).scalars().all()
        for trial_id in orphans:
            try:
                with self.engine.begin() as con:
                    con.execute(sqlalchemy.insert(beats).values(trial_id=trial_id))  # heartbeat: the database's now
            except sqlalchemy.exc.IntegrityError:
                pass  # its worker (or another process) has just written one

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            super().record_heartbeat(trial_id)
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:
            # A server restart or a network cut: the heartbeat thread must outlive it (Optuna's ends at the first
            # error, and a live trial would then be failed as stale a grace period later). The next beat retries.
            _logger.debug("heartbeat of trial %d not written: %s", trial_id, first_line(e))
            return
        if self.reap_while_beating:
            try:
                self._look_for_stale(trial_id)
            except Exception as e:  # never end the heartbeat thread: the next look may succeed
                _logger.debug("looking for stale trials failed: %s", first_line(e))

    def _look_for_stale(self, trial_id: int) -> None:
        study_id = self._study_of(trial_id)
        now = time.monotonic()
        if now - self._last_look.get(study_id, -float("inf")) < self.reap_seconds:
            return
        self._last_look[study_id] = now
        study = self._studies.get(study_id)
        if study is None:
            study = self._studies[study_id] = optuna.load_study(
                study_name=self.get_study_name_from_id(study_id), storage=self)
        fail_stale(study)


def queue_retry_with_fail(storage: optuna.storages.BaseStorage, trial_id: int) -> None:
    """The trial's coming FAIL queues its retry in the same transaction, where the storage is hpsearch's
    (``HeartbeatStorage.retry_with_fail``); behind the gRPC proxy ``signals.retry_terminated`` queues it afterwards."""
    backend = getattr(storage, "_backend", storage)  # Optuna wraps an RDBStorage in its _CachedStorage
    if isinstance(backend, HeartbeatStorage):
        backend.retry_with_fail(trial_id)


class _KeptTrial:
    """Stands in for the study given to Optuna's stale-trial callback: keeps the trial it adds, adds nothing."""

    trial: optuna.trial.FrozenTrial | None = None

    def add_trial(self, trial: optuna.trial.FrozenTrial) -> None:
        self.trial = trial


_logger = logging.getLogger(__name__)
