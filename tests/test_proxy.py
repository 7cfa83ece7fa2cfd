"""``hpsearch proxy`` (Optuna's gRPC storage proxy) and ``--storage grpc://host:port``."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hpsearch import proxy as grpc_proxy
from tests.conftest import spawn_cli
from tests.test_services import pg_url  # noqa: F401  (fixture)

pytest.importorskip("grpc", reason="grpcio is not installed (pip install 'hpsearch[grpc]')")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_proxy(storage: str, cwd: Path) -> tuple[subprocess.Popen[str], str]:
    """An ``hpsearch proxy`` process on a free loopback port, once it says it listens; and its grpc:// URL."""
    port = free_port()
    proc = spawn_cli("proxy", "--storage", storage, "--port", str(port), cwd=cwd)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith(f"gRPC storage proxy on grpc://127.0.0.1:{port} "), (line, proc.communicate())
    return proc, f"grpc://127.0.0.1:{port}"


@pytest.fixture
def stop() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        proc.kill()
        proc.communicate()


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def test_run_through_the_proxy(backend: str, write_study, tmp_path: Path, stop, request: pytest.FixtureRequest):
    db = "sqlite:///proxied.db" if backend == "sqlite" else request.getfixturevalue("pg_url")
    proxy, url = start_proxy(db, tmp_path)
    stop.append(proxy)
    run = spawn_cli("run", str(write_study(n_trials=3, epochs=1)), "--storage", url, cwd=tmp_path)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    assert "heartbeat" not in err  # behind the proxy trials have heartbeats too: nothing to warn about
    # The trials are in the database behind the proxy, and the proxy serves the read-only commands too.
    trials = optuna.load_study(study_name="tiny", storage=db).get_trials()
    assert len(trials) == 3 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    studies = spawn_cli("studies", "--storage", url, cwd=tmp_path)
    out, err = studies.communicate(timeout=60)
    assert studies.returncode == 0, err
    assert "tiny" in out and "heartbeat" not in err


@pytest.mark.slow  # three processes: ~60 s on a loaded 2-core machine
def test_workers_through_the_proxy(write_study, tmp_path: Path, stop):
    proxy, url = start_proxy("sqlite:///proxied.db", tmp_path)
    stop.append(proxy)
    run = spawn_cli("run", str(write_study(n_trials=4, epochs=1)), "--storage", url, "--workers", "2",
                    cwd=tmp_path)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, (out, err)
    assert "no heartbeats" not in out + err
    trials = optuna.load_study(study_name="tiny", storage="sqlite:///proxied.db").get_trials()
    assert 4 <= sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) <= 5


@pytest.mark.parametrize(("url", "message"), [
    ("grpc://127.0.0.1", "error: --storage: 'grpc://127.0.0.1' must be grpc://HOST:PORT with a port from 1 to 65535 "
                         "(e.g. grpc://127.0.0.1:13000)"),
    ("grpc://127.0.0.1:0", "error: --storage: 'grpc://127.0.0.1:0' must be grpc://HOST:PORT with a port from 1 to "
                           "65535 (e.g. grpc://127.0.0.1:13000)"),
    ("grpc://user:s3cretPW@127.0.0.1:13000", "error: --storage: a grpc:// URL holds only a host and a port; must be "
                                             "grpc://HOST:PORT with a port from 1 to 65535 (e.g. grpc://127.0.0.1:13000)"),
])
def test_bad_grpc_url(run_cli, url: str, message: str):
    r = run_cli("studies", "--storage", url)
    assert r.code == 2
    assert r.err.strip() == message


def test_no_proxy_listening(run_cli, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(grpc_proxy, "CONNECT_SECONDS", 0.5)
    url = f"grpc://127.0.0.1:{free_port()}"
    r = run_cli("studies", "--storage", url)
    assert r.code == 1
    assert r.err.strip() == (f"error: --storage {url}: no gRPC proxy answered within 0.5 s (start one with "
                             "`hpsearch proxy --storage DATABASE_URL`)")


def test_proxy_refuses_a_taken_port_and_a_proxy_url(run_cli):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run_cli("proxy", "--storage", "sqlite:///p.db", "--port", str(port))
    assert r.code == 1
    assert r.err.strip() == f"error: --port {port}: cannot listen on 127.0.0.1:{port} (Address already in use)"
    assert r.out == ""
    r = run_cli("proxy", "--storage", "grpc://127.0.0.1:13000")
    assert r.code == 2
    assert r.err.strip() == ("error: --storage: 'grpc://127.0.0.1:13000' is a proxy; hpsearch proxy needs the "
                             "database URL itself (e.g. postgresql+psycopg://user@host/db)")


def test_a_lost_proxy_is_a_storage_outage():
    import grpc

    from hpsearch._db_errors import lost_database

    # A run waits for the proxy to come back, as it does for the database itself (study.run_trials).
    assert lost_database(grpc.RpcError())
    assert not lost_database(ValueError("not a storage error"))
