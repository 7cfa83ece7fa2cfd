"""hpsearch: Optuna hyperparameter search for image-classification CNNs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hpsearch._errors import HpsearchError, SpecError

if TYPE_CHECKING:
    from hpsearch.spec import StudySpec, load_spec

__version__ = "0.1.0"
__all__ = ["HpsearchError", "SpecError", "StudySpec", "load_model", "load_spec", "__version__"]


def __getattr__(name: str) -> Any:
    # Loaded on first use: the spec imports the strategies and with them torch (seconds), and load_model needs
    # torch too; `hpsearch --help`, `studies`, `show` and `export` need neither.
    if name in ("StudySpec", "load_spec"):
        from hpsearch import spec

        return getattr(spec, name)
    if name == "load_model":
        from hpsearch.saved_model import load_model

        return load_model
    raise AttributeError(f"module 'hpsearch' has no attribute {name!r}")
