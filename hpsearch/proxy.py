"""Optuna's gRPC storage proxy: ``hpsearch proxy`` serves one database to many workers, which then reach it as
``--storage grpc://host:port``. The database sees one connection pool (the proxy's) instead of one per worker,
and the proxy caches finished trials, so many workers cost the server less.

Crash recovery works behind it as on a direct connection. Optuna's gRPC protocol has no heartbeats, so a worker's
client (``HeartbeatProxyClient``) sends each of its trial's heartbeats as a trial system attribute under
HEARTBEAT_KEY; the proxy records it as the heartbeat instead (it stores no such attribute), and a reaper thread in
the proxy fails the stale trials of every hpsearch study and queues their retries, which resume from the trials'
checkpoints. Needs the ``grpc`` extra (grpcio, protobuf).
"""

from __future__ import annotations

import logging
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import optuna
from optuna.storages import GrpcStorageProxy
from optuna.storages._heartbeat import BaseHeartbeat

from hpsearch._attrs import SPEC_ATTR
from hpsearch._errors import HpsearchError, SpecError, first_line
from hpsearch._optuna import fail_stale, quiet_experimental
from hpsearch._urls import parse_proxy_url

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 13000
# A worker started just before its proxy waits this long for it instead of failing at once.
CONNECT_SECONDS = 10
# A worker's heartbeat, sent as this trial system attribute (the proxy records a heartbeat instead of storing it).
HEARTBEAT_KEY = "hpsearch:heartbeat"
SERVER_THREADS = 10  # Optuna's default for its proxy
INSTALL_HINT = "the gRPC proxy needs the grpc extra: pip install 'hpsearch[grpc]' (grpcio, protobuf)"


class HeartbeatProxyClient(GrpcStorageProxy, BaseHeartbeat):
    """Optuna's proxy client with heartbeats: ``study.optimize`` runs its heartbeat thread, whose beats go to the
    proxy as a system attribute (HEARTBEAT_KEY). Finding and failing stale trials is the proxy's job, so this side
    finds none."""

    def __init__(self, *, host: str, port: int, heartbeat: int) -> None:
        super().__init__(host=host, port=port)
        self.heartbeat_interval = heartbeat

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT_KEY, True)
        except Exception as e:
            # The proxy restarting or out of reach: the heartbeat thread must outlive it (Optuna's ends at the first
            # error, and the live trial would then be failed as stale). The next beat retries.
            if not type(e).__module__.startswith("grpc"):
                raise

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        return []

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> None:
        return None


def open_proxy(url: str, *, heartbeat: int, connect_seconds: float | None = None) -> HeartbeatProxyClient:
    """A client of the proxy at ``url`` that sends a heartbeat every ``heartbeat`` seconds while a trial runs;
    fails with one line when no proxy answers within ``connect_seconds``."""
    host, port = parse_proxy_url(url)
    connect_seconds = CONNECT_SECONDS if connect_seconds is None else connect_seconds
    try:
        import grpc  # noqa: F401  (Optuna imports it lazily, on first use: fail here with the install hint)
    except ImportError:
        raise HpsearchError(f"--storage {url}: {INSTALL_HINT}") from None
    with quiet_experimental():  # the proxy is "experimental" in Optuna 5
        proxy = HeartbeatProxyClient(host=host, port=port, heartbeat=heartbeat)
    try:
        proxy.wait_server_ready(timeout=connect_seconds)
    except ConnectionError:
        proxy.close()
        raise HpsearchError(f"--storage {url}: no gRPC proxy answered within {connect_seconds:g} s "
                            "(start one with `hpsearch proxy --storage DATABASE_URL`)") from None
    return proxy


def serve(storage: optuna.storages.BaseStorage, *, host: str, port: int) -> None:
    """Serves ``storage`` on host:port until the process is stopped (blocks). Records the heartbeats the workers
    send and, every ``reap_seconds``, fails the stale trials of the hpsearch studies (with their retries)."""
    try:
        import grpc
    except ImportError:
        raise HpsearchError(f"hpsearch proxy: {INSTALL_HINT}") from None
    from optuna.storages._grpc.auto_generated import api_pb2_grpc

    check_listen(host, port)
    # Optuna's cache in front of the database: finished trials are read from memory, not from the server.
    cached = optuna.storages.get_storage(storage)
    server = grpc.server(ThreadPoolExecutor(max_workers=SERVER_THREADS))
    api_pb2_grpc.add_StorageServiceServicer_to_server(_servicer(cached), server)
    try:
        server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as e:  # grpc: "Failed to bind to address ..."
        raise HpsearchError(f"--port {port}: cannot listen on {host}:{port} ({e})") from None
    stop = threading.Event()
    every = getattr(storage, "reap_seconds", None)
    if every is not None:
        storage.reap_while_beating = False  # type: ignore[attr-defined]  # the reaper below does it, not the RPCs
        threading.Thread(target=reap_forever, args=(cached, every, stop), name="hpsearch-reaper", daemon=True).start()
    server.start()
    try:
        server.wait_for_termination()
    finally:
        stop.set()
        server.stop(grace=None)


def _servicer(storage: optuna.storages.BaseStorage) -> Any:
    """Optuna's proxy service, with a worker's heartbeat (HEARTBEAT_KEY) recorded as one, not stored."""
    from optuna.storages._grpc.auto_generated import api_pb2
    from optuna.storages._grpc.servicer import OptunaStorageProxyService

    class Service(OptunaStorageProxyService):
        def SetTrialSystemAttribute(self, request: Any, context: Any) -> Any:
            if request.key != HEARTBEAT_KEY:
                return super().SetTrialSystemAttribute(request, context)
            assert isinstance(storage, BaseHeartbeat)
            storage.record_heartbeat(request.trial_id)
            return api_pb2.SetTrialSystemAttributeReply()

    return Service(storage)


def reap_forever(storage: optuna.storages.BaseStorage, every: float, stop: threading.Event) -> None:
    """Every ``every`` seconds until ``stop``: ``reap`` (a failed look is logged and tried again next time)."""
    studies: dict[int, optuna.Study] = {}
    while not stop.wait(every):
        try:
            reap(storage, studies)
        except Exception as e:  # the database is unreachable, say: the next look may succeed
            _logger.warning("hpsearch proxy: looking for stale trials failed (%s); trying again in %g s",
                            first_line(e), every)


def reap(storage: optuna.storages.BaseStorage, studies: dict[int, optuna.Study] | None = None) -> None:
    """Fails the stale trials of every hpsearch study in ``storage`` and queues their retries (``fail_stale``).
    Other studies are left alone: their trials may run without heartbeats (ask and tell), and would be failed.
    ``studies``: Study objects kept from one call to the next."""
    studies = {} if studies is None else studies
    for frozen in storage.get_all_studies():
        if SPEC_ATTR not in frozen.user_attrs:
            continue
        study = studies.get(frozen._study_id)
        if study is None or study.study_name != frozen.study_name:
            study = studies[frozen._study_id] = optuna.load_study(study_name=frozen.study_name, storage=storage)
        try:
            fail_stale(study)
        except KeyError:  # deleted meanwhile
            studies.pop(frozen._study_id, None)


_logger = logging.getLogger(__name__)


def check_listen(host: str, port: int, *, reuse_address: bool = False) -> None:
    """gRPC binds with SO_REUSEPORT, so a second proxy on a taken port would start and share it silently; a
    plain bind fails there, which turns a taken port into an error. ``reuse_address``: bind as a server that sets
    SO_REUSEADDR does (optuna-dashboard's), so only a listening socket, not a closed connection, takes the port."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise SpecError(f"--host: {host!r} is not an address of this machine ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        if reuse_address:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as e:
            raise HpsearchError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror})") from None
