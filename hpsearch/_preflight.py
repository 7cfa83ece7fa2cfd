"""Checks made before the first trial: every place a run will write (database file, cache, checkpoints) is
tried first, so a read-only one is reported in one line instead of after a trial has trained."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hpsearch._errors import SpecError
from hpsearch._urls import parse_database_url, sqlite_database


def sqlite_file(url: str) -> Path | None:
    """The file of an SQLite URL; None for other databases, in-memory SQLite and URLs that do not parse
    (``open_storage`` reports those)."""
    parsed = parse_database_url(url)
    database = None if parsed is None else sqlite_database(parsed)
    return None if database is None else Path(database)


def check_writable_dir(path: Path, *, option: str) -> None:
    """Writes a file in ``path`` (making the missing folders, as the run would, and removing them again):
    permission bits are not enough, as root ignores them and a read-only mount refuses root too."""
    made = [p for p in (path, *path.parents) if not p.exists()]
    try:
        for attempt in range(5):
            try:
                path.mkdir(parents=True, exist_ok=True)
                fd, probe = tempfile.mkstemp(dir=path, prefix=".hpsearch-write-check-")
                break
            except (FileNotFoundError, FileExistsError):
                # Another worker starting beside this one removed the folders it made between our mkdir and our
                # probe (the clean-up below): make them again.
                if attempt == 4:
                    raise
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise SpecError(f"{option}: cannot write to the directory {str(path)!r} ({e.strerror}); "
                        "make it writable or choose another") from None
    finally:
        for p in made:  # deepest first: a run that stops before its first trial leaves no empty folders
            try:
                p.rmdir()
            except OSError:
                break


def check_writable_sqlite(path: Path) -> None:
    """An SQLite database needs its file and its directory writable (the journal is written beside it)."""
    if not path.parent.is_dir():
        raise SpecError(f"--storage: the directory {str(path.parent)!r} of the SQLite file does not exist")
    check_writable_dir(path.parent, option="--storage")
    if path.exists():
        try:
            with open(path, "r+b"):  # opened for writing, nothing written
                pass
        except OSError as e:
            raise SpecError(f"--storage: cannot write to the SQLite file {str(path)!r} ({e.strerror}); "
                            "make it writable or choose another") from None


def new_sqlite_file(url: str) -> Path | None:
    """The file of an SQLite URL when it does not exist yet (a run makes it only once its data has been read)."""
    path = sqlite_file(url)
    return path if path is not None and not path.exists() else None


def check_run_writes(*, storage: str, cache: Path, artifacts: str) -> None:
    """Everything a run writes, tried before its first trial: the SQLite file, the cache, the artifact store's
    directory (checkpoints; an s3:// store is checked when it is opened)."""
    path = sqlite_file(storage)
    if path is not None:
        check_writable_sqlite(path)
    check_writable_dir(cache, option="--cache-dir")
    if "://" not in artifacts:
        check_writable_dir(Path(artifacts).expanduser(), option="--artifacts")
