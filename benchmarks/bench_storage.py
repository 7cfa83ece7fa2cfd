"""Storage throughput and connections: trials/s, p95 latency of ask and tell, PostgreSQL server connections and
errors for a trivial objective run by N worker processes on SQLite, PostgreSQL directly, PostgreSQL behind
PgBouncer (transaction pooling, started here) and PostgreSQL behind `hpsearch proxy` (started here).

Each worker opens the storage the way `hpsearch run` does (hpsearch.storage.open_storage: heartbeats, retry
callback, pre-ping) and runs `study.optimize` on one shared study for --seconds; trials/s is the study's
finished trials over that window. ask is `study.ask()`, tell is Optuna's tell of the finished trial, each timed in
every worker. Connections are sampled from pg_stat_activity (client backends of the row's database) while the
workers run. A failed storage call counts as an error; its worker opens the storage again a second later.

The PostgreSQL rows connect as a throwaway role to throwaway databases limited to --db-connection-limit
connections each (CONNECTION LIMIT), a stand-in for the server's max_connections that leaves the other users of a
shared server their slots. PgBouncer (Debian package `pgbouncer`) listens on a free port with --pool-size server
connections at most; its workers set HPSEARCH_DB_POOL=none (no client pool, no prepared statements).

    .venv/bin/python benchmarks/bench_storage.py --workers 8 32 64 --seconds 10        # ~4 minutes
    .venv/bin/python benchmarks/bench_storage.py --workers 1 2 4 8 --backends sqlite postgresql proxy --seconds 8
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import queue
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.study import _optimize

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hpsearch.storage import DB_POOL_ENV, open_storage  # noqa: E402

ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
BACKENDS = ("sqlite", "postgresql", "pgbouncer", "proxy")
RETRY_SECONDS = 1.0  # a worker whose storage call failed opens the storage again after this long
N_TRIALS_SECONDS = 120  # a worker given a number of trials gives up after this long


@dataclass
class Result:
    """One worker's (or, summed, one row's) figures."""

    ask: list[float] = field(default_factory=list)  # seconds per call
    tell: list[float] = field(default_factory=list)
    errors: int = 0  # failed storage calls (opening the storage included), heartbeat threads' failures too
    failed_workers: int = 0
    first_error: str = ""
    told: int = 0  # trials this worker finished (tell returned)

    def add(self, other: Result) -> None:
        self.ask += other.ask
        self.tell += other.tell
        self.errors += other.errors
        self.failed_workers += other.failed_workers
        self.first_error = self.first_error or other.first_error
        self.told += other.told


@dataclass
class Row:
    backend: str
    workers: int
    trials_per_s: float
    complete: int
    ask_p95_ms: float
    tell_p95_ms: float
    connections: int | None  # most server connections seen; None where there is no PostgreSQL
    result: Result

    def markdown(self) -> str:
        conns = "-" if self.connections is None else str(self.connections)
        errors = f"{self.result.errors} ({self.result.failed_workers} workers)" if self.result.errors else "0"
        return (f"| {self.backend} | {self.workers} | {self.trials_per_s:.1f} | {self.ask_p95_ms:.0f} | "
                f"{self.tell_p95_ms:.0f} | {conns} | {errors} |")


HEADER = ("| storage | workers | trials/s | ask p95 ms | tell p95 ms | server connections (max) | errors |\n"
          "|---|---|---|---|---|---|---|")


def _timed(fn: Callable[..., Any], into: list[float]) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        began = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - began)

    return timed


def _worker(url: str, study_name: str, seconds: float | None, n_trials: int | None, env: dict[str, str],
            ready: Any, start: Any, out: Any) -> None:
    """Opens the storage, says it is ready, waits for the start, then runs trials until the window ends (or its
    n_trials are finished); reports its Result."""
    warnings.simplefilter("ignore")
    optuna.logging.set_verbosity(optuna.logging.CRITICAL)
    os.environ.update(env)
    res = Result()
    lock = threading.Lock()

    def failed(e: BaseException) -> None:
        with lock:
            res.errors += 1
            res.first_error = res.first_error or f"{type(e).__name__}: {str(e).strip().splitlines()[0][:400]}"

    def thread_failed(args: threading.ExceptHookArgs) -> None:  # a heartbeat thread's storage call
        if args.exc_value is not None:
            failed(args.exc_value)

    threading.excepthook = thread_failed
    tell = _optimize._tell_with_warning
    timed_tell = _timed(tell, res.tell)

    def counted_tell(*args: Any, **kwargs: Any) -> Any:
        answer = timed_tell(*args, **kwargs)
        res.told += 1
        return answer

    _optimize._tell_with_warning = counted_tell

    def open_study() -> optuna.Study | None:
        try:
            study = optuna.load_study(study_name=study_name, storage=open_storage(url),
                                      sampler=optuna.samplers.RandomSampler())
        except Exception as e:
            failed(e)
            return None
        study.ask = _timed(study.ask, res.ask)  # type: ignore[method-assign]
        return study

    study = open_study()
    ready.put(os.getpid())
    start.wait()
    end = time.monotonic() + (seconds if seconds is not None else N_TRIALS_SECONDS)
    while time.monotonic() < end and (n_trials is None or res.told < n_trials):
        if study is None:
            time.sleep(RETRY_SECONDS)
            study = open_study()
            continue
        try:
            study.optimize(lambda t: t.suggest_float("x", 0, 1), timeout=max(end - time.monotonic(), 0.001),
                           n_trials=None if n_trials is None else n_trials - res.told)
        except Exception as e:
            failed(e)
            with contextlib.suppress(Exception):
                _close(study._storage)
            study = None
    if study is not None:
        with contextlib.suppress(Exception):
            _close(study._storage)
    res.failed_workers = int(res.errors > 0)
    out.put(res)


def server_connections(dbname: str) -> int:
    """Client connections to database ``dbname`` on the PostgreSQL server now."""
    import psycopg

    with psycopg.connect(ADMIN, autocommit=True) as con:
        row = con.execute("SELECT count(*) FROM pg_stat_activity "
                          "WHERE datname = %s AND backend_type = 'client backend'", (dbname,)).fetchone()
        return int(row[0]) if row else 0


def measure(url: str, workers: int, *, seconds: float | None = None, n_trials: int | None = None,
            create_url: str | None = None, dbname: str | None = None, env: dict[str, str] | None = None,
            backend: str = "") -> Row:
    """``workers`` processes on one new study at ``url`` (created through ``create_url``, default ``url``), each
    for ``seconds`` or ``n_trials`` trials. ``dbname``: the PostgreSQL database whose connections are counted."""
    study_name = f"bench-{uuid.uuid4().hex[:8]}"
    storage = open_storage(create_url or url)
    optuna.create_study(study_name=study_name, storage=storage)
    _close(storage)  # this process holds no connection while the workers are counted
    ctx = mp.get_context("fork")
    ready, start, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(url, study_name, seconds, n_trials, env or {}, ready, start, out))
             for _ in range(workers)]
    for p in procs:
        p.start()
    try:
        return _run(procs, ready, start, out, workers=workers, seconds=seconds, dbname=dbname, backend=backend,
                    study_name=study_name, create_url=create_url or url)
    finally:
        for p in procs:  # a worker still running here is stuck: the row has failed already
            if p.is_alive():
                p.kill()
            p.join()


def _run(procs: list[Any], ready: Any, start: Any, out: Any, *, workers: int, seconds: float | None,
         dbname: str | None, backend: str, study_name: str, create_url: str) -> Row:
    wait = 60 + 2 * workers
    try:
        for _ in procs:  # every worker has opened its storage (or failed to): the window measures trials only
            ready.get(timeout=wait)
    except queue.Empty:
        raise RuntimeError(f"{backend} x {workers}: the workers did not open the storage within {wait} s") from None
    most = None
    stop = threading.Event()

    def sample() -> None:
        nonlocal most
        while not stop.is_set():
            assert dbname is not None
            most = max(most or 0, server_connections(dbname))
            stop.wait(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    if dbname is not None:
        sampler.start()
    start.set()
    began = time.monotonic()
    total = Result()
    limit = (seconds or N_TRIALS_SECONDS) + 60 + 2 * workers
    try:
        for _ in procs:
            total.add(out.get(timeout=max(limit - (time.monotonic() - began), 1)))
    except queue.Empty:
        raise RuntimeError(f"{backend} x {workers}: the workers did not finish within {limit} s") from None
    finally:
        elapsed = time.monotonic() - began
        stop.set()
    if dbname is not None:
        sampler.join()
    for p in procs:
        p.join(timeout=30)
        if p.exitcode != 0:
            raise RuntimeError(f"{backend} x {workers}: a worker failed (exit {p.exitcode})")
    storage = open_storage(create_url)
    complete = len(optuna.load_study(study_name=study_name, storage=storage).get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    _close(storage)
    return Row(backend=backend, workers=workers, trials_per_s=complete / elapsed, complete=complete,
               ask_p95_ms=_p95(total.ask) * 1000, tell_p95_ms=_p95(total.tell) * 1000, connections=most,
               result=total)


def _p95(values: list[float]) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=20)[18]


def _close(storage: optuna.storages.BaseStorage) -> None:
    if isinstance(storage, optuna.storages.RDBStorage):
        storage.remove_session()
        storage.engine.dispose()
    elif isinstance(storage, optuna.storages.GrpcStorageProxy):
        storage.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def pgbouncer(pool_size: int, users: list[str], *, server_port: int = 5432, max_clients: int = 1000,
              query_wait_timeout: int = 120) -> Iterator[int]:
    """PgBouncer in transaction pooling mode in front of 127.0.0.1:``server_port`` (trust auth there too), at most
    ``pool_size`` server connections per database, ``users`` let in without a password; yields its port. Stops it
    on exit. ``query_wait_timeout``: a client waiting longer for a server connection gets an error (PgBouncer's
    default, 120 s). Needs the ``pgbouncer`` executable (Debian package pgbouncer)."""
    exe = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None)
    if exe is None:
        raise FileNotFoundError("pgbouncer is not installed (apt-get install pgbouncer)")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="hpsearch-pgbouncer-") as tmp:
        folder = Path(tmp)
        auth_file = folder / "users.txt"
        auth_file.write_text("".join(f'"{user}" ""\n' for user in users))  # trust: a listed user needs no password
        config = folder / "pgbouncer.ini"
        lines = [
            "[databases]",
            # Any database name, on the same server, as the client's own role.
            f"* = host=127.0.0.1 port={server_port}",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1",
            f"listen_port = {port}",
            "unix_socket_dir =",
            "auth_type = trust",
            f"auth_file = {auth_file}",
            "pool_mode = transaction",
            f"max_client_conn = {max_clients}",
            f"default_pool_size = {pool_size}",
            f"max_db_connections = {pool_size}",
            "min_pool_size = 0",
            "reserve_pool_size = 0",
            "server_idle_timeout = 30",
            f"query_wait_timeout = {query_wait_timeout}",
            "ignore_startup_parameters = extra_float_digits,options",
        ]
        if os.geteuid() == 0:  # PgBouncer refuses to run as root; it drops to this user after reading its files
            lines.append("user = nobody")
            folder.chmod(0o755)
        config.write_text("\n".join(lines) + "\n")
        log = (folder / "pgbouncer.log").open("w+")
        proc = subprocess.Popen([exe, str(config)], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 10
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"pgbouncer exited {proc.returncode}: {log.read()[-2000:]}")
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("pgbouncer did not listen within 10 s")
                time.sleep(0.05)
            yield port
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()


@contextlib.contextmanager
def hpsearch_proxy(storage_url: str) -> Iterator[int]:
    """``hpsearch proxy --storage storage_url`` on a free port; yields the port."""
    port = free_port()
    proxy = subprocess.Popen([sys.executable, "-m", "hpsearch", "proxy", "--storage", storage_url, "--port",
                              str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert proxy.stdout is not None
        proxy.stdout.readline()  # "gRPC storage proxy on ...": it listens
        yield port
    finally:
        proxy.terminate()
        try:
            proxy.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proxy.kill()
            proxy.wait()


@contextlib.contextmanager
def postgres_databases(names: list[str], *, connection_limit: int) -> Iterator[tuple[str, dict[str, str]]]:
    """A throwaway login role (not a superuser, so CONNECTION LIMIT binds it) owning one new database per name,
    each limited to ``connection_limit`` connections; yields (role, {name: database}). Drops them on exit."""
    import psycopg

    tag = uuid.uuid4().hex[:8]
    role = f"hpsearch_bench_{tag}"
    dbs = {name: f"hpsearch_bench_{tag}_{name}" for name in names}
    with psycopg.connect(ADMIN, autocommit=True) as con:
        con.execute(f'CREATE ROLE "{role}" LOGIN NOSUPERUSER')
        for db in dbs.values():
            con.execute(f'CREATE DATABASE "{db}" OWNER "{role}" CONNECTION LIMIT {int(connection_limit)}')
    try:
        yield role, dbs
    finally:
        with psycopg.connect(ADMIN, autocommit=True) as con:
            for db in dbs.values():
                con.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            con.execute(f'DROP ROLE IF EXISTS "{role}"')


def _free_slots() -> tuple[int, int]:
    import psycopg

    with psycopg.connect(ADMIN, autocommit=True) as con:
        row = con.execute("SELECT current_setting('max_connections')::int, "
                          "(SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')").fetchone()
        assert row is not None
        return int(row[0]), int(row[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring window per row")
    parser.add_argument("--workers", nargs="+", default=["8", "32", "64"],
                        help="worker counts (8 32 64, or comma-separated)")
    parser.add_argument("--backends", nargs="+", default=["postgresql", "pgbouncer", "proxy"],
                        help=f"any of {', '.join(BACKENDS)} (or comma-separated)")
    parser.add_argument("--pool-size", type=int, default=20, help="PgBouncer's server connections at most")
    parser.add_argument("--db-connection-limit", type=int, default=40,
                        help="CONNECTION LIMIT of each benchmark database (the direct rows' ceiling)")
    args = parser.parse_args()
    counts = [int(w) for token in args.workers for w in token.split(",") if w]
    backends = [b for token in args.backends for b in token.split(",") if b]
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backends {sorted(unknown)}; choose from {', '.join(BACKENDS)}")
    warnings.simplefilter("ignore")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    pg_backends = [b for b in backends if b != "sqlite"]
    if pg_backends:
        most, used = _free_slots()
        if most - used < args.db_connection_limit + 10:
            raise SystemExit(f"PostgreSQL has {most - used} of {most} connections free: too few for "
                             f"--db-connection-limit {args.db_connection_limit} beside its other users")
    print(HEADER, flush=True)
    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        role, dbs = (stack.enter_context(postgres_databases(pg_backends, connection_limit=args.db_connection_limit))
                     if pg_backends else ("", {}))
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        for backend in backends:
            dbname = dbs.get(backend)
            direct = f"postgresql+psycopg://{role}@127.0.0.1:5432/{dbname}"
            env: dict[str, str] = {}
            with contextlib.ExitStack() as service:
                if backend == "sqlite":
                    url = create_url = f"sqlite:///{tmp}/bench.db"
                elif backend == "postgresql":
                    url = create_url = direct
                elif backend == "pgbouncer":
                    port = service.enter_context(pgbouncer(args.pool_size, [role]))
                    url, create_url = f"postgresql+psycopg://{role}@127.0.0.1:{port}/{dbname}", direct
                    env = {DB_POOL_ENV: "none"}
                else:
                    _close(open_storage(direct))  # the tables exist before the proxy starts
                    port = service.enter_context(hpsearch_proxy(direct))
                    url, create_url = f"grpc://127.0.0.1:{port}", direct
                for workers in counts:
                    row = measure(url, workers, seconds=args.seconds, create_url=create_url, dbname=dbname,
                                  env=env, backend=backend)
                    rows.append(row)
                    print(row.markdown(), flush=True)
    for row in rows:
        if row.result.errors:
            print(f"{row.backend} x {row.workers}, first error: {row.result.first_error}", file=sys.stderr)


if __name__ == "__main__":
    main()
