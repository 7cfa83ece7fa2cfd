"""Where hpsearch reads and writes files. Kept free of torch so that commands which do not train
(``studies``, ``show``, ``export``, ``delete``, ``dashboard``) find their folders without importing it."""

from __future__ import annotations

import os
from pathlib import Path


def default_data_dir() -> Path:
    return Path(os.environ.get("HPSEARCH_DATA") or Path.home() / ".cache" / "hpsearch" / "data")


def default_cache_dir() -> Path:
    return Path(os.environ.get("HPSEARCH_CACHE") or Path.home() / ".cache" / "hpsearch" / "cache")

