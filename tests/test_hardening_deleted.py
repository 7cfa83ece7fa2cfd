"""A study deleted while a run trains it (``hpsearch delete NAME --yes`` in another terminal, ``optuna.delete_study``)
ends the run with one line of error, exit 1, no traceback: between epochs, after an epoch was stored, between trials,
and in a real second process. A study deleted and made again under the same name gets none of this run's trials."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from hpsearch import _display, objective
from tests.conftest import ONE_CONFIG_SPACE, spawn_cli, study_text
from tests.test_services import pg_url  # noqa: F401  (a fixture: a fresh PostgreSQL database, skips without one)

SQLITE = "sqlite:///hpsearch.db"
MESSAGE = "error: study 'tiny' was deleted while this run trained it"


def _assert_one_error(out: str, err: str, *, replaced: bool = False) -> None:
    assert "Traceback" not in out + err, err
    errors = [line for line in (out + err).splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert errors[0].startswith(MESSAGE), errors
    assert errors[0].endswith("nothing more to store")
    assert ("a new study has its name now" in errors[0]) == replaced


def _during_first_epoch(monkeypatch: pytest.MonkeyPatch, action: Callable[[], Any]) -> None:
    """``action`` runs once, while the first trial trains its first epoch (before that epoch is reported)."""
    real_fit = objective.fit
    done: list[bool] = []

    def fit(*args: Any, on_epoch: Any = None, **kwargs: Any) -> Any:
        def hooked(epoch: int, result: Any) -> None:
            if not done:
                done.append(True)
                action()
            on_epoch(epoch, result)

        return real_fit(*args, on_epoch=hooked, **kwargs)

    monkeypatch.setattr(objective, "fit", fit)


def _delete(storage: str = SQLITE) -> None:
    optuna.delete_study(study_name="tiny", storage=storage)


def test_study_deleted_while_a_trial_trains_ends_the_run_with_one_line(run_cli, write_study, monkeypatch):
    write_study(text=study_text(epochs=3, n_trials=3, space=ONE_CONFIG_SPACE))
    _during_first_epoch(monkeypatch, _delete)
    r = run_cli("run", "study.toml")
    assert r.code == 1, r
    _assert_one_error(r.out, r.err)
    assert optuna.get_all_study_names(SQLITE) == []  # nothing made again


def test_study_deleted_just_after_an_epoch_was_stored(run_cli, write_study, monkeypatch):
    # Optuna's own storing of the trial fails now (KeyError, then UnboundLocalError from its clean-up).
    write_study(text=study_text(epochs=3, n_trials=3, space=ONE_CONFIG_SPACE))
    real = _display.RunDisplay.epoch

    def epoch(self: _display.RunDisplay, *args: Any) -> None:
        real(self, *args)
        if optuna.get_all_study_names(SQLITE):
            _delete()

    monkeypatch.setattr(_display.RunDisplay, "epoch", epoch)
    r = run_cli("run", "study.toml")
    assert r.code == 1, r
    _assert_one_error(r.out, r.err)


def test_study_deleted_between_trials_ends_the_run_before_the_next(run_cli, write_study, monkeypatch):
    write_study(text=study_text(epochs=1, n_trials=3, space=ONE_CONFIG_SPACE))
    real = _display.RunDisplay.trial_end

    def trial_end(self: _display.RunDisplay, study: optuna.Study, trial: Any) -> None:
        real(self, study, trial)
        _delete()

    monkeypatch.setattr(_display.RunDisplay, "trial_end", trial_end)
    r = run_cli("run", "study.toml")
    assert r.code == 1, r
    _assert_one_error(r.out, r.err)
    assert r.out.count("COMPLETE") == 1  # the first trial ended; no second was started


def test_a_study_made_again_under_the_name_gets_none_of_this_runs_trials(run_cli, write_study, monkeypatch):
    write_study(text=study_text(epochs=3, n_trials=3, space=ONE_CONFIG_SPACE))
    theirs: list[optuna.trial.Trial] = []

    def replace() -> None:
        _delete()
        # Someone else's study of the same name, with a trial running: SQLite gives both the freed ids again.
        study = optuna.create_study(study_name="tiny", storage=SQLITE)
        theirs.append(study.ask())

    _during_first_epoch(monkeypatch, replace)
    r = run_cli("run", "study.toml")
    assert r.code == 1, r
    _assert_one_error(r.out, r.err, replaced=True)
    (trial,) = optuna.load_study(study_name="tiny", storage=SQLITE).get_trials()
    assert trial.number == theirs[0].number
    assert trial.state == TrialState.RUNNING
    assert trial.user_attrs == {} and trial.intermediate_values == {} and trial.params == {}


@pytest.mark.services
def test_study_deleted_while_a_trial_trains_on_postgresql(run_cli, write_study, monkeypatch, pg_url):  # noqa: F811
    write_study(text=study_text(epochs=3, n_trials=3, space=ONE_CONFIG_SPACE))
    _during_first_epoch(monkeypatch, lambda: _delete(pg_url))
    r = run_cli("run", "study.toml", "--storage", pg_url)
    assert r.code == 1, r
    _assert_one_error(r.out, r.err)


# Epochs long enough that the deleting process acts while one trains.
SLOW_SPACE = """
[space]
conv_layers = 2
channels = 32
padding = "same"
stride = 1
fc_layers = 1
batch_size = 16
optimizer = "adam"
"""


def _delete_mid_run(write_study: Callable[..., Path], tmp_path: Path, *args: str) -> tuple[int, str, str]:
    """``hpsearch run ARGS`` in a real process, and ``hpsearch delete tiny --yes`` once an epoch is stored."""
    # More trials and epochs than the run could finish before the deletion: it always lands mid-run.
    path = write_study(text=study_text(epochs=20, n_trials=100, space=SLOW_SPACE,
                                       dataset='dataset = "synthetic:classes=3,size=16,train=1024,test=32"'))
    proc = spawn_cli("run", str(path), "--no-artifacts", *args, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            time.sleep(0.2)
            try:
                trials = optuna.load_study(study_name="tiny", storage=SQLITE).get_trials()
            except KeyError:
                continue
            if any(t.state == TrialState.RUNNING and t.intermediate_values for t in trials):
                break
        else:
            raise AssertionError("no epoch finished in time")
        deleted = spawn_cli("delete", "tiny", "--yes", cwd=tmp_path)
        _, err = deleted.communicate(timeout=120)
        assert deleted.returncode == 0, err
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, err


def test_hpsearch_delete_from_another_process_ends_the_run(write_study, tmp_path: Path):  # two processes: ~7 s
    code, out, err = _delete_mid_run(write_study, tmp_path)
    assert code == 1, err
    _assert_one_error(out, err)


@pytest.mark.slow  # three real processes and a launcher (~20 s on the shared 2-core machine)
def test_every_worker_ends_with_the_same_line_and_the_launcher_with_one(write_study, tmp_path: Path):
    code, out, err = _delete_mid_run(write_study, tmp_path, "--workers", "2")
    assert code == 1, err
    _assert_one_error(out, err)  # the launcher's own line; each worker's is relayed with its prefix
    for w in ("[w0 cpu] ", "[w1 cpu] "):
        assert [line for line in out.splitlines() if line.startswith(w + "error:")] == [
            f"{w}{MESSAGE}; nothing more to store"], out
