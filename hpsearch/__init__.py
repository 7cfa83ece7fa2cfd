"""hpsearch: Optuna hyperparameter search for image-classification CNNs."""

from __future__ import annotations

from hpsearch._errors import HpsearchError, SpecError
from hpsearch.spec import StudySpec, load_spec

__version__ = "0.1.0"
__all__ = ["HpsearchError", "SpecError", "StudySpec", "load_spec", "__version__"]
