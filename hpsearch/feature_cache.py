"""Frozen-trunk outputs for a dataset's train and val images, computed once and kept for the process.

A fine-tuning trial with a frozen trunk and no augmentation would run the same trunk on the same images every
epoch: for ``unfreeze = fc`` that is nearly all of the work. ``trunk_features`` computes those outputs once, keeps
them on the training device in fp16 (half the memory of fp32; the head trains in fp32 on ``.float()`` of them),
and hands the same tensors to every later epoch and every later trial with the same key.

Keying: the caller's key names everything the trunk's output depends on besides the images (backbone, weights,
cut point, input size); the images are matched by identity (a weak reference to the split's tensor), so a
different dataset, split or train_fraction never hits, and a freed dataset's features are dropped.

Bound: at most ``HPSEARCH_FEATURE_CACHE_MB`` (default 2048) of features are held; the least recently used entries
go first, and a trunk whose outputs alone exceed the bound is not cached (the caller trains uncached).
"""

from __future__ import annotations

import math
import os
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch
import torch.nn as nn

from hpsearch.data import Data, Split
from hpsearch.devices import autocast_dtype

DEFAULT_BUDGET_MB = 2048
CHUNK = 256  # images per trunk call: a ResNet50 at 224 px holds ~3 GB of activations per 256 on the way


@dataclass
class _Entry:
    images: weakref.ref[torch.Tensor]  # the split these features were computed from
    features: torch.Tensor


_CACHE: OrderedDict[tuple[Hashable, int], _Entry] = OrderedDict()  # least recently used first


def budget_bytes() -> int:
    """Read on every call, not at import: a test or a benchmark may change it within the process."""
    return int(float(os.environ.get("HPSEARCH_FEATURE_CACHE_MB", DEFAULT_BUDGET_MB)) * 2**20)


def cached_bytes() -> int:
    return sum(e.features.numel() * e.features.element_size() for e in _CACHE.values())


def clear() -> None:
    _CACHE.clear()


def trunk_features(key: Hashable, trunk: nn.Module, data: Data,
                   prep: Callable[[torch.Tensor], torch.Tensor]) -> Data | None:
    """``data`` with x replaced by ``trunk(prep(x))`` in fp16, from the cache when there; None if it would not fit.

    ``trunk`` must be frozen (its BatchNorm is put in eval mode here) for the result to be what running it every
    batch gives.
    """
    _drop_dead()
    trunk.eval()
    probe = _run(trunk, prep, data.train.x[:1])  # one image's output shape: the bytes are known before any work
    per_image = math.prod(probe.shape[1:]) * 2
    if per_image * (len(data.train) + len(data.val)) > budget_bytes():
        return None
    mine = {(key, id(s.x)) for s in (data.train, data.val) if _lookup(key, s) is not None}
    need = per_image * sum(len(s) for s in (data.train, data.val) if (key, id(s.x)) not in mine)
    for k in list(_CACHE):  # least recently used first; this request's own entries stay
        if cached_bytes() + need <= budget_bytes():
            break
        if k not in mine:
            del _CACHE[k]
    return Data(train=Split(_features(key, trunk, prep, data.train), data.train.y),
                val=Split(_features(key, trunk, prep, data.val), data.val.y), info=data.info)


def _lookup(key: Hashable, split: Split) -> torch.Tensor | None:
    entry = _CACHE.get((key, id(split.x)))
    if entry is None or entry.images() is not split.x:
        return None
    _CACHE.move_to_end((key, id(split.x)))
    return entry.features


def _features(key: Hashable, trunk: nn.Module, prep: Callable[[torch.Tensor], torch.Tensor],
              split: Split) -> torch.Tensor:
    found = _lookup(key, split)
    if found is not None:
        return found
    chunks = [_run(trunk, prep, split.x[i : i + CHUNK]) for i in range(0, len(split), CHUNK)]
    features = torch.cat(chunks)
    _CACHE[(key, id(split.x))] = _Entry(weakref.ref(split.x), features)
    return features


def _run(trunk: nn.Module, prep: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    # no_grad, not inference_mode: inference tensors could not be saved for the head's backward pass.
    dtype = autocast_dtype(x.device)
    with torch.no_grad(), torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        return trunk(prep(x)).to(torch.float16)


def _drop_dead() -> None:
    for k in [k for k, e in _CACHE.items() if e.images() is None]:
        del _CACHE[k]
