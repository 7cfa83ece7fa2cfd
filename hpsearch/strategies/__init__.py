"""Strategy registry: adding a strategy is one new module and one line here."""

from __future__ import annotations

from hpsearch.strategies import finetune, scratch, zoo
from hpsearch.strategies._base import Config, Strategy, suggest_train, train_params

STRATEGIES: dict[str, Strategy] = {
    "scratch": scratch.STRATEGY,
    "zoo": zoo.STRATEGY,
    "finetune": finetune.STRATEGY,
}

__all__ = ["STRATEGIES", "Config", "Strategy", "suggest_train", "train_params"]
