"""Where hpsearch reads and writes files. Kept free of torch so that commands which do not train
(``studies``, ``show``, ``export``, ``delete``, ``dashboard``) find their folders without importing it."""

from __future__ import annotations

import os
from pathlib import Path


def default_data_dir() -> Path:
    return Path(os.environ.get("HPSEARCH_DATA") or Path.home() / ".cache" / "hpsearch" / "data")


def default_cache_dir() -> Path:
    return Path(os.environ.get("HPSEARCH_CACHE") or Path.home() / ".cache" / "hpsearch" / "cache")




def write_atomically(path: Path, data: bytes | str) -> None:
    """Write ``data`` (str: as UTF-8) to ``path`` whole or not at all: a temporary file beside it, then a rename. A
    reader never sees a half-written file, and a failure (full disk, no permission, a missing folder: none is made)
    leaves neither a partial ``path`` nor the temporary file. OSError propagates: each caller words its own one-line
    error naming the file."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(payload)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # left only by a failure: after the rename it is gone
