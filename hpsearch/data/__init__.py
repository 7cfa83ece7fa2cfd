"""Datasets in memory as uint8 device tensors (see ``_load`` for where files are looked for)."""

from __future__ import annotations

from hpsearch.data._load import (
    DATASET_RULE,
    Data,
    DataInfo,
    Final,
    Raw,
    SealedTestSplit,
    Split,
    check_dataset_name,
    default_cache_dir,
    default_data_dir,
    load,
    load_final,
    load_test,
    read_raw,
)

__all__ = [
    "DATASET_RULE",
    "Data",
    "DataInfo",
    "Final",
    "Raw",
    "SealedTestSplit",
    "Split",
    "check_dataset_name",
    "default_cache_dir",
    "default_data_dir",
    "load",
    "load_final",
    "load_test",
    "read_raw",
]
