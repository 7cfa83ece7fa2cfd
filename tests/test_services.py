"""Storage on real database servers (PostgreSQL, MariaDB): workers share a study; a server restart mid-run
loses no finished trial. Skipped, with the reason, where the servers are not running."""

from __future__ import annotations

import contextlib
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import spawn_cli

PG = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
OUTAGE_SECONDS = 3  # how long the restart test keeps the server down


def _pg_admin():
    psycopg = pytest.importorskip("psycopg")
    try:
        return psycopg.connect(PG, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as e:
        pytest.skip(f"PostgreSQL is not reachable at 127.0.0.1:5432 ({str(e).strip().splitlines()[0]})")


@contextlib.contextmanager
def pg_database() -> Iterator[str]:
    """The URL of a database of its own on the PostgreSQL server at 127.0.0.1:5432, dropped afterwards."""
    name = f"hpsearch_test_{uuid.uuid4().hex[:12]}"
    with _pg_admin() as con:
        con.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with _pg_admin() as con:
            con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url() -> Iterator[str]:
    with pg_database() as url:
        yield url


@pytest.mark.services
def test_workers_on_postgresql(write_study, tmp_path: Path, pg_url: str):
    path = write_study(n_trials=6, epochs=1)
    # Two runs at once on an empty database race to create the tables and the study; a third joins by name.
    runs = [spawn_cli("run", str(path), "--storage", pg_url, cwd=tmp_path) for _ in range(2)]
    storage = optuna.storages.RDBStorage(pg_url, engine_kwargs={"pool_pre_ping": True}) if _wait_for_study(pg_url) \
        else None
    assert storage is not None
    joined = spawn_cli("worker", "tiny", "--storage", pg_url, cwd=tmp_path)
    for proc in (*runs, joined):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    trials = optuna.load_study(study_name="tiny", storage=pg_url).get_trials()
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    assert 6 <= sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) <= 8


def _wait_for_study(url: str, seconds: float = 120) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if "tiny" in optuna.get_all_study_names(url):
                return True
        except Exception:  # tables not created yet
            pass
        time.sleep(0.2)
    return False


@pytest.mark.services
def test_postgresql_restart_mid_run_loses_no_finished_trial(write_study, tmp_path: Path, pg_url: str):
    if subprocess.run(["which", "pg_ctlcluster"], capture_output=True).returncode != 0:
        pytest.skip("pg_ctlcluster is not installed: cannot restart the server")
    path = write_study(n_trials=6, epochs=2, extra='pruner = "none"')
    fast = {"HPSEARCH_HEARTBEAT_SECONDS": "1", "HPSEARCH_GRACE_SECONDS": "2"}
    proc = spawn_cli("run", str(path), "--storage", pg_url, cwd=tmp_path, env=fast)
    storage = optuna.storages.RDBStorage(pg_url, engine_kwargs={"pool_pre_ping": True})
    for _ in range(600):
        try:
            done = optuna.load_study(study_name="tiny", storage=storage).get_trials(states=(TrialState.COMPLETE,))
        except KeyError:
            done = []
        if len(done) >= 2:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    finished_before = [(t.number, t.value) for t in done]
    # Stopped for a few seconds, not restarted at once: a restart can fall between two of the run's writes (the pool
    # pings its connections), and then the run never meets the outage this test is about. A trial takes well under
    # a second, so the run writes while the server is down.
    storage.engine.dispose()
    try:
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", "15", "main", "stop"], check=True, timeout=120)
        time.sleep(OUTAGE_SECONDS)
    finally:
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", "15", "main", "start"], check=True, timeout=120)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err  # the run outlived the restart
    # It noticed: the warning of the wait-and-retry loop (run_trials), with the driver's words in brackets.
    lost = [line for line in err.splitlines() if line.startswith("warning: lost the database (")]
    assert lost and all(line.endswith("; going on in 5 s") for line in lost), err
    trials = optuna.load_study(study_name="tiny", storage=pg_url).get_trials()
    kept = {t.number: t.value for t in trials}
    assert all(kept[n] == v for n, v in finished_before)  # nothing finished was lost
    assert sum(t.state == TrialState.COMPLETE for t in trials) >= 6  # and the run still finished its trials


@contextlib.contextmanager
def mariadb_database() -> Iterator[str]:
    """The URL of a database of its own on the MariaDB server at 127.0.0.1:3306, dropped afterwards."""
    pymysql = pytest.importorskip("pymysql", reason="the pymysql driver is not installed")
    try:
        con = pymysql.connect(host="127.0.0.1", port=3306, user="root", password="", connect_timeout=3,
                              autocommit=True)
    except pymysql.err.OperationalError as e:
        pytest.skip(f"MariaDB is not reachable at 127.0.0.1:3306 ({e})")
    name = f"hpsearch_test_{uuid.uuid4().hex[:12]}"
    con.cursor().execute(f"CREATE DATABASE `{name}`")
    try:
        yield f"mysql+pymysql://root@127.0.0.1:3306/{name}"
    finally:
        con.cursor().execute(f"DROP DATABASE IF EXISTS `{name}`")
        con.close()


@pytest.fixture
def mariadb_url() -> Iterator[str]:
    with mariadb_database() as url:
        yield url


@pytest.mark.services
def test_mariadb_storage(write_study, tmp_path: Path, mariadb_url: str):
    proc = spawn_cli("run", str(write_study(n_trials=2, epochs=1)), "--storage", mariadb_url, cwd=tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    trials = optuna.load_study(study_name="tiny", storage=mariadb_url).get_trials()
    assert len(trials) == 2 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
