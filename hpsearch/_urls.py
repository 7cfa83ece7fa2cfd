"""The one reader of storage URLs: the ``grpc://host:port`` of ``hpsearch proxy``, an SQLAlchemy database URL (and
the SQLite file it names), and the ``user:password@`` part whatever the password holds.

A password is whatever a URL parser or a human could read as one: in ``scheme://user:PASSWORD@host/db`` everything
from the first ``:`` after the user name to the LAST ``@`` (people type ``@``, ``:`` and ``/`` into passwords
without escaping them; SQLAlchemy alone would stop at the first ``@`` and take the rest for the host). Masking it
is ``hpsearch._secrets.redact_url``'s job. Free of torch; SQLAlchemy is imported when a database URL is read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hpsearch._errors import SpecError

if TYPE_CHECKING:
    import sqlalchemy

PROXY_SCHEME = "grpc://"


def is_proxy_url(url: str) -> bool:
    return url.lower().startswith(PROXY_SCHEME)


def parse_proxy_url(url: str) -> tuple[str, int]:
    """``grpc://host:port`` -> (host, port). Nothing else is allowed: the proxy has no user, password, path."""
    rest = url[len(PROXY_SCHEME):]
    rule = "must be grpc://HOST:PORT with a port from 1 to 65535 (e.g. grpc://127.0.0.1:13000)"
    if "@" in rest or "/" in rest.rstrip("/") or "?" in rest:
        # Never echo what was given: it may hold a password meant for a database URL.
        raise SpecError(f"--storage: a grpc:// URL holds only a host and a port; {rule}")
    host, sep, port = rest.rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise SpecError(f"--storage: {url!r} {rule}")
    return host.strip("[]"), int(port)


def parse_database_url(url: str) -> sqlalchemy.engine.URL | None:
    """SQLAlchemy's reading of ``url`` (its password escaped first: ``escape_password``), or None when it is not
    an SQLAlchemy URL."""
    import sqlalchemy
    from sqlalchemy.engine import make_url

    try:
        return make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError):  # ValueError: a port that is not a number
        return None


def is_sqlite(parsed: sqlalchemy.engine.URL) -> bool:
    return bool(parsed.get_backend_name() == "sqlite")


def sqlite_database(parsed: sqlalchemy.engine.URL) -> str | None:
    """The file an SQLite URL names; None for other databases and for in-memory SQLite."""
    if not is_sqlite(parsed) or not parsed.database or parsed.database == ":memory:":
        return None
    return parsed.database


def split_password(url: str) -> tuple[str, str, str] | None:
    """``(before, password, after)`` with ``url == before + password + after``, or None when the URL has no
    ``user:password@`` part. The user name holds no ``:``, ``@`` or ``/``; the password runs to the last ``@``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return None
    at = rest.rfind("@")
    if at < 0:
        return None
    user, colon, password = rest[:at].partition(":")
    if not colon or "/" in user or "@" in user:
        return None
    start = len(scheme) + len(sep) + len(user) + 1
    return url[:start], password, url[start + len(password):]


def escape_password(url: str) -> str:
    """``url`` with each ``@`` of its password written ``%40``, so that SQLAlchemy reads the password the user typed
    (``u:p@ss@host`` -> password ``p@ss``, host ``host``) instead of a host holding part of it."""
    parts = split_password(url)
    if parts is None or "@" not in parts[1]:
        return url
    before, password, after = parts
    return before + password.replace("@", "%40") + after
