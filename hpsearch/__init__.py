"""hpsearch: Optuna hyperparameter search for image-classification CNNs."""

from __future__ import annotations

from typing import Any

from hpsearch._errors import HpsearchError, SpecError
from hpsearch.spec import StudySpec, load_spec

__version__ = "0.1.0"
__all__ = ["HpsearchError", "SpecError", "StudySpec", "load_model", "load_spec", "__version__"]


def __getattr__(name: str) -> Any:
    # load_model needs torch: imported on first use, so ``import hpsearch`` stays light.
    if name == "load_model":
        from hpsearch.evaluate import load_model

        return load_model
    raise AttributeError(f"module 'hpsearch' has no attribute {name!r}")
