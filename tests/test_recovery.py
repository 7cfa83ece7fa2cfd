"""A worker killed mid-trial (SIGKILL: no cleanup at all) loses nothing: its trial is failed once its heartbeat
goes stale, retried, and the retry resumes from the dead trial's last per-epoch checkpoint."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import ONE_CONFIG_SPACE, spawn_cli, study_text

FAST_HEARTBEAT = {"HPSEARCH_HEARTBEAT_SECONDS": "1", "HPSEARCH_GRACE_SECONDS": "2"}
# Big enough that one epoch takes a noticeable fraction of a second on a CPU.
SPACE = """
[space]
conv_layers = 2
channels = 16
padding = "same"
stride = 1
fc_layers = 1
batch_size = 32
augmentation = "base"
"""


def test_killed_worker_trial_is_retried_and_resumes_from_its_checkpoint(write_study, tmp_path: Path):
    path = write_study(text=study_text(n_trials=1, epochs=4, extra='pruner = "none"', space=SPACE,
                                       dataset='dataset = "synthetic:size=24,train=1200"'))
    storage = "sqlite:///hpsearch.db"
    victim = spawn_cli("run", str(path), cwd=tmp_path, env=FAST_HEARTBEAT)
    _wait_for_epoch(victim, storage, epochs=2)  # 2 reported: epoch 0's checkpoint (written after its report) exists
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    dead = optuna.load_study(study_name="tiny", storage=storage).trials[0]
    assert dead.state == TrialState.RUNNING
    epochs_done = len(dead.intermediate_values)
    assert 2 <= epochs_done < 4

    time.sleep(3)  # past the grace period: the heartbeat is stale
    survivor = spawn_cli("run", str(path), cwd=tmp_path, env=FAST_HEARTBEAT)
    out, err = survivor.communicate(timeout=300)
    assert survivor.returncode == 0, err

    trials = optuna.load_study(study_name="tiny", storage=storage).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    retry = trials[1]
    assert retry.params == dead.params
    # the checkpoint follows the report: a kill between the two leaves the previous epoch's
    assert retry.user_attrs["resumed_after_epoch"] in (epochs_done - 2, epochs_done - 1)
    assert len(retry.user_attrs["val_accuracy"]) == 4
    # the epochs the dead worker finished were not trained again: their values are the dead trial's
    assert retry.user_attrs["val_accuracy"][:epochs_done] == [dead.intermediate_values[e] for e in range(epochs_done)]
    assert retry.value == max(retry.user_attrs["val_accuracy"])
    # in the default store (<cache>/artifacts), removed once the trial finished
    assert retry.user_attrs["checkpoint"].endswith("/trial-0.pt")
    assert not (tmp_path / "cache" / "artifacts" / retry.user_attrs["checkpoint"]).exists()
    assert (tmp_path / "cache" / "artifacts" / "checkpoints").is_dir()


def test_interrupted_run_leaves_no_running_trial(write_study, tmp_path: Path):
    path = write_study(text=study_text(n_trials=1, epochs=500, extra='pruner = "none"', space=SPACE,
                                       dataset='dataset = "synthetic:size=24,train=2000"'))
    proc = spawn_cli("run", str(path), cwd=tmp_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            trials = optuna.load_study(study_name="tiny", storage="sqlite:///hpsearch.db").get_trials()
        except KeyError:
            continue
        if trials and trials[0].intermediate_values:
            break
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    out, err = proc.communicate(timeout=180)  # generous: a loaded CI machine once took over 60 s here
    assert proc.returncode == 130, err
    # One line: neither Optuna's "Trial 0 failed ... KeyboardInterrupt()" warning nor its traceback.
    assert err == "interrupted: the running trial was marked FAIL; run the same command to resume\n"
    assert "study tiny" in out  # the summary is still printed
    trials = optuna.load_study(study_name="tiny", storage="sqlite:///hpsearch.db").get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL]
    # Resuming goes on past the failed trial (one epoch here, hence --force, to keep the test short).
    short = write_study("short.toml", text=study_text(n_trials=1, epochs=1, extra='pruner = "none"', space=SPACE,
                                                      dataset='dataset = "synthetic:size=24,train=2000"'))
    resumed = spawn_cli("run", str(short), "--force", cwd=tmp_path)
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    trials = optuna.load_study(study_name="tiny", storage="sqlite:///hpsearch.db").get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]


def test_dead_workers_trial_does_not_stay_running_in_a_finished_study(write_study, tmp_path: Path):
    path = write_study(text=study_text(n_trials=1, epochs=3, extra='pruner = "none"', space=SPACE,
                                       dataset='dataset = "synthetic:size=24,train=1200"'))
    assert spawn_cli("run", str(path), cwd=tmp_path).wait(timeout=120) == 0
    victim = spawn_cli("run", str(path), "--n-trials", "2", cwd=tmp_path, env=FAST_HEARTBEAT)
    storage = "sqlite:///hpsearch.db"
    # After its first report, so its heartbeat is recorded: Optuna never finds a trial stale that has no heartbeat
    # yet (a worker killed in its trial's first milliseconds leaves it RUNNING; seen once in CI).
    _wait_for_epoch(victim, storage)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    time.sleep(3)  # past the grace period
    done = spawn_cli("run", str(path), cwd=tmp_path, env=FAST_HEARTBEAT)  # target 1: nothing to run
    out, err = done.communicate(timeout=120)
    assert done.returncode == 0, err
    assert "nothing to run" in out
    states = [t.state for t in optuna.load_study(study_name="tiny", storage=storage).get_trials()]
    assert TrialState.RUNNING not in states
    assert states[:2] == [TrialState.COMPLETE, TrialState.FAIL]  # (+ its retry, WAITING for a later run)


def _wait_for_epoch(proc, storage: str, *, running: int = 1, epochs: int = 1) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            trials = optuna.load_study(study_name="tiny", storage=storage).get_trials()
        except KeyError:
            continue
        if sum(t.state == TrialState.RUNNING and len(t.intermediate_values) >= epochs for t in trials) >= running:
            return
    proc.kill()
    raise AssertionError(f"no epoch finished in time: {proc.communicate()}")


# Epochs of a few tens of milliseconds: the SIGTERM tests measure the signal path, not training.
TINY_FIXED = ONE_CONFIG_SPACE


@pytest.mark.slow  # two real processes (~1 min on a shared 2-core machine); test_artifacts has an in-process one
def test_sigterm_fails_the_trial_queues_its_retry_and_exits_143(write_study, tmp_path: Path):
    path = write_study(text=study_text(n_trials=1, epochs=40, extra='pruner = "none"', space=TINY_FIXED,
                                       dataset='dataset = "synthetic:size=12,train=300"'))
    storage = "sqlite:///hpsearch.db"
    victim = spawn_cli("run", str(path), cwd=tmp_path)
    _wait_for_epoch(victim, storage, epochs=2)
    sent = time.monotonic()
    victim.send_signal(signal.SIGTERM)  # what docker stop and a Kubernetes pod deletion send
    out, err = victim.communicate(timeout=30)
    assert time.monotonic() - sent < 10  # within a few seconds, not at the end of the trial
    assert victim.returncode == 143, err
    assert err.strip().splitlines() == ["terminated (SIGTERM): trial 0 was marked FAIL and queued again; a worker "
                                        "resumes it from its last checkpoint"]
    dead, retry = optuna.load_study(study_name="tiny", storage=storage).get_trials()
    assert dead.state == TrialState.FAIL
    assert retry.state == TrialState.WAITING
    assert retry.system_attrs["failed_trial"] == 0 and retry.system_attrs["retry_history"] == [0]
    assert retry.params == dead.params
    epochs_done = len(dead.intermediate_values)
    assert (tmp_path / "cache" / "artifacts" / dead.user_attrs["checkpoint"]).is_file()  # kept for the retry

    survivor = spawn_cli("run", str(path), cwd=tmp_path)  # another worker takes the retry and resumes it
    out, err = survivor.communicate(timeout=300)
    assert survivor.returncode == 0, err
    trials = optuna.load_study(study_name="tiny", storage=storage).get_trials()
    resumed = trials[1]
    assert resumed.state == TrialState.COMPLETE, resumed.user_attrs.get("error")
    assert resumed.user_attrs["resumed_after_epoch"] in (epochs_done - 2, epochs_done - 1)
    assert resumed.user_attrs["val_accuracy"][:epochs_done] == [dead.intermediate_values[e]
                                                                for e in range(epochs_done)]


@pytest.mark.slow  # three real processes
def test_workers_parent_forwards_sigterm_to_its_workers(write_study, tmp_path: Path):
    path = write_study(text=study_text(n_trials=2, epochs=400, extra='pruner = "none"', space=TINY_FIXED,
                                       dataset='dataset = "synthetic:size=12,train=300"'))
    storage = "sqlite:///hpsearch.db"
    parent = spawn_cli("run", str(path), "--workers", "2", "--device", "cpu", cwd=tmp_path)
    _wait_for_epoch(parent, storage, running=2)
    parent.send_signal(signal.SIGTERM)  # to the parent only, as docker stop does
    out, err = parent.communicate(timeout=60)
    assert parent.returncode == 143, (out, err)
    assert out.count("terminated (SIGTERM): trial ") == 2  # one line from each worker, relayed
    trials = optuna.load_study(study_name="tiny", storage=storage).get_trials()
    assert sorted(t.state.name for t in trials) == ["FAIL", "FAIL", "WAITING", "WAITING"]


def test_a_trial_failed_as_stale_while_its_worker_was_cut_off_does_not_end_the_run(tmp_path: Path):
    """Seen in the chaos test's PostgreSQL restart: a worker's heartbeats fail during the outage, another worker
    fails its trial as stale (and queues the retry), and when the first worker finishes the trial Optuna refuses
    to store its result ("Cannot tell a FAIL trial"). The worker says so and goes on with the next trial."""
    from hpsearch.study import run_trials

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    study = optuna.create_study(storage=url, study_name="s")
    other_worker = optuna.load_study(storage=url, study_name="s")

    def objective(trial: optuna.Trial) -> float:
        if trial.number == 0:
            other_worker.tell(trial.number, state=TrialState.FAIL)  # what a stale-trial check elsewhere does
        return trial.suggest_float("x", 0, 1)

    taken_over: list[bool] = []
    outcome = run_trials(study, objective, n_trials=2, timeout=None, on_taken_over=lambda: taken_over.append(True))
    assert taken_over == [True]
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert not outcome.interrupted and outcome.error is None
