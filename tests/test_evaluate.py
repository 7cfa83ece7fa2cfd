"""`hpsearch evaluate`: retrain the best trials on train+val, test accuracy per seed stored and resumable; the
test split is sealed for everything else."""

from __future__ import annotations

import json
import re
from pathlib import Path

import optuna
import pytest
import torch

import hpsearch
from hpsearch import data as datasets
from hpsearch import results
from hpsearch.data import _load
from hpsearch.evaluate import eval_seed
from tests.conftest import ONE_CONFIG_SPACE, study_text

STORAGE = "sqlite:///hpsearch.db"
DATASET = "synthetic:classes=3,size=12,train=192,test=32"


def test_the_test_split_is_sealed_outside_evaluate(tmp_path: Path):
    raw = datasets.read_raw(DATASET, tmp_path, tmp_path)
    with pytest.raises(datasets.SealedTestSplit, match=r"^the test split is read only by the final retraining of "
                                                      r"evaluate, reproduce and export-model \(data.load_test\); "
                                                      r"the search uses the train/val split$"):
        raw.test  # noqa: B018
    split = datasets.load_test(DATASET, data_dir=tmp_path, cache_dir=tmp_path, device=torch.device("cpu"))
    assert len(split) == 32 and split.x.dtype == torch.uint8


def test_search_never_reads_test_images_and_evaluate_does(run_cli, write_study, monkeypatch):
    monkeypatch.setitem(_load.TEST_READS, "count", 0)
    assert run_cli("run", str(write_study(n_trials=3, extra='pruner = "none"'))).code == 0
    assert _load.TEST_READS["count"] == 0
    result = run_cli("evaluate", "tiny", "--top", "2", "--seeds", "2")
    assert result.code == 0, result
    assert _load.TEST_READS["count"] > 0
    study = optuna.load_study(study_name="tiny", storage=STORAGE)
    best = sorted(study.trials, key=lambda t: (-t.value, t.number))[:2]
    for t in best:
        record = study.user_attrs[f"evaluate:{t.number}"]
        accs = [r["test_accuracy"] for r in record["runs"]]
        assert len(accs) == 2 and all(0.0 <= a <= 1.0 for a in accs)
        assert record["epochs"] == t.user_attrs["best_epoch"] + 1 and record["mode"] == "best"
        assert record["mean"] == pytest.approx(sum(accs) / 2)
        assert record["std"] == pytest.approx(abs(accs[0] - accs[1]) / 2**0.5)
        assert [r["seed"] for r in record["runs"]] == [eval_seed(0, t.number, 0), eval_seed(0, t.number, 1)]
        assert f"{record['mean']:.4f} ± {record['std']:.4f}" in result.out
    assert "test acc" in result.out and "s/epoch" in result.out
    shown = json.loads(run_cli("show", "tiny", "--json", "--top", "3").out)
    assert shown["top"][0]["test_accuracy_mean"] == study.user_attrs[f"evaluate:{best[0].number}"]["mean"]
    assert len(shown["top"][0]["test_accuracies"]) == 2
    assert " ± " in run_cli("show", "tiny").out
    assert run_cli("export", "tiny", "--out", "t.json").code == 0
    rows = {r["number"]: r for r in json.loads(Path("t.json").read_text())}
    assert rows[best[1].number]["test_accuracy_std"] == study.user_attrs[f"evaluate:{best[1].number}"]["std"]


def test_evaluate_resumes_with_the_seeds_not_yet_stored(run_cli, write_study, monkeypatch):
    assert run_cli("run", str(write_study(n_trials=1, extra='pruner = "none"'))).code == 0
    assert run_cli("evaluate", "tiny", "--seeds", "1").code == 0
    study = optuna.load_study(study_name="tiny", storage=STORAGE)
    first = study.user_attrs["evaluate:0"]["runs"][0]
    calls = []
    from hpsearch import evaluate as final
    real = final._retrain
    monkeypatch.setattr(final, "_retrain", lambda *a, **k: calls.append(a[4]) or real(*a, **k))
    assert run_cli("evaluate", "tiny", "--seeds", "3").code == 0
    assert calls == [1, 2]  # seed 0 was stored: not retrained
    runs = optuna.load_study(study_name="tiny", storage=STORAGE).user_attrs["evaluate:0"]["runs"]
    assert runs[0] == first and len(runs) == 3


def test_save_and_load_model_rebuilds_the_architecture(run_cli, write_study, tmp_path: Path):
    assert run_cli("run", str(write_study(n_trials=1, extra='pruner = "none"'))).code == 0
    assert run_cli("evaluate", "tiny", "--seeds", "1", "--epochs", "max", "--save", "models").code == 0
    record = optuna.load_study(study_name="tiny", storage=STORAGE).user_attrs["evaluate:0"]
    assert record["mode"] == "max" and record["epochs"] == 2
    model = hpsearch.load_model(tmp_path / "models" / "tiny-trial0-seed0.pt")
    assert not model.training
    test = datasets.load_test(DATASET, data_dir=tmp_path, cache_dir=tmp_path, device=torch.device("cpu"))
    with torch.no_grad():
        accuracy = (model(test.x).argmax(1) == test.y).float().mean().item()
    assert accuracy == pytest.approx(record["runs"][0]["test_accuracy"], abs=1e-6)


def test_final_training_on_all_training_images_for_more_epochs(run_cli, write_study, monkeypatch):
    """The search trains on half the training images for 2 epochs; `--train-fraction 1 --epochs 5` retrains on all
    of them plus val for 5 epochs, the cosine schedule over 5 (not cut off at the search's 2), and is stored as a
    different measurement: the same 5 epochs on the study's half, and the default's, are retrained, not read back."""
    assert run_cli("run", str(write_study(n_trials=1, extra='train_fraction = 0.5\npruner = "none"',
                                          space=ONE_CONFIG_SPACE + 'scheduler = "cosine"\n'))).code == 0
    from hpsearch import evaluate as final
    seen = []
    real_fit = final.fit
    monkeypatch.setattr(final, "fit", lambda built, data, config, **k: seen.append(
        (len(data.train), config.epochs, config.scheduler)) or real_fit(built, data, config, **k))

    result = run_cli("evaluate", "tiny", "--seeds", "1", "--epochs", "5", "--train-fraction", "1")
    assert result.code == 0, result
    assert seen == [(192, 5, "cosine")]  # 192: every training image (val included); the schedule over 5 epochs
    record = optuna.load_study(study_name="tiny", storage=STORAGE).user_attrs["evaluate:0"]
    assert (record["epochs"], record["schedule_epochs"], record["train_fraction"], record["mode"]) == (5, 5, 1.0, "5")
    assert record["runs"][0]["epochs_run"] == 5
    assert "retrained on train+val" in result.out and "of the training images" not in result.out

    result = run_cli("evaluate", "tiny", "--seeds", "1", "--epochs", "5")  # same epochs, the study's half: retrained
    assert result.code == 0, result
    assert len(seen) == 2 and seen[-1][1:] == (5, "cosine") and 90 < seen[-1][0] < 192

    result = run_cli("evaluate", "tiny", "--seeds", "1", "--epochs", "max")  # the trial's own schedule: retrained
    assert result.code == 0, result
    train_images = seen[-1][0]
    assert len(seen) == 3 and seen[-1][1:] == (2, "cosine") and 90 < train_images < 192
    assert "retrained on 50% of the training images plus val" in result.out
    shown = json.loads(run_cli("show", "tiny", "--json").out)
    assert (shown["top"][0]["test_epochs"], shown["top"][0]["test_train_fraction"]) == (2, 0.5)


@pytest.mark.parametrize("args, message", [
    (("--seeds", "0"), "error: --seeds 0: must be >= 1"),
    (("--top", "0"), "error: --top 0: must be >= 1"),
    (("--epochs", "last"), "error: --epochs 'last': allowed: best (best_epoch+1 of the trial), max (its full "
                           "budget), or a number of epochs >= 1 (the LR schedule stretched to it)"),
    (("--epochs", "0"), "error: --epochs '0': allowed: best (best_epoch+1 of the trial), max (its full "
                        "budget), or a number of epochs >= 1 (the LR schedule stretched to it)"),
    (("--train-fraction", "0"), "error: --train-fraction 0: must be a number with 0 < F <= 1"),
    (("--train-fraction", "1.5"), "error: --train-fraction 1.5: must be a number with 0 < F <= 1"),
])
def test_bad_options_are_one_line_errors(run_cli, write_study, args, message):
    assert run_cli("run", str(write_study(n_trials=1))).code == 0
    result = run_cli("evaluate", "tiny", *args)
    assert (result.code, result.err.strip()) == (2, message)


def test_unknown_study(run_cli, write_study):
    assert run_cli("run", str(write_study(n_trials=1))).code == 0
    result = run_cli("evaluate", "nope")
    assert (result.code, result.err.strip()) == (2, "error: study 'nope' does not exist in this storage; studies: tiny")


def test_replay_fills_parameters_older_trials_did_not_store(write_study):
    from hpsearch import load_spec
    from hpsearch.saved_model import replay
    from hpsearch.strategies import STRATEGIES

    spec = load_spec(write_study(space='[space]\nscheduler = "multistep"\npool = "max"\n'))
    old = {"conv_layers": 1, "channels_0": 4, "kernel_size": 3, "padding": "same", "stride": 1, "pool": "max",
           "pool_kernel": 2, "batch_norm": False, "fc_layers": 1, "optimizer": "adam", "lr": 0.001,
           "weight_decay": 0.0001, "scheduler": "multistep", "lr_gamma": 0.1, "batch_size": 64,
           "label_smoothing": 0.0, "augmentation": "none"}  # no pool_after, no milestones
    data = datasets.load(DATASET, data_dir=Path("."), cache_dir=Path("."), device=torch.device("cpu"),
                         val_fraction=0.1)
    config = STRATEGIES["scratch"].suggest(replay(old, spec.space), spec.space, 2, data.info)
    assert (config.pool_after, config.train.milestones) == ("each", "auto")


def test_evaluate_trial_picks_named_complete_trials_and_refuses_others(run_cli, write_study):
    """--trial N retrains that trial (the search's best sampled one beside its best enqueued one, say); a pruned or
    missing trial is a one-line error naming the complete ones."""
    path = write_study(text=study_text(n_trials=3, epochs=1, extra='pruner = "none"'))
    assert run_cli("run", str(path)).code == 0
    study = optuna.load_study(study_name="tiny", storage="sqlite:///hpsearch.db")
    worst = min(study.trials, key=lambda t: (t.value, -t.number)).number
    result = run_cli("evaluate", "tiny", "--trial", str(worst), "--seeds", "1")
    assert result.code == 0, result
    assert set(results.stored(optuna.load_study(study_name="tiny", storage="sqlite:///hpsearch.db"))) == {worst}
    result = run_cli("evaluate", "tiny", "--trial", "7", "--seeds", "1")
    assert result.code == 2
    assert result.err == ("error: --trial 7: trial 7 of study 'tiny' does not exist; only complete trials are "
                          "evaluated (complete: 0, 1, 2)\n")


def test_evaluate_shows_each_epoch_with_the_time_left(run_cli, write_study):
    # Not a terminal here: one plain line per epoch, as a log (Kubernetes, CI) shows it.
    assert run_cli("run", str(write_study(n_trials=1, epochs=3, extra='pruner = "none"'))).code == 0
    result = run_cli("evaluate", "tiny", "--seeds", "2", "--epochs", "max")
    assert result.code == 0, result
    lines = [line for line in result.out.splitlines() if " epoch " in line]
    assert [re.sub(r"\s+", " ", line).split(" elapsed")[0].rsplit(" ", 1)[0] for line in lines] == [
        f"trial 0 seed {s}/2 epoch {e}/3" for s in (1, 2) for e in (1, 2, 3)]
    assert all(re.search(r"\d+:\d\d elapsed, ~\d+:\d\d left$", line) for line in lines), lines
