"""Crash recovery behind ``hpsearch proxy`` (issue #25, item 3): a worker on ``grpc://`` is SIGKILLed mid-trial after
an epoch and its checkpoint; the proxy fails its trial once its heartbeat (sent through the proxy) is stale and
queues the retry, which the next worker resumes from the checkpoint. As on a direct connection (test_recovery)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import ONE_CONFIG_SPACE, spawn_cli, study_text
from tests.test_services import pg_url  # noqa: F401  (fixture)

pytest.importorskip("grpc", reason="grpcio is not installed (pip install 'hpsearch[grpc]')")

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "chaos_worker.py"  # hpsearch with epochs that sleep: the kill lands mid-trial
HEARTBEAT, GRACE = 1, 3
FAST = {"HPSEARCH_HEARTBEAT_SECONDS": str(HEARTBEAT), "HPSEARCH_GRACE_SECONDS": str(GRACE)}
EPOCHS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def _worker(path: Path, url: str, cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(ROOT), "CHAOS_EPOCH_SECONDS": "1", **FAST}
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, str(WORKER), "run", str(path), "--storage", url], cwd=cwd, env=env,
                                stdout=out, stderr=subprocess.STDOUT)


def _trials(db: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name="tiny", storage=db).get_trials()
    except KeyError:  # no study yet
        return []


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=[pytest.mark.slow,
                                                                                 pytest.mark.services])])
def test_killed_worker_behind_the_proxy_is_retried_from_its_checkpoint(backend: str, tmp_path: Path, procs,
                                                                       request: pytest.FixtureRequest):
    db = "sqlite:///proxied.db" if backend == "sqlite" else request.getfixturevalue("pg_url")
    port = _free_port()
    proxy = spawn_cli("proxy", "--storage", db, "--port", str(port), cwd=tmp_path, env=FAST)
    procs.append(proxy)
    assert proxy.stdout is not None
    assert proxy.stdout.readline().startswith(f"gRPC storage proxy on grpc://127.0.0.1:{port} ")
    url = f"grpc://127.0.0.1:{port}"
    path = tmp_path / "study.toml"
    path.write_text(study_text(n_trials=1, epochs=EPOCHS, extra='pruner = "none"', space=ONE_CONFIG_SPACE))

    victim = _worker(path, url, tmp_path, tmp_path / "victim.log")
    procs.append(victim)
    deadline = time.monotonic() + 300
    while not any(t.state == TrialState.RUNNING and t.intermediate_values and "checkpoint" in t.user_attrs
                  for t in _trials(db)):
        assert victim.poll() is None and time.monotonic() < deadline, (tmp_path / "victim.log").read_text()[-3000:]
        time.sleep(0.2)
    time.sleep(0.3)  # epoch 0's checkpoint is written right after its report; epoch 1 sleeps a second first
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = time.monotonic()
    [dead] = _trials(db)
    assert dead.state == TrialState.RUNNING and 1 <= len(dead.intermediate_values) < EPOCHS

    # The proxy fails it on its own (no other worker is running): within two grace periods of the kill.
    while len(trials := _trials(db)) < 2:  # FAIL is stored first, then the retry is added
        assert time.monotonic() - killed_at <= 2 * GRACE, f"the killed trial stayed {trials[0].state.name}"
        time.sleep(0.1)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]

    survivor = _worker(path, url, tmp_path, tmp_path / "survivor.log")
    procs.append(survivor)
    assert survivor.wait(timeout=300) == 0, (tmp_path / "survivor.log").read_text()[-3000:]
    trials = _trials(db)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    retry = trials[1]
    assert retry.system_attrs["retry_history"] == [0] and retry.params == dead.params
    epochs_done = len(dead.intermediate_values)
    assert retry.user_attrs["resumed_after_epoch"] in (epochs_done - 2, epochs_done - 1)
    assert retry.user_attrs["val_accuracy"][:epochs_done] == [dead.intermediate_values[e] for e in range(epochs_done)]
    assert sorted(retry.intermediate_values) == list(range(EPOCHS))
