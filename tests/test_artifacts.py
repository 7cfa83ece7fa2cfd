"""The artifact store: --artifacts DIR | s3://bucket/prefix recorded on the study; a checkpoint's round trip through
a real run that SIGTERM ends and a second run that resumes it (S3 against moto's server, in this process)."""

from __future__ import annotations

import io
import os
import signal
import socket
from collections.abc import Iterator

import optuna
import pytest
from optuna.trial import TrialState

from hpsearch import artifacts
from tests.conftest import ONE_CONFIG_SPACE, study_text

SPACE = ONE_CONFIG_SPACE
STORAGE = "sqlite:///hpsearch.db"
_REPORT = optuna.Trial.report


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """A bucket ``hps`` on moto's S3 server on 127.0.0.1; boto3 reaches it through AWS_ENDPOINT_URL, as it would
    MinIO or any S3-compatible store."""
    pytest.importorskip("boto3", reason="needs the s3 extra: pip install 'hpsearch[s3]'")
    server_mod = pytest.importorskip("moto.server", reason="needs moto[server] (the dev extra)")
    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    client = boto3.client("s3")
    client.create_bucket(Bucket="hps")
    try:
        yield client
    finally:
        server.stop()


def _keys(client: object, prefix: str) -> list[str]:
    listing = client.list_objects_v2(Bucket="hps", Prefix=prefix)  # type: ignore[attr-defined]
    return sorted(o["Key"] for o in listing.get("Contents", []))


def _sigterm_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """SIGTERM to this process while trial 0 reports ``step``: the checkpoint then holds step - 1."""

    def report(self: optuna.Trial, value: float, at: int) -> None:
        if self.number == 0 and at == step:
            os.kill(os.getpid(), signal.SIGTERM)
        _REPORT(self, value, at)

    monkeypatch.setattr(optuna.Trial, "report", report)


@pytest.mark.parametrize("kind", ["directory", "s3"])
def test_a_checkpoint_goes_through_the_store_from_a_terminated_run_to_its_resumed_retry(
        kind, run_cli, write_study, tmp_path, monkeypatch, request):
    client = request.getfixturevalue("s3") if kind == "s3" else None
    location = "s3://hps/team/runs" if kind == "s3" else "shared-artifacts"
    recorded = location if kind == "s3" else str(tmp_path / "shared-artifacts")
    path = write_study(text=study_text(n_trials=1, epochs=4, extra='pruner = "none"', space=SPACE))
    _sigterm_at(monkeypatch, step=2)

    first = run_cli("run", str(path), "--artifacts", location)
    assert first.code == 143, first
    assert first.err.strip() == ("terminated (SIGTERM): trial 0 was marked FAIL and queued again; a worker resumes "
                                 "it from its last checkpoint")
    study = optuna.load_study(study_name="tiny", storage=STORAGE)
    assert study.user_attrs[artifacts.ARTIFACTS_ATTR] == recorded
    dead, retry = study.get_trials()
    assert (dead.state, retry.state) == (TrialState.FAIL, TrialState.WAITING)
    checkpoint = dead.user_attrs[artifacts.CHECKPOINT_ATTR]
    assert checkpoint == f"checkpoints/{study.user_attrs[artifacts.STUDY_ID_ATTR]}/trial-0.pt"
    if client is not None:
        assert _keys(client, "team/runs/") == [f"team/runs/{checkpoint}"]
    else:
        assert (tmp_path / "shared-artifacts" / checkpoint).is_file()
    assert not (tmp_path / "cache" / "artifacts").exists()  # the default store is not used

    monkeypatch.setattr(optuna.Trial, "report", _REPORT)
    second = run_cli("run", str(path))  # no --artifacts: the worker finds the store on the study
    assert second.code == 0, second
    resumed = optuna.load_study(study_name="tiny", storage=STORAGE).get_trials()[1]
    assert resumed.state == TrialState.COMPLETE, resumed.user_attrs.get("error")
    assert resumed.user_attrs["resumed_after_epoch"] == 1
    assert resumed.user_attrs["val_accuracy"][:2] == [dead.intermediate_values[0], dead.intermediate_values[1]]
    if client is not None:
        # The checkpoint is removed once the trial's final state was stored; the trial's PNGs (hpsearch.explain) stay.
        assert _keys(client, "team/runs/checkpoints/") == []
        assert len(_keys(client, "team/runs/")) == 2
    else:
        assert not (tmp_path / "shared-artifacts" / checkpoint).exists()


def test_s3_store_round_trip_and_a_missing_checkpoint(s3):
    store = artifacts.open_artifact_store("s3://hps/pre/fix/")
    artifacts.save_checkpoint(store, "checkpoints/x/trial-3.pt", {"epoch": 3, "rng": {}})
    assert _keys(s3, "pre/fix/") == ["pre/fix/checkpoints/x/trial-3.pt"]
    assert artifacts.load_checkpoint(store, "checkpoints/x/trial-3.pt") == {"epoch": 3, "rng": {}}
    artifacts.remove_checkpoint(store, "checkpoints/x/trial-3.pt")
    assert artifacts.load_checkpoint(store, "checkpoints/x/trial-3.pt") is None
    artifacts.remove_checkpoint(store, "checkpoints/x/trial-3.pt")  # twice: no error


def test_an_unreachable_bucket_is_one_line_and_exit_1(s3, run_cli, write_study):
    result = run_cli("run", str(write_study()), "--artifacts", "s3://no-such-bucket/x")
    assert result.code == 1, result
    assert result.err.startswith("error: --artifacts 's3://no-such-bucket/x': cannot reach the bucket (")
    assert len(result.err.strip().splitlines()) == 1


def test_a_directory_store_writes_atomically_into_sub_folders(tmp_path):
    store = artifacts.open_artifact_store(str(tmp_path / "a" / "b"))
    store.write("checkpoints/u/trial-0.pt", io.BytesIO(b"one"))
    store.write("checkpoints/u/trial-0.pt", io.BytesIO(b"two"))
    assert (tmp_path / "a" / "b" / "checkpoints" / "u" / "trial-0.pt").read_bytes() == b"two"
    assert [p.name for p in (tmp_path / "a" / "b" / "checkpoints" / "u").iterdir()] == ["trial-0.pt"]
    with pytest.raises(ValueError, match="Invalid artifact_id"):
        store.write("../escape.pt", io.BytesIO(b"x"))


@pytest.mark.parametrize(("value", "message"), [
    ("gs://bucket/x", "error: --artifacts: 'gs://bucket/x' is not a directory or s3://bucket[/prefix]"),
    ("s3://", "error: --artifacts: 's3://' is not a directory or s3://bucket[/prefix]"),
    ("", "error: --artifacts: the value is empty; give a directory or s3://bucket[/prefix]"),
])
def test_a_bad_artifacts_value_is_refused_before_anything_is_written(value, message, run_cli, write_study,
                                                                     tmp_path):
    result = run_cli("run", str(write_study()), "--artifacts", value)
    assert (result.code, result.err.strip()) == (2, message)
    assert not (tmp_path / "hpsearch.db").exists()


def test_a_different_artifacts_location_for_an_existing_study_is_refused(run_cli, write_study, tmp_path):
    path = write_study(n_trials=1, epochs=1, space=SPACE)
    assert run_cli("run", str(path), "--artifacts", "one").code == 0
    result = run_cli("run", str(path), "--n-trials", "2", "--artifacts", "two")
    assert result.code == 2, result
    assert result.err.strip() == (f"error: --artifacts: study 'tiny' keeps its artifacts in '{tmp_path / 'one'}', "
                                  f"not '{tmp_path / 'two'}'; leave --artifacts out to use the recorded store")
    assert len(optuna.load_study(study_name="tiny", storage=STORAGE).trials) == 1
    assert run_cli("run", str(path), "--n-trials", "2", "--artifacts", "one").code == 0  # the same one is fine


def test_the_env_variable_sets_the_store(run_cli, write_study, tmp_path, monkeypatch):
    """HPSEARCH_ARTIFACTS names the store: the running trial's checkpoint is written there, under the study's id,
    and nowhere else (not in the default <cache>/artifacts); it is removed once the trial finished."""
    store = tmp_path / "from-env"
    default = tmp_path / "cache" / "artifacts"
    monkeypatch.setenv("HPSEARCH_ARTIFACTS", str(store))
    seen: list[tuple[str, bool, list[str]]] = []

    def report(self: optuna.Trial, value: float, at: int) -> None:
        if at == 1:  # epoch 0's checkpoint is written right after its report: it is there while epoch 1 reports
            checkpoint = str(self.user_attrs.get(artifacts.CHECKPOINT_ATTR))
            seen.append((checkpoint, (store / checkpoint).is_file(),
                         sorted(str(p.relative_to(default)) for p in default.rglob("*")) if default.exists() else []))
        _REPORT(self, value, at)

    monkeypatch.setattr(optuna.Trial, "report", report)
    text = study_text(n_trials=1, epochs=2, extra='pruner = "none"', space=SPACE)
    assert run_cli("run", str(write_study(text=text))).code == 0
    study = optuna.load_study(study_name="tiny", storage=STORAGE)
    assert study.user_attrs[artifacts.ARTIFACTS_ATTR] == str(store)
    expected = artifacts.checkpoint_id(study.user_attrs[artifacts.STUDY_ID_ATTR], 0)
    assert study.trials[0].user_attrs[artifacts.CHECKPOINT_ATTR] == expected
    assert seen == [(expected, True, [])], f"while trial 0 ran (checkpoint, in {store}, in the default store): {seen}"
    assert not (store / expected).exists()  # removed once the trial's final state was stored
    assert (store / expected).parent.is_dir()
    assert not default.exists()  # the default store was never used


def test_kept_checkpoints_are_removed_with_their_study(run_cli, write_study, tmp_path):
    path = write_study(n_trials=2, epochs=1, space=SPACE)
    assert run_cli("run", str(path), "--artifacts", "store", "--keep-checkpoints", "1").code == 0
    study = optuna.load_study(study_name="tiny", storage=STORAGE)
    folder = tmp_path / "store" / "checkpoints" / study.user_attrs[artifacts.STUDY_ID_ATTR]
    assert [p.name for p in folder.iterdir()] == [f"trial-{study.best_trial.number}.pt"]  # the best one only
    assert run_cli("delete", "tiny", "--yes").code == 0
    assert list(folder.iterdir()) == []


def test_a_retry_without_a_checkpoint_repeats_the_dead_trial_exactly(run_cli, write_study, monkeypatch):
    """Killed after epoch 0's report but before its checkpoint: the retry trains from scratch, and must be the same
    run as the dead trial (its seed), or the epoch it trains again disagrees with the value already reported."""
    text = study_text(n_trials=1, epochs=3, extra='pruner = "none"', space=SPACE)
    assert run_cli("run", str(write_study("plain.toml", text=text.replace('"tiny"', '"plain"')))).code == 0
    plain = optuna.load_study(study_name="plain", storage=STORAGE).trials[0]

    def report_then_sigterm(self: optuna.Trial, value: float, at: int) -> None:
        _REPORT(self, value, at)
        if self.number == 0 and at == 0:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(optuna.Trial, "report", report_then_sigterm)
    path = write_study(text=text)
    assert run_cli("run", str(path)).code == 143
    monkeypatch.setattr(optuna.Trial, "report", _REPORT)
    assert run_cli("run", str(path)).code == 0
    dead, retry = optuna.load_study(study_name="tiny", storage=STORAGE).get_trials()
    assert dead.state == TrialState.FAIL and retry.state == TrialState.COMPLETE
    assert "resumed_after_epoch" not in retry.user_attrs  # nothing to resume from: trained from scratch
    assert retry.user_attrs["train_loss"] == plain.user_attrs["train_loss"]
    assert retry.intermediate_values == plain.intermediate_values


def test_a_sigterm_trial_is_queued_again_in_the_same_write_as_its_fail(run_cli, write_study, monkeypatch):
    """A SIGKILL right after SIGTERM (a supervisor's short grace period) must not lose the trial: its retry is stored
    with its FAIL, before any later step of the command (here: the later step that used to queue it does nothing)."""
    from hpsearch import session

    _sigterm_at(monkeypatch, step=1)
    monkeypatch.setattr(session.signals, "retry_terminated", lambda *args, **kwargs: None)
    assert run_cli("run", str(write_study(text=study_text(n_trials=1, epochs=3, extra='pruner = "none"',
                                                           space=SPACE)))).code == 143
    dead, retry = optuna.load_study(study_name="tiny", storage=STORAGE).get_trials()
    assert (dead.state, retry.state) == (TrialState.FAIL, TrialState.WAITING)
    assert retry.system_attrs["retry_history"] == [0] and retry.params == dead.params
    assert retry.intermediate_values == dead.intermediate_values  # inherited: the pruner sees the dead trial's epochs
