"""Study files: every bad input is one line naming the file, the key, the value and the rule; exit code 2;
nothing is written to the database."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import optuna
import pytest

from hpsearch.space import Fixed, FloatRange
from hpsearch.spec import load_spec
from hpsearch.stopping import dead_trial_rule, make_pruner
from tests.conftest import TINY, study_text

GOOD = study_text()

# (description, study file text, message after "<file>: ")
BAD_CASES = [
    ("unknown key", GOOD.replace('strategy = "scratch"', 'strategy = "scratch"\nepoch = 3'),
     "unknown key 'epoch'; allowed: name, dataset, strategy, epochs, n_trials, timeout, max_seconds_per_epoch, "
     "max_flops, val_fraction, "
     "train_fraction, sampler, pruner, seed, tta, rungs, final, target, warm_start, space, enqueue"),
    ("missing key", GOOD.replace('strategy = "scratch"\n', ""), "missing required key 'strategy'"),
    ("epochs wrong type", GOOD.replace("epochs = 2", 'epochs = "2"'),
     'epochs = "2" must be an integer >= 1 and <= 10000'),
    ("epochs zero", GOOD.replace("epochs = 2", "epochs = 0"), "epochs = 0 must be an integer >= 1 and <= 10000"),
    ("n_trials negative", GOOD.replace("n_trials = 3", "n_trials = -1"),
     "n_trials = -1 must be an integer >= 1 and <= 1000000"),
    ("no budget", GOOD.replace("n_trials = 3\n", ""),
     "give n_trials and/or timeout (seconds): without either a study never ends"),
    ("val_fraction", GOOD.replace("epochs = 2", "epochs = 2\nval_fraction = 1.5"),
     "val_fraction = 1.5 must be a number with 0 < val_fraction < 1"),
    ("unknown strategy", GOOD.replace('strategy = "scratch"', 'strategy = "magic"'),
     'strategy = "magic" is not known; allowed: '),
    ("unknown dataset", GOOD.replace(TINY, 'dataset = "imagenet"'),
     "dataset 'imagenet' is not known; allowed: mnist, fashion-mnist, cifar10, folder:<path>, "
     "synthetic[:key=value,...]"),
    ("unknown sampler", GOOD.replace("epochs = 2", 'epochs = 2\nsampler = "grid"'),
     'sampler = "grid" is not known; allowed: tpe, random, gp, cmaes, qmc'),
    ("unknown pruner", GOOD.replace("epochs = 2", 'epochs = 2\npruner = "early"'),
     'pruner = "early" is not known; allowed: none, median, percentile, successive-halving, hyperband'),
    ("unknown pruner knob", GOOD.replace("epochs = 2", 'epochs = 2\npruner = {type = "median", warmup = 1}'),
     "pruner.warmup = 1 is not a knob of pruner 'median'; allowed: n_startup_trials, n_warmup_steps, "
     "interval_steps, n_min_trials"),
    ("bad pruner knob value",
     GOOD.replace("epochs = 2", 'epochs = 2\npruner = {type = "hyperband", reduction_factor = 1}'),
     "pruner.reduction_factor = 1 must be >= 2"),
    ("space key unknown", GOOD.replace("[space]", "[space]\nlayers = 3"), "space.layers: unknown key; this strategy's"),
    ("empty choice list", GOOD.replace("conv_layers = [1, 2]", "conv_layers = []"),
     "space.conv_layers: [] is an empty list; give at least one choice"),
    ("inverted range", GOOD.replace("[space]", "[space]\nlr = {low = 0.1, high = 0.001, log = true}"),
     "space.lr: {low = 0.1, high = 0.001, log = true} is an inverted range: low 0.1 > high 0.001"),
    ("empty range", GOOD.replace("[space]", "[space]\nlr = {low = 0.01, high = 0.01}"),
     "space.lr: {low = 0.01, high = 0.01} is an empty range: low == high == 0.01; use a scalar for a fixed value"),
    ("log range from zero", GOOD.replace("[space]", "[space]\nweight_decay = {low = 0.0, high = 0.01, log = true}"),
     "space.weight_decay: {low = 0.0, high = 0.01, log = true} is a log range with low 0.0; a log range needs low > 0"),
    ("value not allowed", GOOD.replace('padding = "same"', 'padding = "valid"'),
     'space.padding: "valid" must be one of 0, 1, 2, 3, "same"'),
    ("wrong value type", GOOD.replace("conv_layers = [1, 2]", 'conv_layers = ["two"]'),
     'space.conv_layers: ["two"] must be 0 <= int <= 8'),
    ("out of bounds", GOOD.replace("[space]", "[space]\ndropout = 1.5"),
     "space.dropout: 1.5 must be 0.0 <= float <= 0.95"),
    ("int range as float", GOOD.replace("conv_layers = [1, 2]", "conv_layers = {low = 0.5, high = 2}"),
     "space.conv_layers: {low = 0.5, high = 2} must be 0 <= int <= 8"),
    ("enqueue unknown param", GOOD + "\n[[enqueue]]\nlayers = 2\n",
     "enqueue[0].layers = 2 is not a parameter of this strategy"),
    ("enqueue outside space", GOOD + "\n[[enqueue]]\nconv_layers = 4\n",
     "enqueue[0].conv_layers = 4 is outside this study's space for 'conv_layers': [1, 2]"),
    ("a copy no trial has", GOOD.replace("[space]", "[space]\nchannels_2 = 16"),
     "space.channels_2: no trial has this copy: conv_layers is [1, 2] in this space"),
    ("a copy's own value breaks the key's rule", GOOD.replace("[space]", "[space]\nchannels_1 = 0"),
     "space.channels_1: 0 must be 1 <= int <= 2048"),
    ("enqueue outside a copy's own range", GOOD.replace("[space]", "[space]\nchannels_1 = 8") + "\n[[enqueue]]\n"
     "conv_layers = 2\nchannels = 4\n", "enqueue[0].channels = 4 is outside this study's space for 'channels_1': 8"),
    ("bad synthetic argument", GOOD.replace(TINY, 'dataset = "synthetic:size=big"'),
     "dataset 'synthetic:size=big': size='big' is not an integer"),
]


@pytest.mark.parametrize("text, message", [(t, m) for _, t, m in BAD_CASES], ids=[d for d, _, _ in BAD_CASES])
def test_bad_study_file_is_one_line_exit_2_and_writes_nothing(run_cli, write_study, tmp_path: Path, text, message):
    path = write_study(text=text)
    result = run_cli("run", str(path))
    assert result.code == 2, result
    assert result.err.startswith(f"error: {path}: {message}"), result.err
    assert result.err.count("\n") == 1  # one line
    assert not (tmp_path / "hpsearch.db").exists()  # checked before any database is opened


def test_bad_file_leaves_an_existing_study_unchanged(run_cli, write_study, tmp_path: Path):
    good = write_study(n_trials=1)
    assert run_cli("run", str(good)).code == 0
    db = tmp_path / "hpsearch.db"
    before = _dump(db)
    bad = write_study("bad.toml", text=GOOD.replace("conv_layers = [1, 2]", "conv_layers = []"))
    assert run_cli("run", str(bad)).code == 2
    changed = write_study("changed.toml", text=GOOD.replace("epochs = 2", "epochs = 3"))
    result = run_cli("run", str(changed))
    assert result.code == 2
    assert result.err == ("error: study 'tiny' exists with different settings (epochs); pass --force to run it "
                          "with this file, or give the study a new name\n")
    assert _dump(db) == before


def _dump(db: Path) -> list:
    con = sqlite3.connect(db)
    try:
        tables = ("trials", "trial_params", "trial_values", "study_user_attributes", "trial_user_attributes")
        return [con.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in tables]
    finally:
        con.close()


def test_missing_and_malformed_files(run_cli, tmp_path: Path):
    result = run_cli("run", str(tmp_path / "nope.toml"))
    assert (result.code, result.err) == (2, f"error: {tmp_path / 'nope.toml'}: no such study file\n")
    broken = tmp_path / "broken.toml"
    broken.write_text("name = \n")
    result = run_cli("run", str(broken))
    assert result.code == 2 and result.err.startswith(f"error: {broken}: not valid TOML (")


def test_shipped_study_files_load():
    root = Path(__file__).parent.parent
    for path in sorted(root.glob("studies/*.toml")):
        spec = load_spec(path)
        assert spec.name == path.stem, f"{path}: name {spec.name!r} differs from the file name"
    # A study file a benchmarks/README.md row ran (finetune-mnist-resnet50.toml needs a weights file made first).
    assert load_spec(root / "benchmarks" / "mnist-scratch-8-epochs.toml").epochs == 8
    assert len(load_spec(root / "benchmarks" / "fashion-mnist-headroom.toml").enqueue) == 6
    # The pruners benchmarks/README.md measured and chose for the shipped CPU studies, each with dead-trial pruning.
    chosen = {"mnist-scratch": optuna.pruners.MedianPruner, "cifar10-scratch": optuna.pruners.SuccessiveHalvingPruner}
    for name, kind in chosen.items():
        spec = load_spec(root / "studies" / f"{name}.toml")
        dead = dead_trial_rule(spec, chance=0.1)
        assert dead is not None, name
        assert isinstance(make_pruner(spec, dead), kind), name
    # The airbench-class studies (issue #23): the first enqueued row is airbench94's network and recipe (whitening,
    # conv -> pool -> norm -> act blocks, lookahead, the linear schedule), validated and tested with the same
    # test-time views, and the winner retrained 10 epochs on every training image by `evaluate`.
    for name in ("cifar10-fast", "mnist-fast", "fashion-mnist-fast"):
        spec = load_spec(root / "studies" / f"{name}.toml")
        row = spec.enqueue[0]
        assert (row["whiten"], row["block_layout"], row["averaging"]) == (True, "airbench", "lookahead"), name
        assert spec.space.dims["scheduler"] == Fixed("linear"), name
        assert (spec.tta, spec.final_epochs, spec.final_train_fraction) == ("flip-translate", 10, 1.0), name
    # Fashion-MNIST searches one width scale on the prior's shape; the prior itself is enqueued at scale 1 (a row
    # without the key would have it sampled).
    spec = load_spec(root / "studies" / "fashion-mnist-fast.toml")
    row = spec.enqueue[0]
    assert [row[f"channels_{i}"] for i in range(3)] == [32, 64, 128] and row["width_scale"] == 1.0
    assert [spec.space.dims[f"channels_{i}"] for i in range(3)] == [Fixed(32), Fixed(64), Fixed(128)]
    assert spec.space.dims["width_scale"] == FloatRange(0.75, 2.0, log=True)


def test_budget_changes_do_not_count_as_a_different_study(write_study):
    a = load_spec(write_study("a.toml", n_trials=3))
    b = load_spec(write_study("b.toml", n_trials=10))
    assert a.search_definition() == b.search_definition()
    assert a.to_dict()["n_trials"] == 3
