"""Holes in heartbeat recovery (issue #25, item 2).

- A worker killed after its trial is created but before the trial's first heartbeat is written: Optuna only finds
  stale the trials that have a heartbeat row, so this one stayed RUNNING for good. Now a reaper gives such a trial a
  heartbeat row (database time), which goes stale like any other: the trial is failed and retried.
- Two workers failing the same stale trial at once on SQLite (no SELECT ... FOR UPDATE there) both saw it RUNNING
  and both queued a retry. Now only the one whose update moved it from RUNNING to FAIL queues it.
- A reaper killed between storing a stale trial's FAIL and queuing its retry (Optuna does them in two transactions)
  left the trial FAIL with no retry: its work was lost. Now both are one transaction: killed halfway, the trial
  stays RUNNING and stale, and the next reaper fails and retries it.

Run as a script (``python tests/test_heartbeat_holes.py run ...``) this file is an ``hpsearch`` worker with
chaos_worker's slow epochs; HOLES_KILL_AFTER_CREATE=1 makes it SIGKILL itself right after its first trial is
created, before Optuna's heartbeat thread records anything.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from tests.test_services import mariadb_url, pg_url  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parent.parent
HEARTBEAT, GRACE = 1, 3
ENV = {"HPSEARCH_HEARTBEAT_SECONDS": str(HEARTBEAT), "HPSEARCH_GRACE_SECONDS": str(GRACE)}


def _install_kill_after_create() -> None:
    """Optuna's ``_run_trial``: ``fail_stale_trials``, ``study.ask()`` (the trial is RUNNING in the database), then
    ``get_heartbeat_thread(...)`` whose start records the first heartbeat. Dying in between leaves no heartbeat."""
    import optuna.study._optimize as optimize

    def die(trial_id: int, storage: object) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    optimize.get_heartbeat_thread = die  # type: ignore[assignment]


def _spawn(args: list[str], cwd: Path, log: Path, **env: str) -> subprocess.Popen[bytes]:
    full = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(ROOT), **ENV, **env}
    with log.open("wb") as out:  # a file, not a pipe: nobody reads a pipe while the test polls
        return subprocess.Popen([sys.executable, __file__, *args], cwd=cwd, env=full, stdout=out,
                                stderr=subprocess.STDOUT)


def _heartbeat_rows(db: Path) -> int:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT count(*) FROM trial_heartbeats").fetchone()[0]
    finally:
        con.close()


def test_worker_killed_before_its_first_heartbeat(tmp_path: Path):
    from tests.conftest import ONE_CONFIG_SPACE, study_text

    path = tmp_path / "holes.toml"
    # Two trials: the survivor's own and the dead trial's retry. Its epochs last 3 s (chaos_worker), so its own trial
    # is still running when the dead one goes stale: the failure must not wait for the survivor's next trial.
    path.write_text(study_text("holes", epochs=2, n_trials=2, extra='pruner = "none"', space=ONE_CONFIG_SPACE))
    storage, db = "sqlite:///holes.db", tmp_path / "holes.db"
    args = ["run", str(path), "--storage", storage, "--no-artifacts"]
    victim = _spawn(args, tmp_path, tmp_path / "victim.log", HOLES_KILL_AFTER_CREATE="1")
    assert victim.wait(timeout=300) == -signal.SIGKILL, (tmp_path / "victim.log").read_text()[-3000:]
    [dead] = optuna.load_study(study_name="holes", storage=storage).get_trials()
    assert dead.state == TrialState.RUNNING
    assert _heartbeat_rows(db) == 0  # killed before its first heartbeat

    survivor = _spawn(args, tmp_path, tmp_path / "survivor.log", CHAOS_EPOCH_SECONDS="3")
    try:
        alive_at = failed_at = None
        deadline = time.monotonic() + 300
        while survivor.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
            trials = optuna.load_study(study_name="holes", storage=storage).get_trials()
            if alive_at is None and len(trials) > 1:
                alive_at = time.monotonic()  # the survivor works on the study: from here, two grace periods
            retried = [t for t in trials if 0 in t.system_attrs.get("retry_history", [])]
            if trials[0].state == TrialState.FAIL and retried:
                failed_at = time.monotonic()
                break
        log = (tmp_path / "survivor.log").read_text()[-3000:]
        assert alive_at is not None and failed_at is not None, f"the dead trial stayed RUNNING\n{log}"
        print(f"failed and retried {failed_at - alive_at:.1f} s after the survivor's trial began")
        assert failed_at - alive_at <= 2 * GRACE, (failed_at - alive_at, log)
        assert survivor.wait(timeout=300) == 0, (tmp_path / "survivor.log").read_text()[-3000:]
    finally:
        if survivor.poll() is None:
            survivor.kill()
            survivor.wait()
    trials = optuna.load_study(study_name="holes", storage=storage).get_trials()
    states = [(t.number, t.state.name, t.system_attrs.get("retry_history")) for t in trials]
    assert trials[0].state == TrialState.FAIL, states
    retries = [t for t in trials if 0 in t.system_attrs.get("retry_history", [])]
    assert len(retries) == 1, states
    assert retries[0].state == TrialState.COMPLETE, states  # (the dead trial died before sampling: no params)
    assert not [t for t in trials if t.state == TrialState.RUNNING], states


ROUNDS = 30


def _reaper(url: str, barrier: Any) -> None:
    """One of two processes that fail the same stale trial at the same moment, ROUNDS times."""
    import warnings

    warnings.simplefilter("ignore")
    from hpsearch._optuna import fail_stale
    from hpsearch.storage import open_storage

    study = optuna.load_study(study_name="race", storage=open_storage(url))
    for _ in range(ROUNDS):
        barrier.wait(timeout=120)  # a new stale trial is there
        fail_stale(study)
        barrier.wait(timeout=120)  # both are done


def test_two_reapers_on_sqlite_queue_one_retry(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'race.db'}"
    from hpsearch.storage import open_storage

    storage = open_storage(url)
    study = optuna.create_study(study_name="race", storage=storage)
    engine = storage.engine  # type: ignore[attr-defined]
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_reaper, args=(url, barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    doubles = []
    try:
        for i in range(ROUNDS):
            trial = study.ask()  # RUNNING, with a heartbeat an hour old: stale
            storage.record_heartbeat(trial._trial_id)
            with engine.begin() as con:
                con.exec_driver_sql("UPDATE trial_heartbeats SET heartbeat = datetime('now', '-1 hour') "
                                    "WHERE trial_id = ?", (trial._trial_id,))
            barrier.wait(timeout=120)
            barrier.wait(timeout=120)
            trials = study.get_trials()
            assert trials[trial.number].state == TrialState.FAIL
            retries = [t for t in trials if t.system_attrs.get("failed_trial") == trial.number]
            assert retries, f"round {i}: no retry"
            if len(retries) > 1:
                doubles.append(i)
            for t in retries:  # out of the way: the next round's ask() must create a fresh trial
                storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs)
    assert doubles == [], f"{len(doubles)} of {ROUNDS} rounds queued two retries of one stale trial"


def _reaper_killed_while_retrying(url: str) -> None:
    """Looks for stale trials and is SIGKILLed when it writes the retry of the one it found."""
    import warnings

    warnings.simplefilter("ignore")
    from hpsearch._optuna import fail_stale
    from hpsearch.storage import open_storage

    def die(*args: object, **kwargs: object) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    optuna.storages.RDBStorage._get_prepared_new_trial = die  # type: ignore[method-assign]
    fail_stale(optuna.load_study(study_name="killed", storage=open_storage(url)))


def _reaper_killed_halfway(url: str) -> None:
    from hpsearch._optuna import fail_stale
    from hpsearch.storage import open_storage

    storage = open_storage(url)
    study = optuna.create_study(study_name="killed", storage=storage, direction="maximize")
    trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-3, 1.0)})
    for epoch, accuracy in enumerate([0.5, 0.6]):
        trial.report(accuracy, epoch)
    storage.record_heartbeat(trial._trial_id)
    beats = sqlalchemy.Table("trial_heartbeats", sqlalchemy.MetaData(), autoload_with=storage.engine)  # type: ignore[attr-defined]
    with storage.engine.begin() as con:  # type: ignore[attr-defined]
        con.execute(sqlalchemy.update(beats).values(heartbeat=datetime.datetime(2000, 1, 1)))  # stale for years

    reaper = multiprocessing.get_context("spawn").Process(target=_reaper_killed_while_retrying, args=(url,))
    reaper.start()
    reaper.join(timeout=120)
    assert reaper.exitcode == -signal.SIGKILL
    [dead] = study.get_trials()
    assert dead.state == TrialState.RUNNING  # the reaper's FAIL died with it: still stale, not lost

    fail_stale(study)  # the next look, by any process
    dead, retry = study.get_trials()
    assert dead.state == TrialState.FAIL
    assert (retry.state, retry.system_attrs["retry_history"], retry.params) == (TrialState.WAITING, [0], dead.params)
    assert retry.intermediate_values == {0: 0.5, 1: 0.6}
    fail_stale(study)
    assert len(study.get_trials()) == 2  # retried once


def test_a_reaper_killed_halfway_loses_no_trial_on_sqlite(tmp_path: Path):
    _reaper_killed_halfway(f"sqlite:///{tmp_path / 'killed.db'}")


@pytest.mark.services
def test_a_reaper_killed_halfway_loses_no_trial_on_postgresql(pg_url: str):  # noqa: F811
    _reaper_killed_halfway(pg_url)


@pytest.mark.services
def test_a_reaper_killed_halfway_loses_no_trial_on_mariadb(mariadb_url: str):  # noqa: F811
    _reaper_killed_halfway(mariadb_url)


if __name__ == "__main__":
    from tests.chaos_worker import install

    install()
    if os.environ.get("HOLES_KILL_AFTER_CREATE") == "1":
        _install_kill_after_create()
    from hpsearch.cli import main

    sys.argv = ["hpsearch", *sys.argv[1:]]
    main()
