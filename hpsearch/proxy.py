"""Optuna's gRPC storage proxy: ``hpsearch proxy`` serves one database to many workers, which then reach it as
``--storage grpc://host:port``. The database sees one connection pool (the proxy's) instead of one per worker,
and the proxy caches finished trials, so many workers cost the server less.

The price: Optuna's heartbeats exist only for RDB storage. A worker behind the proxy records none, so a killed
worker's trial stays RUNNING and is never failed nor retried automatically, and its checkpoint is not resumed.
Needs the ``grpc`` extra (grpcio, protobuf).
"""

from __future__ import annotations

import socket
import warnings
from typing import TYPE_CHECKING

import optuna

from hpsearch._errors import HpsearchError, SpecError

if TYPE_CHECKING:
    from optuna.storages import GrpcStorageProxy

SCHEME = "grpc://"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 13000
# A worker started just before its proxy waits this long for it instead of failing at once.
CONNECT_SECONDS = 10
PROXY_WARNING = ("warning: storage {url} is a gRPC proxy, which has no heartbeats: a killed worker's trial stays "
                 "RUNNING and is not retried automatically (connect workers to the database itself for that)")
INSTALL_HINT = "the gRPC proxy needs the grpc extra: pip install 'hpsearch[grpc]' (grpcio, protobuf)"


def is_proxy_url(url: str) -> bool:
    return url.lower().startswith(SCHEME)


def parse_proxy_url(url: str) -> tuple[str, int]:
    """``grpc://host:port`` -> (host, port). Nothing else is allowed: the proxy has no user, password, path."""
    rest = url[len(SCHEME):]
    rule = "must be grpc://HOST:PORT with a port from 1 to 65535 (e.g. grpc://127.0.0.1:13000)"
    if "@" in rest or "/" in rest.rstrip("/") or "?" in rest:
        # Never echo what was given: it may hold a password meant for a database URL.
        raise SpecError(f"--storage: a grpc:// URL holds only a host and a port; {rule}")
    host, sep, port = rest.rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise SpecError(f"--storage: {url!r} {rule}")
    return host.strip("[]"), int(port)


def open_proxy(url: str, *, connect_seconds: float | None = None) -> GrpcStorageProxy:
    """A client of the proxy at ``url``; fails with one line when no proxy answers within ``connect_seconds``."""
    host, port = parse_proxy_url(url)
    connect_seconds = CONNECT_SECONDS if connect_seconds is None else connect_seconds
    try:
        import grpc  # noqa: F401  (Optuna imports it lazily, on first use: fail here with the install hint)
    except ImportError:
        raise HpsearchError(f"--storage {url}: {INSTALL_HINT}") from None
    with warnings.catch_warnings():  # the proxy is "experimental" in Optuna 5
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        proxy = optuna.storages.GrpcStorageProxy(host=host, port=port)
    try:
        proxy.wait_server_ready(timeout=connect_seconds)
    except ConnectionError:
        proxy.close()
        raise HpsearchError(f"--storage {url}: no gRPC proxy answered within {connect_seconds:g} s "
                            "(start one with `hpsearch proxy --storage DATABASE_URL`)") from None
    return proxy


def serve(storage: optuna.storages.BaseStorage, *, host: str, port: int) -> None:
    """Serves ``storage`` on host:port until the process is stopped (blocks)."""
    try:
        import grpc  # noqa: F401
    except ImportError:
        raise HpsearchError(f"hpsearch proxy: {INSTALL_HINT}") from None
    check_listen(host, port)
    # Optuna's cache in front of the database: finished trials are read from memory, not from the server.
    cached = optuna.storages.get_storage(storage)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            optuna.storages.run_grpc_proxy_server(cached, host=host, port=port)
        except RuntimeError as e:  # grpc: "Failed to bind to address ..."
            raise HpsearchError(f"--port {port}: cannot listen on {host}:{port} ({e})") from None


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
