"""Storage throughput: trials/s of a trivial objective with 1, 2, 4, 8 worker processes on SQLite, PostgreSQL and
PostgreSQL behind `hpsearch proxy`, and the connections each setup holds on the PostgreSQL server.

Each worker opens the storage the way `hpsearch run` does (hpsearch.storage.open_storage: heartbeats, retry
callback, pre-ping) and runs `study.optimize` on one shared study for --seconds; trials/s is the study's
finished trials over that window. Connections are sampled from pg_stat_activity while the workers run.

    .venv/bin/python benchmarks/bench_storage.py --seconds 8
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hpsearch.storage import open_storage  # noqa: E402

ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"


def _worker(url: str, study: str, seconds: float, start: mp.synchronize.Event, done: mp.Queue) -> None:
    warnings.simplefilter("ignore")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = open_storage(url)
    s = optuna.load_study(study_name=study, storage=storage, sampler=optuna.samplers.RandomSampler())
    start.wait()
    s.optimize(lambda t: t.suggest_float("x", 0, 1), timeout=seconds)
    done.put(os.getpid())


def _connections(dbname: str) -> int:
    import psycopg

    with psycopg.connect(ADMIN, autocommit=True) as con:
        row = con.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (dbname,)).fetchone()
        return int(row[0]) if row else 0


def measure(url: str, workers: int, seconds: float, *, dbname: str | None) -> tuple[float, int | None]:
    """(trials/s, most connections seen on the server while the workers ran)."""
    study = f"bench-{uuid.uuid4().hex[:8]}"
    storage = open_storage(url)
    optuna.create_study(study_name=study, storage=storage)
    _close(storage)  # this process holds no connection while the workers are counted
    ctx = mp.get_context("fork")
    start, done = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(url, study, seconds, start, done)) for _ in range(workers)]
    for p in procs:
        p.start()
    time.sleep(1.0)  # every worker has opened its storage: the window measures trials only
    start.set()
    began = time.monotonic()
    most = None
    while any(p.is_alive() for p in procs):
        if dbname is not None:
            most = max(most or 0, _connections(dbname))
        time.sleep(0.5)
    elapsed = time.monotonic() - began
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"a worker failed (exit {p.exitcode})")
    storage = open_storage(url)
    n = len(optuna.load_study(study_name=study, storage=storage).get_trials(
        states=(optuna.trial.TrialState.COMPLETE,)))
    _close(storage)
    return n / elapsed, most


def _close(storage: optuna.storages.BaseStorage) -> None:
    if isinstance(storage, optuna.storages.RDBStorage):
        storage.remove_session()
        storage.engine.dispose()
    elif isinstance(storage, optuna.storages.GrpcStorageProxy):
        storage.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="measuring window per row")
    parser.add_argument("--workers", default="1,2,4,8", help="comma-separated worker counts")
    parser.add_argument("--backends", default="sqlite,postgresql,proxy", help="sqlite, postgresql, proxy")
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    warnings.simplefilter("ignore")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    backends = args.backends.split(",")
    import psycopg

    dbname = f"hpsearch_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN, autocommit=True) as con:
        con.execute(f'CREATE DATABASE "{dbname}"')
    pg = f"postgresql+psycopg://postgres@127.0.0.1:5432/{dbname}"
    proxy = None
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for backend in backends:
                url = {"sqlite": f"sqlite:///{tmp}/bench.db", "postgresql": pg}.get(backend)
                if backend == "proxy":
                    port = _free_port()
                    proxy = subprocess.Popen([sys.executable, "-m", "hpsearch", "proxy", "--storage", pg, "--port",
                                              str(port)], stdout=subprocess.PIPE, text=True)
                    assert proxy.stdout is not None
                    proxy.stdout.readline()  # "gRPC storage proxy on ...": it listens
                    url = f"grpc://127.0.0.1:{port}"
                assert url is not None, backend
                for workers in counts:
                    rate, conns = measure(url, workers, args.seconds,
                                          dbname=None if backend == "sqlite" else dbname)
                    rows.append((backend, workers, rate, conns))
                    per = "-" if conns is None else f"{conns / workers:.1f}"
                    print(f"| {backend} | {workers} | {rate:.1f} | {'-' if conns is None else conns} | {per} |",
                          flush=True)
    finally:
        if proxy is not None:
            proxy.kill()
            proxy.wait()
        with psycopg.connect(ADMIN, autocommit=True) as con:
            con.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


if __name__ == "__main__":
    print("| storage | workers | trials/s | server connections | per worker |")
    print("|---|---|---|---|---|")
    main()
