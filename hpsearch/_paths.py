"""Where hpsearch reads and writes files. Kept free of torch so that commands which do not train
(``studies``, ``show``, ``export``, ``delete``) can find the checkpoints without importing it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def default_data_dir() -> Path:
    return Path(os.environ.get("HPSEARCH_DATA") or Path.home() / ".cache" / "hpsearch" / "data")


def default_cache_dir() -> Path:
    return Path(os.environ.get("HPSEARCH_CACHE") or Path.home() / ".cache" / "hpsearch" / "cache")


def checkpoint_dir(root: Path, storage_url: str, study_name: str) -> Path:
    """One folder per (storage, study): two databases with a study of the same name never share checkpoints."""
    key = hashlib.sha256(f"{storage_url}\0{study_name}".encode()).hexdigest()[:16]
    return root / key
