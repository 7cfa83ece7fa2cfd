"""A worker killed mid-trial (SIGKILL: no cleanup at all) loses nothing: its trial is failed once its heartbeat
goes stale, retried, and the retry resumes from the dead trial's last per-epoch checkpoint."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from tests.conftest import spawn_cli, study_text

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
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            trials = optuna.load_study(study_name="tiny", storage=storage).get_trials()
        except KeyError:
            continue
        if trials and len(trials[0].intermediate_values) >= 1:
            break
    else:
        victim.kill()
        raise AssertionError(f"no epoch finished in time: {victim.communicate()}")
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    dead = optuna.load_study(study_name="tiny", storage=storage).trials[0]
    assert dead.state == TrialState.RUNNING
    epochs_done = len(dead.intermediate_values)
    assert 1 <= epochs_done < 4

    time.sleep(3)  # past the grace period: the heartbeat is stale
    survivor = spawn_cli("run", str(path), cwd=tmp_path, env=FAST_HEARTBEAT)
    out, err = survivor.communicate(timeout=300)
    assert survivor.returncode == 0, err

    trials = optuna.load_study(study_name="tiny", storage=storage).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    retry = trials[1]
    assert retry.params == dead.params
    assert retry.user_attrs["resumed_from_checkpoint"].endswith("trial-0.pt")
    assert len(retry.user_attrs["val_accuracy"]) == 4
    # the epochs the dead worker finished were not trained again: their values are the dead trial's
    assert retry.user_attrs["val_accuracy"][:epochs_done] == [dead.intermediate_values[e] for e in range(epochs_done)]
    assert retry.value == max(retry.user_attrs["val_accuracy"])
    assert not Path(retry.user_attrs["checkpoint"]).exists()  # cleaned up once the trial finished


def test_interrupted_run_leaves_no_running_trial(write_study, tmp_path: Path):
    path = write_study(text=study_text(n_trials=1, epochs=30, extra='pruner = "none"', space=SPACE,
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
    out, err = proc.communicate(timeout=60)
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
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.1)
        states = [t.state for t in optuna.load_study(study_name="tiny", storage=storage).get_trials()]
        if TrialState.RUNNING in states:
            break
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
