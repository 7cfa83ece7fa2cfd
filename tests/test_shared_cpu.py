"""A busy machine: ``max_seconds_per_epoch`` is measured on the cost clock (CPU time, not the wall clock), so
CPU-bound processes beside a run do not get the study's own configuration refused or pruned for time (issue #23:
the enqueued CNN of ``make run`` was pruned at 275.6 s per epoch beside other work, 13 s idle). Real processes:
``python -m hpsearch run`` beside busy processes, with its threads fixed (--threads 2: OMP_WAIT_POLICY=PASSIVE set
before torch loads) and by default (OpenMP's own policy; LoadAwareThreads makes way)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import optuna
import pytest

from tests.conftest import spawn_cli, study_text

SPACE = """
[space]
conv_layers = 2
channels = 24
padding = "same"
stride = 1
pool = "max"
fc_layers = 1
batch_size = 64
optimizer = "adam"
augmentation = "none"
"""
DATA = 'dataset = "synthetic:classes=3,size=24,train=2500,test=32"'


def _run(tmp_path, name: str, extra: str, threads: list[str], timeout: float = 300) -> optuna.trial.FrozenTrial:
    path = tmp_path / f"{name}.toml"
    path.write_text(study_text(name=name, n_trials=1, epochs=2, dataset=DATA, space=SPACE,
                               extra=f'pruner = "none"\n{extra}'))
    proc = spawn_cli("run", str(path), *threads, "--no-artifacts", cwd=tmp_path)
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, (out, err)
    trials = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'hpsearch.db'}").trials
    assert len(trials) == 1, [(t.state, t.user_attrs) for t in trials]
    [trial] = trials
    return trial


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs 2 cores to run 2 training threads beside busy processes")
@pytest.mark.parametrize("threads", [["--threads", "2"], []], ids=["fixed-threads", "default-threads"])
def test_busy_processes_beside_a_run_do_not_get_its_configuration_refused_for_time(tmp_path, threads) -> None:
    idle = _run(tmp_path, "idle", "", threads)
    # Above what an epoch costs, with room. From the cost clock, not the wall clock: this machine may be busy with
    # something else already (then the "idle" wall time is inflated too, and a cap from it would test nothing).
    cap = 3 * idle.user_attrs["cost_seconds_per_epoch"]
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(3 * len(os.sched_getaffinity(0)))]
    try:
        time.sleep(0.5)
        busy = _run(tmp_path, "busy", f"max_seconds_per_epoch = {cap:.3f}", threads)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    # The wall clock said the machine was far slower: a cap on it would have refused or pruned the trial ...
    assert busy.user_attrs["seconds_per_epoch"] > cap, (busy.user_attrs, cap)
    # ... the cost clock did not: the trial trained both epochs and is complete
    assert busy.state == optuna.trial.TrialState.COMPLETE, busy.user_attrs
    assert "rejected" not in busy.user_attrs and "over_cost" not in busy.user_attrs
    assert busy.user_attrs["estimated_seconds_per_epoch"] <= cap


@pytest.mark.parametrize(("given", "threads", "expected"), [
    (None, [], "None"),  # OpenMP's own policy: fastest alone; LoadAwareThreads makes way for a neighbour
    (None, ["--threads", "2"], "PASSIVE"),  # fixed threads: waiting ones sleep
    ("ACTIVE", ["--threads", "2"], "ACTIVE"),  # a user's own value wins
])
def test_fixed_threads_make_waiting_threads_sleep_before_torch_loads(tmp_path, given, threads, expected) -> None:
    """OpenMP reads OMP_WAIT_POLICY once, when torch loads it: the CLI sets it first where --threads fixes them."""
    code = ("import os, sys\n"
            f"sys.argv = ['hpsearch', 'evaluate', 'x', '--storage', 'sqlite:///missing.db', *{threads!r}]\n"
            "from hpsearch import cli\n"
            "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
            "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.split()[0] == expected
