"""A database outage does not end a run: the run says so in one warning line, waits DB_RETRY_SECONDS and goes on, and
its trials finish once the database answers again; an outage longer than DB_OUTAGE_SECONDS ends the run (exit 1).

The outage is a storage whose writes fail the way a lost server fails them (SQLAlchemy's OperationalError, what a
PostgreSQL restart or a stopped proxy gives); the waits are shortened. The real server restart is in
tests/test_services.py, the classification of a lost proxy's gRPC error in tests/test_proxy.py.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

import hpsearch
from tests.conftest import ONE_CONFIG_SPACE, study_text

STORAGE = "sqlite:///hpsearch.db"
LOST = "server closed the connection unexpectedly"
_CREATE = optuna.storages.RDBStorage._create_new_trial  # what Optuna's ask reaches through its cache


def _shorten(monkeypatch: pytest.MonkeyPatch, **values: float) -> None:
    """Sets DB_RETRY_SECONDS / DB_OUTAGE_SECONDS wherever hpsearch holds them (the module that runs the loop may
    import them from another, and be imported lazily: every module that names them is imported first)."""
    package = Path(hpsearch.__file__).parent
    for path in package.rglob("*.py"):
        if any(name in path.read_text(encoding="utf-8") for name in values):
            parts = path.relative_to(package.parent).with_suffix("").parts
            importlib.import_module(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    for name, value in values.items():
        holders = [m for key, m in list(sys.modules.items())
                   if key.split(".")[0] == "hpsearch" and m is not None and hasattr(m, name)]
        assert holders, f"no hpsearch module defines {name}"
        for module in holders:
            monkeypatch.setattr(module, name, value)


def _failing_creates(monkeypatch: pytest.MonkeyPatch, fails: Callable[[int], bool]) -> list[int]:
    """The storage fails to create a trial (Optuna's ask, between trials) on the calls ``fails(call)`` picks, as a
    lost server fails it; returns the list of calls made so far."""
    calls: list[int] = []

    def create(self: optuna.storages.RDBStorage, *args: object, **kwargs: object) -> object:
        calls.append(len(calls))
        if fails(calls[-1]):
            raise sqlalchemy.exc.OperationalError("INSERT INTO trials ...", {}, ConnectionError(LOST))
        return _CREATE(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(optuna.storages.RDBStorage, "_create_new_trial", create)
    return calls


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning: lost the database")]


def test_the_run_waits_out_each_outage_and_finishes_its_trials(run_cli, write_study, monkeypatch):
    _shorten(monkeypatch, DB_RETRY_SECONDS=0.01)
    # Two outages: the database is lost when trial 1 and trial 2 are asked for (calls 1 and 3), and is back at the
    # next try each time.
    calls = _failing_creates(monkeypatch, lambda call: call in (1, 3))
    path = write_study(text=study_text(n_trials=3, epochs=1, extra='pruner = "none"', space=ONE_CONFIG_SPACE))
    result = run_cli("run", str(path))
    assert result.code == 0, result
    assert len(calls) == 5  # three trials made, two tries lost
    line = f"warning: lost the database ((builtins.ConnectionError) {LOST}); going on in 0.01 s"
    assert _warnings(result.err) == [line, line], result.err  # one line per outage
    trials = optuna.load_study(study_name="tiny", storage=STORAGE).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3, result  # the trials after the outages finished


def test_a_run_gives_up_after_db_outage_seconds(run_cli, write_study, monkeypatch):
    _shorten(monkeypatch, DB_RETRY_SECONDS=0.05, DB_OUTAGE_SECONDS=0.3)
    _failing_creates(monkeypatch, lambda call: call >= 1)  # lost for good after the first trial
    path = write_study(text=study_text(n_trials=3, epochs=1, extra='pruner = "none"', space=ONE_CONFIG_SPACE))
    result = run_cli("run", str(path))
    assert result.code == 1, result
    lines = result.err.strip().splitlines()
    assert lines[-1] == (f"error: the database has been unreachable for over 0.3 s ((builtins.ConnectionError) "
                         f"{LOST}); finished trials are safe, run again to resume"), result.err
    # It waited: a warning for each try, one per 0.05 s at most, until the outage had lasted DB_OUTAGE_SECONDS.
    assert lines[:-1] == _warnings(result.err) and len(lines) - 1 >= 2, result.err
    assert all(line.endswith("going on in 0.05 s") for line in lines[:-1])
    trials = optuna.load_study(study_name="tiny", storage=STORAGE).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE]  # the finished trial is safe
