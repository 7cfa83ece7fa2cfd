"""A study file's target ends the study once a complete trial reaches it (every worker, at its next trial), and its
warm start enqueues the best configurations of earlier studies that fit its space (issue #26)."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import ONE_CONFIG_SPACE, spawn_cli, study_text

DB = "sqlite:///hpsearch.db"
SPACE = """
[space]
padding = "same"
stride = 1
conv_layers = 1
channels = [4, 8]
fc_layers = 1
batch_size = 32
optimizer = "adam"
"""


def _complete(name: str = "tiny") -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=DB).get_trials(states=(TrialState.COMPLETE,))


# ---------------------------------------------------------------- target

def test_a_reached_target_ends_the_study(run_cli, write_study):
    # Any trained trial beats 1% accuracy: the first complete trial reaches the target.
    path = write_study(n_trials=6, epochs=1, extra='target = 0.01\npruner = "none"', space=ONE_CONFIG_SPACE)
    result = run_cli("run", str(path))
    assert result.code == 0, result
    assert len(optuna.load_study(study_name="tiny", storage=DB).trials) == 1
    assert "target 0.0100 reached by trial 0" in result.out
    show = run_cli("show", "tiny")
    assert "target" in show.out and "0.0100, reached by trial 0" in show.out
    # A study that has reached its target runs nothing more, whatever n_trials says.
    again = run_cli("run", str(path), "--n-trials", "10")
    assert again.code == 0 and len(optuna.load_study(study_name="tiny", storage=DB).trials) == 1
    assert run_cli("report", "tiny", "--out", "r").code == 0
    from pathlib import Path

    assert "target: 0.0100, reached by trial 0" in Path("r/summary.md").read_text()


def test_another_workers_trial_reaching_the_target_stops_this_worker(run_cli, write_study, monkeypatch):
    from hpsearch import _display

    path = write_study(n_trials=8, epochs=1, extra='target = 0.999\npruner = "none"', space=ONE_CONFIG_SPACE)
    real_end = _display.RunDisplay.trial_end

    def trial_end(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.number == 1:  # meanwhile, another worker's trial completes at the target
            other = optuna.trial.create_trial(params=trial.params, distributions=trial.distributions, value=1.0)
            study.add_trial(other)
        real_end(self, study, trial)

    monkeypatch.setattr(_display.RunDisplay, "trial_end", trial_end)
    result = run_cli("run", str(path))
    assert result.code == 0, result
    trials = optuna.load_study(study_name="tiny", storage=DB).trials
    assert len(trials) == 3  # trials 0 and 1 of this worker, and the other worker's: nothing after it
    assert "target 0.9990 reached by trial 2 (1.0000)" in result.out


@pytest.mark.slow
def test_a_target_reached_by_one_of_several_workers_stops_them_all(write_study, tmp_path):
    path = write_study(n_trials=40, epochs=1, extra='target = 0.01\npruner = "none"', space=ONE_CONFIG_SPACE)
    proc = spawn_cli("run", str(path), "--workers", "2", cwd=tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    # Each worker stops at its next trial once any trial has reached the target: at most one trial each.
    assert 1 <= len(optuna.load_study(study_name="tiny", storage=DB).trials) <= 2, out


def test_target_must_be_an_accuracy(run_cli, write_study):
    result = run_cli("run", str(write_study(extra="target = 1.5")))
    assert result.code == 2 and "target = 1.5 must be a validation accuracy with 0 < target <= 1" in result.err


# ---------------------------------------------------------------- warm start

@pytest.fixture
def source(run_cli, write_study) -> None:
    """Study 'src': two complete trials, channels 4 (fits [4, 8]) and 16 (does not)."""
    rows = "".join(f"\n[[enqueue]]\nchannels_0 = {c}\n" for c in (16, 4))  # run first, in this order
    text = study_text("src", n_trials=2, epochs=1, extra='pruner = "none"',
                      space=SPACE.replace("[4, 8]", "[4, 16]")) + rows
    assert run_cli("run", str(write_study("src.toml", text=text))).code == 0
    assert len(_complete("src")) == 2


def test_warm_start_enqueues_what_fits_and_lists_what_does_not(run_cli, write_study, source):
    path = write_study(n_trials=2, epochs=1, extra='warm_start = { studies = ["src"], top = 5 }\npruner = "none"',
                       space=SPACE)
    result = run_cli("run", str(path))
    assert result.code == 0, result
    assert "warm start: 1 configurations of earlier studies enqueued first (src#1)" in result.out
    assert "warm start: skipped src#0: channels_0 = 16 is outside this study's space for 'channels'" in result.out
    first = optuna.load_study(study_name="tiny", storage=DB).trials[0]
    assert first.params["channels_0"] == 4 and first.user_attrs["warm_start"] == "src#1"


def test_warm_start_top_limits_each_study(run_cli, write_study, source):
    path = write_study(n_trials=1, epochs=1, extra='warm_start = { studies = ["src"], top = 1 }', space=SPACE)
    assert run_cli("create", str(path)).code == 0
    waiting = optuna.load_study(study_name="tiny", storage=DB).get_trials(states=(TrialState.WAITING,))
    assert [t.user_attrs["warm_start"] for t in waiting] == ["src#1"]


def test_warm_start_from_a_missing_study_creates_nothing(run_cli, write_study, source):
    path = write_study(extra='warm_start = { studies = ["src", "nope"] }', space=SPACE)
    result = run_cli("run", str(path))
    assert result.code == 2 and result.err.count("\n") == 1, result
    assert "warm_start.studies: study 'nope' does not exist in this storage; studies: src" in result.err
    assert optuna.get_all_study_names(DB) == ["src"]


@pytest.mark.parametrize(("value", "rule"), [
    ('{ studies = [] }', "warm_start.studies = [] must be a non-empty list of study names"),
    ('{ studies = ["tiny"] }', "names this study ('tiny') itself"),
    ('{ studies = ["a"], top = 0 }', "warm_start.top = 0 must be an integer with 1 <= top <= 1000"),
    ('{ studies = ["a"], from = "x" }', "warm_start.from = \"x\" is not a key of warm_start"),
    ('"src"', "must be a table such as"),
])
def test_bad_warm_start_is_one_line(run_cli, write_study, value, rule):
    result = run_cli("run", str(write_study(extra=f"warm_start = {value}")))
    assert result.code == 2 and result.err.count("\n") == 1 and rule in result.err, result
