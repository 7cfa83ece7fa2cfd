"""Crash-resume: only a retry of a dead trial resumes, from its own study's checkpoint; a storage error keeps the
file; the retry trains from the epoch after the checkpoint; finished trials' checkpoints go (but the best K)."""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import torch
from optuna.trial import TrialState

from hpsearch import artifacts
from hpsearch.data import load
from hpsearch.objective import make_objective
from hpsearch.spec import load_spec
from hpsearch.storage import MAX_RETRY, open_storage
from hpsearch.study import open_study
from tests.conftest import study_text

CPU = torch.device("cpu")
_REPORT = optuna.Trial.report  # the real one, whatever a test patched in
# study.ask() on a heartbeat storage warns that heartbeats need optimize: these tests ask on purpose
pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")
SPACE = """
[space]
conv_layers = 1
channels = 8
padding = "same"
stride = 1
fc_layers = 1
batch_size = 32
optimizer = "adam"
"""


def _setup(tmp_path: Path, *, epochs: int = 3, db: str = "hpsearch.db", fixed: bool = True):
    path = tmp_path / "study.toml"
    path.write_text(study_text(epochs=epochs, extra='pruner = "none"', **({"space": SPACE} if fixed else {})))
    spec = load_spec(path)
    data = load(spec.dataset, data_dir=tmp_path, cache_dir=tmp_path, device=CPU, val_fraction=spec.val_fraction,
                seed=spec.seed)
    study = open_study(spec, open_storage(f"sqlite:///{tmp_path / db}"))
    store = artifacts.open_artifact_store(str(tmp_path / "artifacts"))
    return study, store, make_objective(spec, data, device=CPU, store=store)


def _record_reports(monkeypatch: pytest.MonkeyPatch, *, fail_at: int | None = None,
                    error: BaseException | None = None) -> list[tuple[int, int]]:
    """Trial.report records (trial number, step); with ``fail_at`` it raises ``error`` at that step instead."""
    seen: list[tuple[int, int]] = []

    def recording(self: optuna.Trial, value: float, step: int) -> None:
        if step == fail_at:
            assert error is not None
            raise error
        seen.append((self.number, step))
        _REPORT(self, value, step)

    monkeypatch.setattr(optuna.Trial, "report", recording)
    return seen


def _retry(study: optuna.Study, number: int) -> None:
    """What Optuna does for a trial whose heartbeat went stale: FAIL it and enqueue the retry."""
    study.tell(number, state=TrialState.FAIL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY, inherit_intermediate_values=True)(
            study, study.trials[number])


def test_a_leftover_checkpoint_never_touches_a_fresh_trial(tmp_path, monkeypatch):
    study, store, objective = _setup(tmp_path)
    sid = artifacts.study_id(study)
    # A file where trial 0's checkpoint goes, as an old worker could have left: loading it would fail the trial
    # (no weights) or skip its epochs.
    leftover = {"epoch": 1, "model": {}, "optimizer": {}, "scheduler": None, "scaler": {}, "rng": {},
                "result": {"best_val_accuracy": 0.123, "best_epoch": 0, "train_loss": [9.0, 9.0],
                           "val_accuracy": [0.123, 0.1], "seconds_per_epoch": [1.0, 1.0]}}
    artifacts.save_checkpoint(store, artifacts.checkpoint_id(sid, 0), leftover)
    seen = _record_reports(monkeypatch)
    study.optimize(objective, n_trials=1)
    trial = study.trials[0]
    assert trial.state == TrialState.COMPLETE, trial.user_attrs.get("error")
    assert seen == [(0, 0), (0, 1), (0, 2)]  # every epoch trained
    assert "resumed_after_epoch" not in trial.user_attrs
    assert 0.123 not in trial.user_attrs["val_accuracy"]


def test_a_study_recreated_under_the_same_name_gets_a_new_id(tmp_path):
    first, _, _ = _setup(tmp_path)
    first_id = artifacts.study_id(first)
    optuna.delete_study(study_name=first.study_name, storage=f"sqlite:///{tmp_path / 'hpsearch.db'}")
    again, _, _ = _setup(tmp_path)
    other_db, _, _ = _setup(tmp_path, db="other.db")
    ids = {first_id, artifacts.study_id(again), artifacts.study_id(other_db)}
    assert len(ids) == 3 and all(len(i) == 32 for i in ids)
    assert artifacts.study_id(again) == again.user_attrs[artifacts.STUDY_ID_ATTR]  # stored, not made up per call


def test_a_storage_error_inside_the_trial_keeps_the_checkpoint(tmp_path, monkeypatch):
    study, store, objective = _setup(tmp_path)
    outage = sqlalchemy.exc.OperationalError("INSERT", {}, Exception("server closed the connection unexpectedly"))
    _record_reports(monkeypatch, fail_at=1, error=outage)
    trial = study.ask()
    with pytest.raises(sqlalchemy.exc.OperationalError):
        objective(trial)
    kept = artifacts.load_checkpoint(store, artifacts.checkpoint_id(artifacts.study_id(study), trial.number))
    assert kept is not None and kept["epoch"] == 0  # epoch 0 reported and saved; epoch 1's report failed


def test_a_retried_trial_resumes_after_the_dead_trials_checkpoint(tmp_path, monkeypatch):
    study, store, objective = _setup(tmp_path, epochs=4)

    class Killed(Exception):
        pass

    _record_reports(monkeypatch, fail_at=2, error=Killed())
    with pytest.raises(Killed):
        objective(study.ask())  # epochs 0 and 1 reported and checkpointed; killed reporting epoch 2
    _retry(study, 0)
    seen = _record_reports(monkeypatch)
    study.optimize(objective, n_trials=1, callbacks=[artifacts.checkpoints_after_trial(store)])
    dead, retry = study.trials
    assert retry.state == TrialState.COMPLETE, retry.user_attrs.get("error")
    assert seen == [(1, 2), (1, 3)]  # the first step the retry reports is the epoch after the checkpoint
    assert retry.user_attrs["resumed_after_epoch"] == 1
    assert retry.user_attrs["val_accuracy"][:2] == [dead.intermediate_values[0], dead.intermediate_values[1]]
    assert sorted(retry.intermediate_values) == [0, 1, 2, 3]
    checkpoint = artifacts.checkpoint_id(artifacts.study_id(study), 0)
    assert retry.user_attrs[artifacts.CHECKPOINT_ATTR] == checkpoint
    assert artifacts.load_checkpoint(store, checkpoint) is None  # removed once the retry's state was stored


def test_finished_trials_keep_only_the_best_k_checkpoints(tmp_path):
    study, store, objective = _setup(tmp_path, epochs=1, fixed=False)
    study.optimize(objective, n_trials=4, callbacks=[artifacts.checkpoints_after_trial(store, keep_best=2)])
    complete = sorted(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: (-(t.value or 0), t.number))
    assert len(complete) >= 3
    files = {p.name for p in (tmp_path / "artifacts" / "checkpoints" / artifacts.study_id(study)).iterdir()}
    assert files == {f"trial-{t.number}.pt" for t in complete[:2]}
