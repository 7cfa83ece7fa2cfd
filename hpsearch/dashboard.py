"""optuna-dashboard with the artifact stores the studies recorded, so trial PNGs and notes' images show.

An image that no store this dashboard reads holds (a database copied to another machine without its store) is
served as a small PNG that says so, where the note would otherwise show a broken image; the trial note's "images"
line says where the images were kept.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, BinaryIO

import optuna

from hpsearch._errors import HpsearchError
from hpsearch.artifacts import ARTIFACTS_ATTR, open_artifact_store

PLACEHOLDER_WIDTH = 640  # px; the text is drawn in PLACEHOLDER_FONT_PX
PLACEHOLDER_FONT_PX = 15
PLACEHOLDER_LOCATIONS = 4  # locations named in the placeholder; more are counted
PLACEHOLDER_LOCATION_CHARS = 70  # a longer location keeps its start and end around "..."


class StudiesArtifactStore:
    """Reads from every store the studies recorded (one dashboard serves all studies of a storage); artifact ids
    are uuid4s, so the first store that has the id holds the artifact. An id that no store holds (or that every
    store failed to read) gets a placeholder PNG naming ``locations`` (what the dashboard reads) and how to point
    it at the right store; a malformed id (absolute, ``..``) raises ValueError. Writes (uploads from the dashboard's
    UI) go to the first store; with no store at all (none could be opened) they raise OSError."""

    def __init__(self, stores: list[Any], locations: list[str]) -> None:
        self.stores = stores
        self.locations = locations
        self._placeholder: bytes | None = None

    def open_reader(self, artifact_id: str) -> BinaryIO:
        _check_id(artifact_id)
        for store in self.stores:
            try:
                return store.open_reader(artifact_id)
            except ValueError:  # the store's own check of the id: not a missing image
                raise
            except Exception:  # optuna raises ArtifactNotFound; a store may fail (mount gone, S3 error)
                continue
        if self._placeholder is None:
            self._placeholder = placeholder_png(self.locations)
        return io.BytesIO(self._placeholder)

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        if not self.stores:
            raise OSError("no artifact store could be opened; start hpsearch dashboard --artifacts DIR|s3://...")
        self.stores[0].write(artifact_id, content_body)

    def remove(self, artifact_id: str) -> None:
        for store in self.stores:
            try:
                store.remove(artifact_id)
            except Exception:  # not in this store
                continue


def _check_id(artifact_id: str) -> None:
    """The file-system store's rule (optuna's FileSystemArtifactStore): no absolute id, none leaving the store."""
    if not artifact_id or os.path.isabs(artifact_id) or ".." in Path(artifact_id).parts:
        raise ValueError(f"Invalid artifact_id: {artifact_id}")


def _shorten(text: str, limit: int = PLACEHOLDER_LOCATION_CHARS) -> str:
    if len(text) <= limit:
        return text
    keep = limit - 3
    return f"{text[:keep // 2]}...{text[len(text) - (keep - keep // 2):]}"


def placeholder_lines(locations: list[str]) -> list[str]:
    """The placeholder's text: which stores were searched and what to do."""
    shown = [f"  {_shorten(loc)}" for loc in locations[:PLACEHOLDER_LOCATIONS]] or ["  (none could be opened)"]
    if len(locations) > PLACEHOLDER_LOCATIONS:
        shown.append(f"  and {len(locations) - PLACEHOLDER_LOCATIONS} more")
    return ["image not in the artifact stores this dashboard reads:", *shown,
            "see the note's 'images' line; start",
            "hpsearch dashboard --artifacts DIR|s3://..."]


def placeholder_png(locations: list[str]) -> bytes:
    """A PNG that says, in a few short lines, that the image is in none of ``locations``."""
    from PIL import Image, ImageDraw, ImageFont  # here: only a dashboard that misses an image draws one

    lines = placeholder_lines(locations)
    font = ImageFont.load_default(size=PLACEHOLDER_FONT_PX)
    step = PLACEHOLDER_FONT_PX + 7
    image = Image.new("RGB", (PLACEHOLDER_WIDTH, 24 + step * len(lines)), "#f4f4f4")
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, image.width - 1, image.height - 1), outline="#b0b0b0", width=2)
    for i, line in enumerate(lines):
        draw.text((14, 12 + step * i), line, fill="#303030", font=font)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


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
    """The store to hand optuna-dashboard, the locations it reads and one warning line per location it cannot:
    ``given`` (--artifacts) first, then those the studies recorded, then this machine's default (where studies run
    without --artifacts keep theirs). A recorded store that cannot be reached now (gone, no credentials here) only
    costs its trials their images (each shows a placeholder that says so); ``given`` must open (an error otherwise).
    With no store opened at all, the store still serves the placeholders (uploads from the UI then fail), so it is
    never None now; the type stays for callers."""
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
    return StudiesArtifactStore(stores, read), read, warnings
