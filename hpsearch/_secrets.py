"""Passwords in storage URLs never reach output.

A password is the ``user:PASSWORD@`` part as ``hpsearch._urls.split_password`` reads it (to the LAST ``@``), its
``%``-decoded form, and a ``password=`` query parameter. ``redact_url`` is the one function that masks a URL;
``storage_url`` remembers the URL of the command, and ``scrub`` masks free text (error lines, warnings, log records:
the CLI installs a log record factory that scrubs every record) by ``redact_url`` on each URL in it, then by
replacing each remembered password wherever it appears.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote

from hpsearch._urls import split_password

MASK = "***"
# Text replacement of a password inside free text (a driver's message) needs a password long enough not to match
# ordinary words; the URL itself is masked by its structure whatever the password's length.
MIN_SCRUB_LENGTH = 4
_QUERY_PASSWORD = re.compile(r"([?&](?:password|passwd|pwd)=)([^&#]*)", re.IGNORECASE)
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")
_remembered: set[str] = set()


def redact_url(url: str) -> str:
    """``scheme://user:***@host/db``: the password (and a ``password=`` query value) masked, whatever it holds."""
    parts = split_password(url)
    if parts is not None:
        url = parts[0] + MASK + parts[2]
    return _QUERY_PASSWORD.sub(lambda m: m.group(1) + MASK, url)


def url_secrets(url: str) -> set[str]:
    """Every form of the password that could appear in a message: as typed, ``%``-decoded, and its query value."""
    found = [m.group(2) for m in _QUERY_PASSWORD.finditer(url)]
    parts = split_password(url)
    if parts is not None:
        found.append(parts[1])
    return {form for s in found for form in (s, unquote(s)) if s}


def remember(url: str) -> str:
    """Notes ``url``'s password so that ``scrub`` masks it anywhere; returns ``url``."""
    _remembered.update(url_secrets(url))
    return url


def scrub(text: str) -> str:
    """``text`` with every URL's password masked by its structure, then every remembered password (long enough not
    to match ordinary words) masked wherever it appears."""
    if "://" in text:
        text = _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)
    for secret in sorted(_remembered, key=len, reverse=True):
        if len(secret) >= MIN_SCRUB_LENGTH:
            text = text.replace(secret, MASK)
    return text


def scrub_log_records() -> None:
    """Every log record made from now on, by any library, carries its message with the passwords masked."""
    make = logging.getLogRecordFactory()
    if getattr(make, "hpsearch_scrubs", False):
        return

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = make(*args, **kwargs)
        if _remembered:
            try:
                record.msg, record.args = scrub(record.getMessage()), None
                if record.exc_info and record.exc_info[1] is not None:
                    record.exc_text = scrub(logging.Formatter().formatException(record.exc_info))
            except Exception:  # a record whose arguments do not fit its format: logging reports that itself
                pass
        return record

    factory.hpsearch_scrubs = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
