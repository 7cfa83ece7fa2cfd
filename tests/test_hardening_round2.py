"""Hardening, round two (issue #27): other tools' studies, evaluate's targets, a study deleted under a run, a full
disk, malformed databases, an unreachable S3 store and a busy dashboard port. Each case: one line naming the bad
value, the README's exit code, and nothing lost or half written."""

from __future__ import annotations

from pathlib import Path

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


# ---------------------------------------------------------------- items 3-5: evaluate checks its targets first

@pytest.fixture
def searched(run_cli, write_study):
    """A study with one complete trial, as `hpsearch run` leaves it."""
    assert run_cli("run", str(write_study(n_trials=1, extra='pruner = "none"'))).code == 0


def _retrains(monkeypatch) -> list[int]:
    from hpsearch import evaluate as final

    calls: list[int] = []
    real = final._retrain
    monkeypatch.setattr(final, "_retrain", lambda *a, **k: calls.append(a[4]) or real(*a, **k))
    return calls


def test_evaluate_refuses_a_read_only_save_folder_before_training(run_cli, searched, tmp_path, monkeypatch):
    from tests.test_hardening import read_only

    (tmp_path / "models").mkdir()
    calls = _retrains(monkeypatch)
    with read_only(tmp_path / "models"):
        result = run_cli("evaluate", "tiny", "--seeds", "1", "--save", "models")
    assert "--save: cannot write to the directory 'models'" in _one_line(result, 2)
    assert calls == []  # nothing trained


def test_evaluate_refuses_a_read_only_database_before_training(run_cli, searched, tmp_path, monkeypatch):
    from tests.test_hardening import read_only

    calls = _retrains(monkeypatch)
    with read_only(tmp_path / "hpsearch.db"):
        result = run_cli("evaluate", "tiny", "--seeds", "1")
    assert "study 'tiny': the database refuses to store results" in _one_line(result, 1)
    assert calls == []


def test_evaluate_save_after_an_evaluate_without_it_saves_the_stored_seeds(run_cli, searched, tmp_path, monkeypatch):
    from hpsearch import load_model

    assert run_cli("evaluate", "tiny", "--seeds", "2").code == 0
    calls = _retrains(monkeypatch)
    result = run_cli("evaluate", "tiny", "--seeds", "2", "--save", "models")
    assert result.code == 0, result
    assert calls == [0, 1]  # stored without a model: retrained with their own seeds to save them
    assert "saved 2 models in models" in result.out
    runs = optuna.load_study(study_name="tiny", storage=DB).user_attrs["evaluate:0"]["runs"]
    assert [Path(r["saved"]).name for r in runs] == ["tiny-trial0-seed0.pt", "tiny-trial0-seed1.pt"]
    for r in runs:
        load_model(r["saved"])
    # Saved now: a second --save elsewhere copies the files instead of training again.
    calls.clear()
    assert run_cli("evaluate", "tiny", "--seeds", "2", "--save", "elsewhere").code == 0
    assert calls == []
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == [
        "tiny-trial0-seed0.json", "tiny-trial0-seed0.pt", "tiny-trial0-seed1.json", "tiny-trial0-seed1.pt"]


def test_a_model_that_cannot_be_written_keeps_its_test_accuracy_and_leaves_no_partial_file(
        run_cli, searched, tmp_path, monkeypatch):
    import errno

    real_write = Path.write_bytes

    def full_disk(self: Path, data: bytes) -> int:
        if self.name.endswith(".pt.tmp"):
            real_write(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    result = run_cli("evaluate", "tiny", "--seeds", "1", "--save", "models")
    err = _one_line(result, 1)
    assert "--save: cannot write 'models/tiny-trial0-seed0.pt' (No space left on device)" in err
    assert list((tmp_path / "models").iterdir()) == []
    record = optuna.load_study(study_name="tiny", storage=DB).user_attrs["evaluate:0"]
    assert len(record["runs"]) == 1 and "saved" not in record["runs"][0]
