"""Hardening, round two (issue #27): other tools' studies, evaluate's targets, a study deleted under a run, a full
disk, malformed databases, an unreachable S3 store and a busy dashboard port. Each case: one line naming the bad
value, the README's exit code, and nothing lost or half written."""

from __future__ import annotations

import optuna
import pytest

from hpsearch import artifacts

DB = "sqlite:///hpsearch.db"


def _one_line(result, code: int) -> str:
    assert result.code == code, result
    assert result.err.startswith("error: ") and result.err.count("\n") == 1, result
    assert "Traceback" not in result.out + result.err, result
    return result.err


# ---------------------------------------------------------------- item 2: a study another tool made

@pytest.mark.parametrize("made", ["minimize, no trials", "maximize, no trials", "maximize, one trial"])
@pytest.mark.parametrize("command", ["run", "create", "worker"])
def test_a_study_made_by_another_tool_is_refused_not_taken_over(run_cli, write_study, monkeypatch, made, command):
    monkeypatch.setattr(artifacts, "STUDY_ID_WAIT_SECONDS", 0.5)
    direction = made.split(",")[0]
    foreign = optuna.create_study(study_name="tiny", storage=DB, direction=direction)
    foreign.set_user_attr("owner", "someone else")
    if "one trial" in made:
        foreign.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    path = write_study(n_trials=1, epochs=1)
    result = run_cli(command, "tiny" if command == "worker" else str(path))
    assert "'tiny' was not made by hpsearch" in _one_line(result, 2)
    after = optuna.load_study(study_name="tiny", storage=DB)
    assert after.user_attrs == {"owner": "someone else"}
    assert len(after.trials) == (1 if "one trial" in made else 0)


# ---------------------------------------------------------------- item 12: a damaged SQLite file, one rule

@pytest.mark.parametrize("keep", [0.2, 0.5, 0.9])
def test_a_truncated_sqlite_file_is_bad_input_on_every_command(run_cli, write_study, tmp_path, keep):
    study = optuna.create_study(study_name="tiny", storage="sqlite:///whole.db", direction="maximize")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    whole = (tmp_path / "whole.db").read_bytes()
    (tmp_path / "cut.db").write_bytes(whole[: int(len(whole) * keep)])
    path = write_study(n_trials=1, epochs=1)
    for command in (["run", str(path)], ["worker", "tiny"], ["show", "tiny"], ["studies"], ["evaluate", "tiny"],
                    ["export", "tiny", "--out", "x.csv"], ["report", "tiny", "--out", "r"], ["delete", "tiny", "--yes"],
                    ["create", str(path)], ["dashboard", "--port", "1"]):
        err = _one_line(run_cli(*command, "--storage", "sqlite:///cut.db"), 2)
        assert err.startswith("error: --storage: 'cut.db' is not an SQLite database, or it is damaged"), (command, err)
