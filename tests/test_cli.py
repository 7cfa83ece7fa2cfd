"""The CLI end to end on synthetic data: run to the trial count, prune, resume, concurrent processes on one
SQLite file, show/export against the database, delete, workers joining by name."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpsearch._display import lead
from tests.conftest import spawn_cli

STORAGE = "sqlite:///hpsearch.db"


def _study(name: str = "tiny") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=STORAGE)


def test_run_reaches_trial_count_and_stores_what_each_trial_did(run_cli, write_study):
    result = run_cli("run", str(write_study(n_trials=3, extra='pruner = "none"')))
    assert result.code == 0, result
    trials = _study().get_trials()
    assert [t.number for t in trials] == [0, 1, 2]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    t = trials[0]
    assert t.value == max(t.user_attrs["val_accuracy"])
    assert len(t.user_attrs["train_loss"]) == len(t.user_attrs["val_accuracy"]) == 2
    assert t.intermediate_values == dict(enumerate(t.user_attrs["val_accuracy"]))
    assert t.user_attrs["device"] == "cpu" and t.user_attrs["param_count"] > 0
    assert t.user_attrs["seconds_per_epoch"] > 0 and t.user_attrs["best_epoch"] in (0, 1)
    assert t.user_attrs["config"]["train"]["epochs"] == 2
    assert "best value" in result.out and "complete 3" in result.out
    # the summary weighs the best trial's lead against the validation split it was measured on
    val_images = int(re.search(r"/ (\d+) val images", result.out).group(1))
    assert _study().user_attrs["val_images"] == val_images
    assert re.search(rf"lead[\s│]+\+0\.\d{{4}} over trial \d.*on {val_images:,} images", result.out), result.out


def test_lead_says_when_the_best_trial_wins_within_validation_noise():
    def trial(number: int, value: float) -> FrozenTrial:
        t = optuna.trial.create_trial(value=value)
        t.number = number
        return t

    # Fashion-MNIST, study seed 1: the sampled trial 15 led the prior by 0.0012 on 6,000 images, and tested lower
    close = lead(trial(15, 0.9470), trial(0, 0.9458), 6000)
    assert close.startswith("+0.0012 over trial 0 (0.9458): 0.4 standard errors") and "(0.0029 on 6,000" in close
    assert "within validation noise" in close
    far = lead(trial(24, 0.9472), trial(12, 0.9400), 6000)
    assert "2.5 standard errors" in far and "beyond one standard error" in far
    assert lead(trial(3, 0.95), trial(1, 0.94), None) == "+0.0100 over trial 1 (0.9400)"  # a study from before


def test_aggressive_pruner_prunes(run_cli, write_study):
    extra = 'pruner = { type = "percentile", percentile = 90.0, n_startup_trials = 1, n_warmup_steps = 0 }'
    assert run_cli("run", str(write_study(n_trials=6, epochs=3, extra=extra))).code == 0
    states = [t.state for t in _study().get_trials()]
    assert len(states) == 6
    assert TrialState.PRUNED in states


def test_resume_adds_trials_and_a_finished_study_runs_nothing(run_cli, write_study):
    path = write_study(n_trials=2)
    assert run_cli("run", str(path)).code == 0
    again = run_cli("run", str(path))
    assert again.code == 0
    assert "study 'tiny' already holds 2 finished trials (target 2); nothing to run." in again.out
    assert len(_study().get_trials()) == 2
    more = run_cli("run", str(path), "--n-trials", "4")
    assert more.code == 0, more
    assert [t.number for t in _study().get_trials()] == [0, 1, 2, 3]


def test_enqueued_params_run_first(run_cli, write_study):
    path = write_study(n_trials=1, space="[space]\nconv_layers = [1, 2]\n\n[[enqueue]]\nconv_layers = 2\n"
                       "channels_0 = 5\nchannels_1 = 7\nfc_layers = 1\n")
    assert run_cli("run", str(path)).code == 0
    params = _study().trials[0].params
    assert (params["conv_layers"], params["channels_0"], params["channels_1"], params["fc_layers"]) == (2, 5, 7, 1)


def test_two_processes_share_one_sqlite_file(write_study, tmp_path: Path):
    path = write_study(n_trials=8, epochs=1)
    procs = [spawn_cli("run", str(path), cwd=tmp_path) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
        assert "locked" not in err.lower() and "Traceback" not in err
    trials = _study().get_trials()
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    # Each process stops at the study's total; the other may finish the one trial it already had running.
    assert 8 <= len(finished) <= 9
    assert all(t.state != TrialState.RUNNING for t in trials)


def test_worker_joins_by_name(run_cli, write_study):
    assert run_cli("run", str(write_study(n_trials=1))).code == 0
    result = run_cli("worker", "tiny", "--n-trials", "3")
    assert result.code == 0, result
    assert len(_study().get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == 3
    missing = run_cli("worker", "nope")
    assert (missing.code, missing.err) == (2, "error: study 'nope' does not exist in this storage; studies: tiny\n")


def test_show_and_export_match_the_database(run_cli, write_study, tmp_path: Path):
    assert run_cli("run", str(write_study(n_trials=3, extra='pruner = "none"'))).code == 0
    trials = _study().get_trials()
    best = max(trials, key=lambda t: t.value)

    shown = run_cli("show", "tiny", "--json", "--top", "2")
    assert shown.code == 0
    data = json.loads(shown.out)
    assert data["best"]["number"] == best.number and data["best"]["value"] == best.value
    assert data["best"]["params"] == best.params
    assert [r["value"] for r in data["top"]] == sorted((t.value for t in trials), reverse=True)[:2]
    assert data["counts"]["COMPLETE"] == 3 and data["spec"]["name"] == "tiny"

    assert run_cli("export", "tiny", "--out", "trials.json").code == 0
    exported = json.loads((tmp_path / "trials.json").read_text())
    assert [(r["number"], r["state"], r["value"], r["params"]) for r in exported] == [
        (t.number, t.state.name, t.value, t.params) for t in trials]

    assert run_cli("export", "tiny", "--out", "trials.csv").code == 0
    with open(tmp_path / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["value"]) for r in rows] == [t.value for t in trials]
    assert [r["param_optimizer"] for r in rows] == [t.params["optimizer"] for t in trials]

    bad = run_cli("export", "tiny", "--out", "trials.xlsx")
    assert (bad.code, bad.err) == (2, "error: --out: 'trials.xlsx' must end in .csv or .json\n")
    assert not (tmp_path / "trials.xlsx").exists()


def test_studies_lists_each_study(run_cli, write_study):
    assert run_cli("run", str(write_study(n_trials=1))).code == 0
    assert run_cli("run", str(write_study("b.toml", name="other", n_trials=1))).code == 0
    out = run_cli("studies").out
    lines = [line for line in out.splitlines() if "tiny" in line or "other" in line]
    assert len(lines) == 2 and all("scratch" in line and "synthetic" in line for line in lines)


def test_delete(run_cli, write_study):
    assert run_cli("run", str(write_study(n_trials=1))).code == 0
    refused = run_cli("delete", "tiny")
    assert (refused.code, refused.err) == (
        2, "error: delete 'tiny': confirmation needed; pass --yes to delete without asking\n")
    assert optuna.get_all_study_names(STORAGE) == ["tiny"]
    assert run_cli("delete", "tiny", "--yes").code == 0
    assert optuna.get_all_study_names(STORAGE) == []


def test_bad_options(run_cli, write_study):
    path = str(write_study())
    result = run_cli("run", path, "--device", "tpu")
    assert (result.code, result.err) == (2, "error: --device: 'tpu' is not a device; allowed: auto, cpu, cuda, mps, "
                                            "cuda:N\n")
    result = run_cli("run", path, "--storage", "not a url")
    assert (result.code, result.err) == (2, "error: --storage: 'not a url' is not an SQLAlchemy URL (e.g. "
                                            "sqlite:///hpsearch.db, postgresql+psycopg://user@host/db)\n")
    result = run_cli("run", path, "--storage", "sqlite:///no/such/dir/x.db")
    assert result.code == 2 and "the directory 'no/such/dir' of the SQLite file does not exist" in result.err
    result = run_cli("run", path, "--n-trials", "0")
    assert result.code == 2 and "--n-trials" in result.err


def test_missing_dataset_files_say_where_they_were_looked_for(run_cli, write_study, tmp_path: Path, monkeypatch):
    from hpsearch.data import _load

    monkeypatch.setattr(_load, "_download", lambda name, root: "URLError: no network")
    path = write_study(dataset='dataset = "mnist"')
    result = run_cli("run", str(path), "--data-dir", str(tmp_path / "empty"))
    assert result.code == 1
    assert result.err.startswith(f"error: dataset 'mnist': no files found in {tmp_path / 'empty' / 'mnist'}")
    assert "the download failed (URLError: no network); put the four IDX files" in result.err
    assert result.err.count("\n") == 1
    assert optuna.get_all_study_names(STORAGE) == []  # no half-made study


def test_dashboard_serves_the_studies(run_cli, write_study, tmp_path: Path):
    import socket
    import time
    import urllib.request

    assert run_cli("run", str(write_study(n_trials=1))).code == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = spawn_cli("dashboard", "--port", str(port), cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as response:
                    studies = json.loads(response.read())["study_summaries"]
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
                time.sleep(0.3)
        assert [s["study_name"] for s in studies] == ["tiny"]
        attrs = {a["key"]: a["value"] for a in studies[0]["user_attrs"]}
        assert attrs["strategy"] == "scratch" and attrs["dataset"].startswith("synthetic")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/dashboard", timeout=5) as response:
            assert response.status == 200
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_image_folder_that_is_not_there(run_cli, write_study, tmp_path: Path):
    result = run_cli("run", str(write_study(dataset='dataset = "folder:holiday-pics"')))
    assert (result.code, result.err) == (
        2, f"error: dataset 'folder:holiday-pics': {tmp_path / 'data' / 'holiday-pics' / 'train'} has no class "
           "folders (expected train/<class>/*)\n")
    assert not (tmp_path / "hpsearch.db").exists() or optuna.get_all_study_names(STORAGE) == []


def test_read_commands_do_not_create_a_database(run_cli, tmp_path: Path):
    for args in (("studies",), ("show", "x"), ("export", "x", "--out", "x.json"), ("delete", "x", "--yes")):
        result = run_cli(*args)
        assert (result.code, result.err) == (2, "error: --storage: there is no SQLite database at 'hpsearch.db' "
                                                "(run a study first, or pass --storage / HPSEARCH_STORAGE)\n"), args
    assert not (tmp_path / "hpsearch.db").exists()
