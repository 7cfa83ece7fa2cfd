"""Connections at scale (issue #25): workers behind PgBouncer in transaction pooling mode, with hpsearch's
HPSEARCH_DB_POOL=none (no client pool, no prepared statements), finish every trial on a handful of server
connections. The benchmark behind the figures is benchmarks/bench_storage.py; this is its short variant. Skipped,
saying why, where PostgreSQL (127.0.0.1:5432) or the pgbouncer executable is missing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import sqlalchemy
from sqlalchemy.engine import make_url

from hpsearch._errors import SpecError
from hpsearch.storage import DB_POOL_ENV, pool_settings

POOL = 4
WORKERS = 16
TRIALS = 5  # per worker


def test_pool_settings_default(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(DB_POOL_ENV, raising=False)
    assert pool_settings(make_url("postgresql+psycopg://u@h/db")) == {}


def test_pool_settings_none(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(DB_POOL_ENV, "none")
    assert pool_settings(make_url("postgresql+psycopg://u@h:6432/db")) == {
        "poolclass": sqlalchemy.pool.NullPool, "connect_args": {"prepare_threshold": None}}
    # Other drivers prepare nothing behind the user's back: only the pool goes.
    assert pool_settings(make_url("postgresql+psycopg2://u@h/db")) == {"poolclass": sqlalchemy.pool.NullPool}


def test_pool_settings_bad_value(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    from hpsearch.storage import open_storage

    monkeypatch.setenv(DB_POOL_ENV, "off")
    with pytest.raises(SpecError, match="HPSEARCH_DB_POOL"):
        open_storage(f"sqlite:///{tmp_path}/x.db")
    assert not (tmp_path / "x.db").exists()  # refused before the database was touched


def test_pool_none_still_refuses_an_old_schema(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Behind a pooler Optuna's schema check is replaced by one that needs a single connection; a database
    stamped by an older Optuna is still refused, with Optuna's advice to upgrade it."""
    from hpsearch._errors import HpsearchError
    from hpsearch.storage import open_storage

    url = f"sqlite:///{tmp_path}/old.db"
    open_storage(url)
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as con:
        con.execute(sqlalchemy.text("UPDATE alembic_version SET version_num = 'v3.0.0.a'"))
    engine.dispose()
    monkeypatch.setenv(DB_POOL_ENV, "none")
    with pytest.raises(HpsearchError, match="optuna storage upgrade"):
        open_storage(url)
    monkeypatch.delenv(DB_POOL_ENV)
    with pytest.raises(HpsearchError, match="optuna storage upgrade"):  # the same answer as without the pooler
        open_storage(url)


def _pgbouncer_or_skip() -> None:
    if not (shutil.which("pgbouncer") or Path("/usr/sbin/pgbouncer").exists()):
        pytest.skip("pgbouncer is not installed (Debian: apt-get install pgbouncer; .ci/run installs it)")


def _postgres_or_skip() -> None:
    psycopg = pytest.importorskip("psycopg")
    from benchmarks.bench_storage import ADMIN

    try:
        psycopg.connect(ADMIN, autocommit=True, connect_timeout=3).close()
    except psycopg.OperationalError as e:
        pytest.skip(f"PostgreSQL is not reachable at 127.0.0.1:5432 ({str(e).strip().splitlines()[0]})")


@pytest.mark.services
def test_workers_behind_pgbouncer():
    """16 workers, 5 trials each, through PgBouncer with 4 server connections: every trial completes, no storage
    call fails, and the server never sees more than PgBouncer's 4 connections for the study's database. 16 workers
    opening the storage at once on 4 server connections is also the case that deadlocked Optuna's schema check
    (hpsearch.storage._check_schema_version)."""
    _pgbouncer_or_skip()
    _postgres_or_skip()
    from benchmarks.bench_storage import measure, pgbouncer, postgres_databases

    # The database's own limit is well above the pool: a breach would show as a count, not as refusals.
    with postgres_databases(["pooling"], connection_limit=3 * POOL) as (role, dbs):
        db = dbs["pooling"]
        # A worker that waits 20 s for a server connection fails: a deadlock shows as errors, not as a hang.
        with pgbouncer(POOL, [role], query_wait_timeout=20) as port:
            row = measure(f"postgresql+psycopg://{role}@127.0.0.1:{port}/{db}", WORKERS, n_trials=TRIALS,
                          create_url=f"postgresql+psycopg://{role}@127.0.0.1:5432/{db}", dbname=db,
                          env={DB_POOL_ENV: "none"})
    assert row.result.errors == 0, row.result.first_error
    assert row.result.told == WORKERS * TRIALS
    assert row.complete == WORKERS * TRIALS
    assert row.connections is not None and 1 <= row.connections <= POOL, row.connections
