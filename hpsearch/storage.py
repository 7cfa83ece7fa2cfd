"""Storage: any SQLAlchemy URL. The default is an SQLite file in the working directory, set up so that a few
local processes share it (WAL journal, long busy timeout). Heartbeats fail the trials of killed workers and
enqueue a retry that resumes from the trial's last checkpoint (``heartbeat.HeartbeatStorage``: Optuna's RDBStorage
with the holes in that recovery closed)."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import optuna
import sqlalchemy

from hpsearch._errors import HpsearchError, SpecError, first_line
from hpsearch._optuna import quiet_experimental
from hpsearch._preflight import check_writable_sqlite
from hpsearch._secrets import redact_url, remember
from hpsearch._urls import escape_password, is_proxy_url, is_sqlite, parse_database_url, sqlite_database
from hpsearch.heartbeat import HeartbeatStorage
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
    """WAL lets readers run beside the one writer; it is a property of the file, so set it once here (only when not
    set yet: changing it waits for no busy timeout, and a worker starting beside writing ones read "locked")."""
    con = sqlite3.connect(path, timeout=SQLITE_BUSY_SECONDS)
    try:
        if con.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
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
