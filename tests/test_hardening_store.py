"""Issue #27, items 7, 13, 14: a checkpoint that the disk cannot take, an S3 store that cannot be reached, and a
dashboard port that is taken. Each ends in one line (a warning or an error), no traceback, nothing half-written."""

from __future__ import annotations

import errno
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from hpsearch import artifacts
from hpsearch._errors import HpsearchError
from tests.conftest import ONE_CONFIG_SPACE, study_text

STORAGE = "sqlite:///hpsearch.db"
ONE_CONFIG = ONE_CONFIG_SPACE
# About 14 MB of checkpoint (a 9216 x 128 layer, Adam's two moments): far above the file-size limit of the
# subprocess test, while the database, its WAL and the trial PNGs stay far below it.
BIG_CHECKPOINT = ONE_CONFIG.replace("channels = 4", "channels = 64").replace("fc_layers = 1",
                                                                             "fc_layers = 2\nfc_width = 128")
FILE_SIZE_LIMIT = 6_000_000
_COPY = shutil.copyfileobj


def _tmp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp" in p.name]


def _study() -> optuna.Study:
    return optuna.load_study(study_name="tiny", storage=STORAGE)


def _disk_full_for_checkpoints(monkeypatch: pytest.MonkeyPatch, fail: Any) -> list[str]:
    """Writes of checkpoint temp files get half their bytes, then ENOSPC, while ``fail(n)`` (n: the checkpoint write's
    index) says so; every other copy (the trials' PNGs) goes through."""
    calls: list[str] = []

    def copy(src: Any, dst: Any, *args: Any) -> None:
        name = str(getattr(dst, "name", ""))
        if ".pt.tmp" in name:
            calls.append(name)
            if fail(len(calls) - 1):
                dst.write(src.read(100))
                raise OSError(errno.ENOSPC, "No space left on device")
        _COPY(src, dst, *args)

    monkeypatch.setattr(shutil, "copyfileobj", copy)
    return calls


# ---------------------------------------------------------------- item 7: a checkpoint the disk cannot take
def test_a_failed_checkpoint_write_leaves_the_previous_one_and_no_temp_file(tmp_path, monkeypatch):
    store = artifacts.open_artifact_store(str(tmp_path / "art"))
    artifacts.save_checkpoint(store, "checkpoints/u/trial-0.pt", {"epoch": 0})
    _disk_full_for_checkpoints(monkeypatch, lambda n: True)
    with pytest.raises(artifacts.CheckpointNotWritten) as caught:
        artifacts.save_checkpoint(store, "checkpoints/u/trial-0.pt", {"epoch": 1})
    target = tmp_path / "art" / "checkpoints" / "u" / "trial-0.pt"
    assert str(caught.value) == f"checkpoint {target} not written (No space left on device)"
    assert _tmp_files(tmp_path / "art") == []
    assert artifacts.load_checkpoint(store, "checkpoints/u/trial-0.pt") == {"epoch": 0}  # the previous one, whole


@pytest.mark.parametrize("space_back", [True, False], ids=["space-comes-back", "disk-stays-full"])
def test_a_full_disk_costs_a_trial_its_checkpoint_not_its_training(space_back, run_cli, write_study, tmp_path,
                                                                   monkeypatch):
    """The checkpoint only lets a killed worker's retry resume: the trial trains on without it (one warning line, the
    reason on the trial), and writes it again at the next epoch where the disk has room."""
    calls = _disk_full_for_checkpoints(monkeypatch, (lambda n: n == 0) if space_back else (lambda n: True))
    path = write_study(text=study_text(n_trials=2, epochs=2, extra='pruner = "none"', space=ONE_CONFIG))
    result = run_cli("run", str(path), "--artifacts", "art", "--keep-checkpoints", "5")
    assert result.code == 0, result
    assert len(calls) == 4  # every epoch of both trials tried
    study = _study()
    folder = tmp_path / "art" / "checkpoints" / study.user_attrs[artifacts.STUDY_ID_ATTR]
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    failed = [0] if space_back else [0, 1]
    warnings = result.err.strip().splitlines()
    assert warnings == [f"warning: trial {n}: checkpoint {folder / f'trial-{n}.pt'} not written (No space left on "
                        "device); the trial trains on without it (a retry would resume from an older checkpoint or "
                        "start over)" for n in failed], result
    for trial in study.trials:
        error = trial.user_attrs.get(artifacts.CHECKPOINT_ERROR_ATTR)
        assert (error is not None) == (trial.number in failed)
        if error is not None:
            assert error == f"checkpoint {folder / f'trial-{trial.number}.pt'} not written (No space left on device)"
    assert _tmp_files(tmp_path / "art") == []
    kept = sorted(p.name for p in folder.iterdir())
    assert kept == (["trial-0.pt", "trial-1.pt"] if space_back else [])
    if space_back:  # epoch 1's checkpoint was written once the disk had room again
        assert artifacts.load_checkpoint(artifacts.open_artifact_store(str(tmp_path / "art")),
                                         f"checkpoints/{folder.name}/trial-0.pt")["epoch"] == 1


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))


def test_a_checkpoint_over_the_file_size_limit_is_a_warning_in_a_real_process(write_study, tmp_path):
    path = write_study(text=study_text(n_trials=2, epochs=2, extra='pruner = "none"', space=BIG_CHECKPOINT))
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-m", "hpsearch", "run", str(path), "--artifacts", "art"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2, done.stderr
    for n, line in enumerate(lines):
        assert line.startswith(f"warning: trial {n}: checkpoint {tmp_path / 'art' / 'checkpoints'}/"), line
        assert f"/trial-{n}.pt not written (File too large); the trial trains on without it" in line
    assert [t.state for t in _study().trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert _tmp_files(tmp_path / "art") == []


# ---------------------------------------------------------------- item 13: an S3 store that cannot be reached
@pytest.fixture
def no_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    """No credentials anywhere boto3 looks (environment, files, instance metadata)."""
    pytest.importorskip("boto3", reason="needs the s3 extra: pip install 'hpsearch[s3]'")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
                "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def _serve_nothing(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    import optuna_dashboard

    served: list[Any] = []
    monkeypatch.setattr(optuna_dashboard, "run_server", lambda storage, **kw: served.append(kw))
    return served


@pytest.mark.parametrize(("case", "env", "reason"), [
    ("no credentials", {}, "Unable to locate credentials"),
    ("unreachable endpoint", {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y",
                              "AWS_ENDPOINT_URL": "http://127.0.0.1:1"},
     'Could not connect to the endpoint URL: "http://127.0.0.1:1/hps"'),
    ("missing profile", {"AWS_PROFILE": "no-such-profile"}, "The config profile (no-such-profile) could not be found"),
])
def test_an_unreachable_s3_store_is_one_line_and_not_recorded(case, env, reason, no_aws, run_cli, write_study,
                                                              tmp_path, monkeypatch):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    path = write_study(text=study_text(n_trials=1, epochs=1, space=ONE_CONFIG))
    started = time.monotonic()
    result = run_cli("run", str(path), "--artifacts", "s3://hps/team")
    assert time.monotonic() - started < 30  # the check's retries and timeouts are short
    assert result.code == 1, result
    assert result.err.strip().splitlines() == [
        f"error: --artifacts 's3://hps/team': cannot reach the bucket ({reason})"]
    assert "Traceback" not in result.err
    study = _study()
    assert artifacts.ARTIFACTS_ATTR not in study.user_attrs  # the study does not point at a store nobody can reach
    assert study.trials == []

    again = run_cli("run", str(path), "--artifacts", "local-store")
    assert again.code == 0, again
    assert _study().user_attrs[artifacts.ARTIFACTS_ATTR] == str(tmp_path / "local-store")


def test_a_malformed_bucket_name_is_bad_input(no_aws, run_cli, write_study, tmp_path):
    result = run_cli("run", str(write_study()), "--artifacts", "s3://my bucket!/x")
    assert (result.code, result.err.strip()) == (2, "error: --artifacts: 's3://my bucket!/x': 'my bucket!' is not "
                                                    "a bucket name (letters, digits, '.', '-', '_')")
    assert not (tmp_path / "hpsearch.db").exists()


def test_the_dashboard_starts_without_a_recorded_store_it_cannot_reach(no_aws, run_cli, write_study, tmp_path,
                                                                       monkeypatch):
    """A study recorded its S3 store, which is unreachable now (or was recorded by an older hpsearch): the dashboard
    still serves the studies, and says in one line whose images will be missing."""
    assert run_cli("run", str(write_study(text=study_text(n_trials=1, epochs=1, space=ONE_CONFIG)))).code == 0
    _study().set_user_attr(artifacts.ARTIFACTS_ATTR, "s3://hps/team")
    served = _serve_nothing(monkeypatch)
    result = run_cli("dashboard", "--storage", STORAGE, "--port", "8731")
    assert result.code == 0, result
    assert result.err.strip().splitlines() == [
        "warning: artifacts in 's3://hps/team': cannot reach the bucket (Unable to locate credentials); the dashboard "
        "shows the trials kept there without their images"]
    assert "optuna-dashboard on http://127.0.0.1:8731/dashboard" in result.out
    assert len(served) == 1 and served[0]["artifact_store"] is not None
    assert "s3://hps/team" not in result.out  # not among the stores it reads


# ---------------------------------------------------------------- item 14: a dashboard port that is taken
def test_a_taken_dashboard_port_is_one_line_before_serving(run_cli, tmp_path):
    optuna.create_study(study_name="tiny", storage=STORAGE)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("dashboard", "--storage", STORAGE, "--port", str(port))
    assert result.code == 1, result
    assert result.err.strip().splitlines() == [
        f"error: --port {port}: cannot listen on 127.0.0.1:{port} (Address already in use)"]
    assert "optuna-dashboard on" not in result.out


def test_a_dashboard_port_with_closed_connections_is_free(run_cli, tmp_path, monkeypatch):
    """The check binds as the server does (SO_REUSEADDR): connections left in TIME_WAIT by a dashboard stopped a
    moment ago do not refuse the port, which the server could take."""
    optuna.create_study(study_name="tiny", storage=STORAGE)
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = server.accept()
        conn.close()  # the server's side closes first: its end of the connection stays in TIME_WAIT
        client.recv(1)
        client.close()
    served = _serve_nothing(monkeypatch)
    result = run_cli("dashboard", "--storage", STORAGE, "--port", str(port))
    assert result.code == 0, result
    assert len(served) == 1


def test_the_s3_store_check_uses_a_short_timeout(no_aws, monkeypatch):
    """The reachability check gives up in seconds; the store's own client keeps boto3's retries for checkpoints."""
    import boto3

    configs: list[Any] = []
    real = boto3.session.Session.client

    def client(self: Any, *args: Any, **kwargs: Any) -> Any:
        configs.append(kwargs.get("config"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(boto3.session.Session, "client", client)
    with pytest.raises(HpsearchError):
        artifacts.open_artifact_store("s3://hps/x")
    check = configs[0]
    assert check is not None and check.connect_timeout <= 5 and check.retries["total_max_attempts"] <= 2
