"""Stand-in for the artifact store of the scaling issue (its branch's version replaces this file at merge):
a FileSystemArtifactStore under ``<cache-dir>/artifacts`` unless the study records another location."""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.artifacts import FileSystemArtifactStore

LOCATION_ATTR = "hpsearch:artifacts"


def open_artifact_store(location: str | Path) -> FileSystemArtifactStore:
    path = Path(location)
    path.mkdir(parents=True, exist_ok=True)  # FileSystemArtifactStore does not create its directory
    return FileSystemArtifactStore(path)


def study_artifact_store(study: optuna.Study, default_location: str | Path) -> FileSystemArtifactStore:
    """The store recorded on ``study``; a study without one records ``default_location`` first."""
    location = study.user_attrs.get(LOCATION_ATTR)
    if location is None:
        location = str(Path(default_location).resolve())
        study.set_user_attr(LOCATION_ATTR, location)
    return open_artifact_store(location)
