"""Storage: any SQLAlchemy URL. The default is an SQLite file in the working directory, set up so that a few
local processes share it (WAL journal, long busy timeout). Heartbeats fail the trials of killed workers and
enqueue a retry that resumes from the trial's last checkpoint (``HeartbeatStorage``: Optuna's RDBStorage with the
holes in that recovery closed)."""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.storages._rdb import models
from optuna.trial import TrialState

from hpsearch._errors import HpsearchError, SpecError, first_line
from hpsearch._optuna import fail_stale, quiet_experimental
from hpsearch._preflight import check_writable_sqlite
from hpsearch._secrets import redact_url, remember
from hpsearch._urls import escape_password, is_proxy_url, is_sqlite, parse_database_url, sqlite_database
from hpsearch.proxy import open_proxy

DEFAULT_STORAGE = "sqlite:///hpsearch.db"
# A worker writes a heartbeat this often while a trial runs; a RUNNING trial whose heartbeat is older than the
# grace period belongs to a dead worker. HPSEARCH_HEARTBEAT_SECONDS / HPSEARCH_GRACE_SECONDS override them.
HEARTBEAT_SECONDS = 10
GRACE_SECONDS = 60
MAX_RETRY = 2  # a trial whose worker died is retried this many times
TABLE_RACE_ATTEMPTS = 4
SQLITE_BUSY_SECONDS = 120  # writers wait for the lock instead of failing with "database is locked"


def storage_url(url: str | None) -> str:
    """The storage URL of this command (given, else $HPSEARCH_STORAGE, else the default), its password remembered
    for masking and any ``@`` in it escaped: SQLAlchemy then reads the password the user typed (hpsearch._secrets)."""
    return remember(escape_password(url or os.environ.get("HPSEARCH_STORAGE") or DEFAULT_STORAGE))


def open_storage(url: str | None, *, create: bool = True) -> optuna.storages.BaseStorage:
    """``create=False`` (the read-only commands): a missing SQLite file is an error, not a new empty database.
    A ``grpc://host:port`` URL gives a client of ``hpsearch proxy`` (see hpsearch.proxy)."""
    url = storage_url(url)
    if is_proxy_url(url):  # its workers' heartbeats go through the proxy, which fails the stale trials
        return open_proxy(url, heartbeat=heartbeat_settings()[0])
    parsed = parse_database_url(url)
    if parsed is None:
        raise SpecError(f"--storage: {redact_url(url)!r} is not an SQLAlchemy URL (e.g. sqlite:///hpsearch.db, "
                        "postgresql+psycopg://user@host/db)")
    # Read before the database is touched: a bad value is bad input (exit 2), not a failure to open it.
    heartbeat, grace = heartbeat_settings()
    # A server restart or a dropped idle connection is noticed before use, not in the middle of a trial.
    engine_kwargs: dict = {"pool_pre_ping": True, **pool_settings(parsed)}
    if is_sqlite(parsed):
        database = sqlite_database(parsed)
        if database is not None:
            if not create and not Path(database).is_file():
                raise SpecError(f"--storage: there is no SQLite database at {database!r} (run a study first, "
                                "or pass --storage / HPSEARCH_STORAGE)")
            if create:  # the commands that only read leave the file's settings (journal mode) alone
                check_writable_sqlite(Path(database))
                _prepare_sqlite(Path(database))
        engine_kwargs["connect_args"] = {"timeout": SQLITE_BUSY_SECONDS}
    for attempt in range(TABLE_RACE_ATTEMPTS):
        try:
            if not create:
                _check_schema(url, parsed, engine_kwargs)
            return _rdb_storage(url, engine_kwargs, heartbeat=heartbeat, grace=grace, create=create)
        except SpecError:
            raise
        except sqlalchemy.exc.NoSuchModuleError:
            raise SpecError(f"--storage {redact_url(url)}: {parsed.drivername!r} is not a database SQLAlchemy knows "
                            "(e.g. sqlite, postgresql+psycopg, mysql+pymysql)") from None
        except ImportError as e:
            raise HpsearchError(f"--storage {redact_url(url)}: the database driver is not installed ({e})") from None
        except Exception as e:  # connection refused, unknown database, permissions: all end the same way
            if is_sqlite(parsed) and _damaged_sqlite(e):
                raise _not_sqlite(parsed.database, e) from None
            # Workers started together on an empty database race to create Optuna's tables; the loser sees a
            # unique-key violation from the catalogue and simply opens the tables the winner made.
            if _is_integrity_error(e) and attempt + 1 < TABLE_RACE_ATTEMPTS:
                time.sleep(0.5 * (attempt + 1))
                continue
            raise HpsearchError(f"--storage {redact_url(url)}: cannot open the database ({first_line(e)})") from None
    raise AssertionError("unreachable")


def heartbeat_settings() -> tuple[int, int]:
    """(heartbeat interval, grace period) in seconds; HPSEARCH_HEARTBEAT_SECONDS / HPSEARCH_GRACE_SECONDS override."""
    return (_env_seconds("HPSEARCH_HEARTBEAT_SECONDS", HEARTBEAT_SECONDS),
            _env_seconds("HPSEARCH_GRACE_SECONDS", GRACE_SECONDS))


DB_POOL_ENV = "HPSEARCH_DB_POOL"


def pool_settings(parsed: sqlalchemy.engine.URL) -> dict:
    """Engine settings for ``HPSEARCH_DB_POOL=none``: the database URL points at a pooler in transaction mode
    (PgBouncer, ``pool_mode = transaction``), which owns the server connections. hpsearch then keeps no pool of
    its own (SQLAlchemy's NullPool: a connection to the pooler per session, closed after it) and psycopg prepares
    no statements (a prepared statement lives on one server connection; the pooler hands the next transaction to
    another). Unset: SQLAlchemy's default pool, prepared statements as the driver does them."""
    raw = os.environ.get(DB_POOL_ENV, "")
    if raw == "":
        return {}
    if raw != "none":
        raise SpecError(f"{DB_POOL_ENV}: {raw!r} must be 'none' (a pooler such as PgBouncer in front of the "
                        "database) or unset")
    settings: dict = {"poolclass": sqlalchemy.pool.NullPool}
    if parsed.get_driver_name() == "psycopg":
        settings["connect_args"] = {"prepare_threshold": None}
    return settings


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


def _rdb_storage(url: str, engine_kwargs: dict, *, heartbeat: int, grace: int,
                 create: bool) -> HeartbeatStorage:
    with quiet_experimental():  # heartbeats and the retry callback are "experimental" in Optuna 5
        storage = HeartbeatStorage(
            # Optuna fills the URL in with str.format: doubled braces reach the driver as the user's own braces
            # (a password "a{b}" would otherwise be a KeyError naming part of the password).
            url.replace("{", "{{").replace("}", "}}"),
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat,
            grace_period=grace,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=MAX_RETRY, inherit_intermediate_values=True),
            skip_table_creation=not create,
            skip_compatibility_check=_behind_pooler(engine_kwargs),
        )
    if _behind_pooler(engine_kwargs):
        _check_schema_version(storage)
    return storage


def _behind_pooler(engine_kwargs: dict) -> bool:
    return engine_kwargs.get("poolclass") is sqlalchemy.pool.NullPool  # HPSEARCH_DB_POOL=none (pool_settings)


def _check_schema_version(storage: optuna.storages.RDBStorage) -> None:
    """Optuna's schema version check without its second connection. Optuna reads version_info in a transaction
    and, still in it, the alembic revision on another connection: behind a transaction pooler with P server
    connections, P workers opening the storage at once each held one and waited for a second until the pooler's
    query_wait_timeout (measured: 16 workers on PgBouncer's 4 stopped for 120 s, then failed)."""
    versions = storage._version_manager
    if versions.get_current_version() != versions.get_head_version():
        versions.check_table_schema_compatibility()  # Optuna's own error, which names the upgrade command


OPTUNA_TABLES = ("studies", "trials", "version_info")


def _check_schema(url: str, parsed: sqlalchemy.engine.URL, engine_kwargs: dict) -> None:
    """For the commands that only read: a database without Optuna's tables (another application's, or an
    empty one) is refused before Optuna is let near it."""
    engine = sqlalchemy.create_engine(url, **engine_kwargs)
    try:
        tables = set(sqlalchemy.inspect(engine).get_table_names())
    except sqlalchemy.exc.DatabaseError as e:
        if is_sqlite(parsed) and _damaged_sqlite(e):
            raise _not_sqlite(parsed.database, e) from None
        raise
    finally:
        engine.dispose()
    missing = [t for t in OPTUNA_TABLES if t not in tables]
    if missing:
        raise SpecError(f"--storage {redact_url(url)}: not an Optuna database (no {missing[0]!r} table); "
                        "run a study first, or check the URL")


def _is_integrity_error(e: BaseException | None) -> bool:
    while e is not None:
        if isinstance(e, sqlalchemy.exc.IntegrityError) or "already exists" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _env_seconds(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise SpecError(f"{name}: {raw!r} must be a whole number of seconds >= 1")
    return int(raw)


def _prepare_sqlite(path: Path) -> None:
    """WAL lets readers run beside the one writer; it is a property of the file, so set it once here."""
    con = sqlite3.connect(path, timeout=SQLITE_BUSY_SECONDS)
    try:
        con.execute("PRAGMA journal_mode=WAL")
    except sqlite3.DatabaseError as e:
        raise _not_sqlite(str(path), e) from None
    finally:
        con.close()


def _damaged_sqlite(e: BaseException) -> bool:
    """SQLite's words for a file that is not a database, or one that is truncated or damaged."""
    return any(words in str(e) for words in ("not a database", "malformed"))


def _not_sqlite(path: str | None, e: BaseException) -> SpecError:
    """One rule for every command (exit 2): the file given is not a usable SQLite database."""
    cause = str(getattr(e, "orig", None) or e)
    return SpecError(f"--storage: {path!r} is not an SQLite database, or it is damaged ({cause})")
