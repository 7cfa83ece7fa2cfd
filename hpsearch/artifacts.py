"""The artifact store: which one a study uses, and trial checkpoints in and out of it.

A store is an Optuna artifact store: a directory (``FileSystemArtifactStore``; a shared mount lets workers on
other machines resume a dead worker's trial) or ``s3://bucket/prefix`` (``Boto3ArtifactStore``, extra
``hpsearch[s3]``; the endpoint comes from boto3's own settings, e.g. ``AWS_ENDPOINT_URL`` for MinIO). A location
given with ``--artifacts`` / ``HPSEARCH_ARTIFACTS`` is recorded on the study (user attr ``hpsearch:artifacts``) so
workers and the dashboard find it; without one, every process uses ``<cache dir>/artifacts`` on its own machine.

Checkpoints are keyed by the study's UUID (user attr ``hpsearch:study_id``, set when the study is created), never
by the storage URL's text: a study re-created under the same name and URL has a new id, so a leftover file of an
old study cannot be mistaken for one of its trials.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import optuna
from optuna.artifacts import Boto3ArtifactStore, FileSystemArtifactStore
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import TrialState

from hpsearch._attrs import SPEC_ATTR
from hpsearch._errors import HpsearchError, SpecError, first_line
from hpsearch.trials import best_first

ARTIFACTS_ATTR = "hpsearch:artifacts"  # the store's location, when one was given
STUDY_ID_ATTR = "hpsearch:study_id"  # a UUID: checkpoints of this study live under it
CHECKPOINT_ATTR = "checkpoint"  # trial user attr: the artifact id of its checkpoint (a retry inherits it)
CHECKPOINT_ERROR_ATTR = "checkpoint_error"  # trial user attr: why its last failed checkpoint was not written
STUDY_ID_WAIT_SECONDS = 10  # a worker joining a study that is being created waits this long for its id
# The check of an S3 store when it is opened (the store's own client keeps boto3's retries for the checkpoints).
S3_CHECK_CONNECT_SECONDS = 5
S3_CHECK_READ_SECONDS = 10
S3_CHECK_ATTEMPTS = 2  # the first try included
# botocore's own rule for a bucket name (looser than AWS's, for S3-compatible stores such as MinIO)
_BUCKET = re.compile(r"[A-Za-z0-9.\-_]{1,255}")

ArtifactStore = Any  # optuna's ArtifactStore protocol (open_reader / write / remove)


def default_location(cache_dir: Path) -> str:
    return str(cache_dir / "artifacts")


def normalize_location(location: str) -> str:
    """The form recorded on the study: an absolute directory (workers start in other folders) or an S3 URL.
    Raises SpecError (exit 2) for anything else."""
    if "://" in location:
        scheme, _, rest = location.partition("://")
        bucket = rest.split("/", 1)[0]
        if scheme != "s3" or not bucket:
            raise SpecError(f"--artifacts: {location!r} is not a directory or s3://bucket[/prefix]")
        if not _BUCKET.fullmatch(bucket):
            raise SpecError(f"--artifacts: {location!r}: {bucket!r} is not a bucket name (letters, digits, '.', '-', "
                            "'_')")
        return f"s3://{rest.rstrip('/')}"
    if not location:
        raise SpecError("--artifacts: the value is empty; give a directory or s3://bucket[/prefix]")
    return str(Path(location).expanduser().resolve())


def open_artifact_store(location: str) -> ArtifactStore:
    """An Optuna artifact store for ``location`` (a directory, created if missing, or ``s3://bucket/prefix``)."""
    location = normalize_location(location)
    if location.startswith("s3://"):
        bucket, _, prefix = location[len("s3://"):].partition("/")
        return _s3_store(location, bucket, prefix)
    path = Path(location)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HpsearchError(f"--artifacts {location!r}: cannot create the directory ({e.strerror})") from None
    if not os.access(path, os.W_OK):
        raise HpsearchError(f"--artifacts {location!r}: the directory is not writable")
    return _FileSystemStore(path)


def resolve_location(study: optuna.Study, given: str | None, default: str) -> str:
    """The study's store: the recorded one, else ``given`` (then recorded), else ``default`` (not recorded: it is
    this machine's cache). A ``given`` that differs from the recorded one is refused: the workers of one study
    must see one store, or a retry would not find its dead trial's checkpoint. A store is recorded only once it
    was opened and answered: a study never points its workers and its dashboard at a store nobody can reach."""
    recorded = study.user_attrs.get(ARTIFACTS_ATTR)
    if given is not None:
        given = normalize_location(given)
        if recorded is not None and recorded != given:
            raise SpecError(f"--artifacts: study {study.study_name!r} keeps its artifacts in {recorded!r}, "
                            f"not {given!r}; leave --artifacts out to use the recorded store")
        if recorded is None:
            open_artifact_store(given)  # raises, with one line, for a store that cannot be reached
            study.set_user_attr(ARTIFACTS_ATTR, given)
            return given
    return recorded or default


def study_artifact_store(study: optuna.Study, default_location: str) -> ArtifactStore:
    """The store recorded on ``study``, or ``default_location`` when none was recorded."""
    return open_artifact_store(study.user_attrs.get(ARTIFACTS_ATTR) or default_location)


def store_location(store: ArtifactStore) -> str:
    """Where ``store`` keeps its artifacts: a directory's absolute path or the ``s3://bucket/prefix`` URL (what
    ``--artifacts`` takes); another kind of store is named by its class."""
    if isinstance(store, _Prefixed):
        return store.location
    if isinstance(store, _FileSystemStore):
        return os.path.abspath(store.base_path)
    if isinstance(store, FileSystemArtifactStore):
        return os.path.abspath(store._base_path)
    return type(store).__name__


# ---------------------------------------------------------------- the study's id
def new_study_id(study: optuna.Study) -> str:
    """Called by the process that created ``study``, before anything else is stored on it."""
    value = uuid.uuid4().hex
    study.set_user_attr(STUDY_ID_ATTR, value)
    return value


def study_id(study: optuna.Study) -> str:
    """The study's UUID. A worker that loaded a study a moment after another process created it waits for the
    creator to store it; a study whose spec is stored but that has no id (its creator stored none) gets one now."""
    deadline = time.monotonic() + STUDY_ID_WAIT_SECONDS
    while True:
        attrs = study.user_attrs
        if STUDY_ID_ATTR in attrs:
            return str(attrs[STUDY_ID_ATTR])
        if SPEC_ATTR in attrs or time.monotonic() > deadline:
            return new_study_id(study)
        time.sleep(0.1)


# ---------------------------------------------------------------- checkpoints
class CheckpointNotWritten(HpsearchError):
    """The store refused a checkpoint (a full disk, a file-size limit, a lost mount, an S3 error); whatever the store
    held before is intact and no partial file is left."""


def checkpoint_id(study_uuid: str, trial_number: int) -> str:
    return f"checkpoints/{study_uuid}/trial-{trial_number}.pt"


def save_checkpoint(store: ArtifactStore, artifact_id: str, state: dict[str, Any]) -> None:
    """Raises CheckpointNotWritten, with the file and the reason in one line, when the store refuses it."""
    # Optuna's upload_artifact gives every upload a new random id and a trial attr; a checkpoint is rewritten
    # every epoch under one id the retry can compute, so it goes to the store directly.
    import torch  # here: the commands that only delete or list must not pay torch's import

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    try:
        store.write(artifact_id, buf)
    except Exception as e:
        if not isinstance(e, OSError) and not type(e).__module__.startswith(("botocore", "boto3")):
            raise  # a bug (an invalid id, say), not the store's refusal
        reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
        raise CheckpointNotWritten(f"checkpoint {_where(store, artifact_id)} not written ({reason})") from None


def checkpoint_not_written(trial: optuna.Trial, error: CheckpointNotWritten) -> None:
    """A checkpoint only lets a killed worker's retry resume the trial: without it the trial still trains to its value
    (failing it would throw that training away, and on a full disk fail every trial after it the same way). The
    reason goes on the trial and, once per trial and reason, into one warning line; the next epoch tries again."""
    if trial.user_attrs.get(CHECKPOINT_ERROR_ATTR) == str(error):
        return
    trial.set_user_attr(CHECKPOINT_ERROR_ATTR, str(error))
    print(f"warning: trial {trial.number}: {error}; the trial trains on without it (a retry would resume from an "
          "older checkpoint or start over)", file=sys.stderr, flush=True)


def _where(store: ArtifactStore, artifact_id: str) -> str:
    """Where ``artifact_id`` lives in ``store``: a file's path or an S3 URL."""
    if isinstance(store, _FileSystemStore):
        return str(store.base_path / artifact_id)
    if isinstance(store, _Prefixed):
        return f"{store.location}/{artifact_id}"
    return artifact_id


def load_checkpoint(store: ArtifactStore, artifact_id: str) -> dict[str, Any] | None:
    """The checkpoint, every tensor on the CPU (fit moves what belongs on the device; RNG states must stay CPU
    tensors for ``set_state``), or None when there is none."""
    try:
        reader = store.open_reader(artifact_id)
    except ArtifactNotFound:
        return None
    try:
        body = reader.read()
    finally:
        reader.close()
    import torch

    # weights_only: a shared bucket's file is not trusted to run code on load.
    state: dict[str, Any] = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    return state


def remove_checkpoint(store: ArtifactStore, artifact_id: str) -> None:
    try:
        store.remove(artifact_id)
    except ArtifactNotFound:
        pass



def checkpoints_after_trial(store: ArtifactStore, *, keep_best: int = 0
                            ) -> Callable[[optuna.Study, optuna.trial.FrozenTrial], None]:
    """A study.optimize callback (called once the trial's final state is stored): removes the trial's checkpoint,
    unless it is among the ``keep_best`` best complete trials; then the one it pushed out of them goes."""

    def after(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        checkpoint = trial.user_attrs.get(CHECKPOINT_ATTR)
        if checkpoint is None:
            return
        if keep_best > 0 and trial.state == TrialState.COMPLETE:
            ranked = best_first(t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                                if CHECKPOINT_ATTR in t.user_attrs)
            if trial.number in {t.number for t in ranked[:keep_best]}:
                if len(ranked) > keep_best:  # only one can drop out per finished trial
                    remove_checkpoint(store, ranked[keep_best].user_attrs[CHECKPOINT_ATTR])
                return
        remove_checkpoint(store, checkpoint)

    return after


class _FileSystemStore(FileSystemArtifactStore):
    """Optuna's store, plus: sub-folders are created, and a write is atomic (a worker killed mid-save leaves the
    previous checkpoint intact, where Optuna's would leave a truncated file)."""

    def __init__(self, base_path: Path) -> None:
        super().__init__(base_path)
        self.base_path = base_path

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        target = self.base_path / artifact_id
        self._check_id(artifact_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:  # a full disk may refuse the write or only the flush at close
                shutil.copyfileobj(content_body, f)
            os.replace(tmp, target)
        except BaseException:  # a full disk, a signal mid-write: no partial file is left beside the last whole one
            tmp.unlink(missing_ok=True)
            raise

    def _check_id(self, artifact_id: str) -> None:
        # the parent's path check (absolute ids, ".." escapes) without opening anything
        if os.path.isabs(artifact_id) or ".." in Path(artifact_id).parts:
            raise ValueError(f"Invalid artifact_id: {artifact_id}")


class _Prefixed:
    """A store whose ids live under ``prefix/`` of another store (Boto3ArtifactStore has no prefix of its own)."""

    def __init__(self, inner: ArtifactStore, prefix: str, location: str) -> None:
        self.inner, self.prefix, self.location = inner, prefix, location

    def _key(self, artifact_id: str) -> str:
        return f"{self.prefix}/{artifact_id}" if self.prefix else artifact_id

    def open_reader(self, artifact_id: str) -> BinaryIO:
        return self.inner.open_reader(self._key(artifact_id))

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        self.inner.write(self._key(artifact_id), content_body)

    def remove(self, artifact_id: str) -> None:
        self.inner.remove(self._key(artifact_id))


def _s3_store(location: str, bucket: str, prefix: str) -> ArtifactStore:
    """The store, once a cheap call with short timeouts and one retry (head_bucket: reachable, credentials, permission)
    answered; fails now with one line, not at the first checkpoint mid-trial."""
    try:
        import boto3
        import botocore.config
        import botocore.exceptions
    except ImportError:
        raise HpsearchError(f"--artifacts {location!r}: S3 needs boto3; pip install 'hpsearch[s3]'") from None
    check = botocore.config.Config(connect_timeout=S3_CHECK_CONNECT_SECONDS, read_timeout=S3_CHECK_READ_SECONDS,
                                   retries={"total_max_attempts": S3_CHECK_ATTEMPTS, "mode": "standard"})
    try:
        # A session of its own: boto3's default one keeps the credentials it first found for the process's life.
        session = boto3.session.Session()
        session.client("s3", config=check).head_bucket(Bucket=bucket)
        client = session.client("s3")
    except botocore.exceptions.ParamValidationError as e:  # botocore's own checks of the name
        raise SpecError(f"--artifacts {location!r}: {first_line(e)}") from None
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, ValueError) as e:
        # ValueError: an endpoint URL (AWS_ENDPOINT_URL, a profile's endpoint_url) that is not one
        raise HpsearchError(f"--artifacts {location!r}: cannot reach the bucket ({first_line(e)})") from None
    return _Prefixed(Boto3ArtifactStore(bucket, client=client), prefix, location)
