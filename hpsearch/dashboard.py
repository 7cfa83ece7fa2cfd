"""optuna-dashboard with the artifact stores the studies recorded, so trial PNGs and notes' images show."""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO

import optuna

from hpsearch._errors import HpsearchError
from hpsearch.artifacts import ARTIFACTS_ATTR, open_artifact_store


class StudiesArtifactStore:
    """Reads from every store the studies recorded (one dashboard serves all studies of a storage); artifact ids
    are uuid4s, so the first store that has the id holds the artifact. Writes (uploads from the dashboard's UI)
    go to the first store."""

    def __init__(self, stores: list[Any]) -> None:
        if not stores:
            raise ValueError("The value of `stores` is [], but must hold at least one artifact store")
        self.stores = stores

    def open_reader(self, artifact_id: str) -> BinaryIO:
        error: Exception | None = None
        for store in self.stores:
            try:
                return store.open_reader(artifact_id)
            except Exception as e:  # optuna raises ArtifactNotFound; other stores may raise their own errors
                error = e
        assert error is not None
        raise error

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        self.stores[0].write(artifact_id, content_body)

    def remove(self, artifact_id: str) -> None:
        for store in self.stores:
            try:
                store.remove(artifact_id)
            except Exception:  # not in this store
                continue


def artifact_locations(storage: optuna.storages.BaseStorage) -> list[str]:
    """The artifact locations recorded on the storage's studies, in study order, without repeats."""
    seen: list[str] = []
    for s in optuna.get_all_study_summaries(storage, include_best_trial=False):
        location = s.user_attrs.get(ARTIFACTS_ATTR)
        if isinstance(location, str) and location not in seen:
            seen.append(location)
    return seen


def dashboard_artifact_store(storage: optuna.storages.BaseStorage, *, given: str | None, default_location: Path
                             ) -> tuple[StudiesArtifactStore | None, list[str], list[str]]:
    """The store to hand optuna-dashboard (None: none could be opened), the locations it reads and one warning line
    per location it cannot: ``given`` (--artifacts) first, then those the studies recorded, then this machine's
    default (where studies run without --artifacts keep theirs). A recorded store that cannot be reached now (gone,
    no credentials here) only costs its trials their images; ``given`` must open (an error otherwise)."""
    locations: list[str] = []
    for location in [given, *artifact_locations(storage), str(default_location)]:
        if location is not None and location not in locations:
            locations.append(location)
    stores: list[Any] = []
    read: list[str] = []
    warnings: list[str] = []
    for location in locations:
        try:
            stores.append(open_artifact_store(location))
        except HpsearchError as e:
            if location == given:
                raise
            reason = str(e).removeprefix(f"--artifacts {location!r}: ")
            warnings.append(f"warning: artifacts in {location!r}: {reason}; the dashboard shows the trials kept "
                            "there without their images")
            continue
        read.append(location)
    return (StudiesArtifactStore(stores) if stores else None), read, warnings
