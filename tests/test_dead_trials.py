"""Dead-trial pruning: a trial still at chance after its first epoch is pruned at once, with the reason stored,
on top of whatever pruner the study names; ``pruner = "none"`` and ``dead_trial = false`` turn it off."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hpsearch import objective
from hpsearch.spec import load_spec
from hpsearch.stopping import DeadTrialRule, dead_trial_rule, make_pruner
from tests.conftest import fake_probe, study_text

DATA = 'dataset = "synthetic:classes=4,size=12,train=800,test=32"'
# lr 1e-7: the weights barely move, so validation accuracy stays where random initialisation puts it.
DEAD_SPACE = """
[space]
padding = "same"
stride = 1
conv_layers = 1
channels = 4
fc_layers = 1
batch_size = 64
optimizer = "sgd"
momentum = 0.0
lr = 1e-7
"""
# dead_margin 0.5: with 4 classes the threshold is chance (~0.25) + 0.5, far above what a model that does not
# learn scores by luck on 80 validation images, far below what the tiny CNN reaches in one epoch when it learns.
MARGIN = "dead_margin = 0.5"


def _trials() -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="tiny", storage="sqlite:///hpsearch.db").get_trials()


def test_a_trial_at_chance_is_pruned_after_its_first_epoch(run_cli, write_study):
    extra = f'pruner = {{ type = "median", n_startup_trials = 100, {MARGIN} }}'  # median alone would never prune
    path = write_study(text=study_text(epochs=5, n_trials=1, extra=extra, space=DEAD_SPACE, dataset=DATA))
    result = run_cli("run", str(path))
    assert result.code == 0, result
    [trial] = _trials()
    assert trial.state == TrialState.PRUNED
    assert list(trial.intermediate_values) == [0]  # one epoch, not five
    assert trial.user_attrs["dead"].startswith(f"val accuracy {trial.intermediate_values[0]:.4f} after 1 epochs "
                                               "is at chance (below 0.")
    assert "is at chance" in result.out
    # The budget line puts the trial's seconds under "dead", none under complete or pruned.
    line = next(x for x in result.out.splitlines() if x.startswith("time: "))
    assert re.fullmatch(r"time: \d+ s in all: \d+ s dead \(\d+%\), \d+ s outside trials \(\d+%\)", line), line


def test_a_learning_trial_is_not_pruned(run_cli, write_study):
    space = DEAD_SPACE.replace("lr = 1e-7", "lr = 0.05").replace('optimizer = "sgd"', 'optimizer = "adam"')
    extra = f'pruner = {{ type = "median", n_startup_trials = 100, {MARGIN} }}'
    path = write_study(text=study_text(epochs=3, n_trials=1, extra=extra, space=space, dataset=DATA))
    assert run_cli("run", str(path)).code == 0
    [trial] = _trials()
    assert trial.state == TrialState.COMPLETE, trial.user_attrs
    assert "dead" not in trial.user_attrs


@pytest.mark.parametrize("extra", ['pruner = "none"', f'pruner = {{ type = "median", dead_trial = false, {MARGIN} }}'])
def test_dead_trial_pruning_can_be_turned_off(run_cli, write_study, extra):
    path = write_study(text=study_text(epochs=2, n_trials=1, extra=extra, space=DEAD_SPACE, dataset=DATA))
    assert run_cli("run", str(path)).code == 0
    [trial] = _trials()
    assert trial.state == TrialState.COMPLETE
    assert len(trial.intermediate_values) == 2


@pytest.mark.parametrize("rule", ["dead", "over_cost"])
def test_a_trial_that_trained_all_its_epochs_is_complete(run_cli, write_study, monkeypatch, rule):
    """No pruning after the last epoch, where it saves nothing: the trial at chance (or over the epoch-time cap) that
    has trained its one epoch is COMPLETE with its value, not PRUNED (as Hyperband did with its top rung at epoch
    10 of studies/cifar10-beat-report.toml, throwing away trials it had paid for in full)."""
    extra = f'pruner = {{ type = "median", n_startup_trials = 100, {MARGIN} }}'
    if rule == "over_cost":
        monkeypatch.setattr(objective, "probe_steps", fake_probe(0.0))  # the estimate lets it train
        extra += "\nmax_seconds_per_epoch = 0.001"
    path = write_study(text=study_text(epochs=1, n_trials=1, extra=extra, space=DEAD_SPACE, dataset=DATA))
    assert run_cli("run", str(path)).code == 0
    [trial] = _trials()
    assert trial.state == TrialState.COMPLETE, trial.user_attrs
    assert trial.value == trial.intermediate_values[0] <= 0.75  # at chance (below chance + dead_margin)
    assert rule not in trial.user_attrs


def test_rule_and_pruner(write_study):
    spec = load_spec(write_study(extra='pruner = { type = "hyperband", dead_after = 2 }'))
    rule = dead_trial_rule(spec, 0.25)
    assert rule == DeadTrialRule(threshold=0.27, after=2)
    assert rule.reason(0, 0.1) is None  # too early
    assert rule.reason(1, 0.3) is None  # learning
    assert rule.reason(1, 0.26) == "val accuracy 0.2600 after 2 epochs is at chance (below 0.2700)"
    # Still a HyperbandPruner: Optuna shows samplers the per-bracket trials only for one.
    assert isinstance(make_pruner(spec, rule), optuna.pruners.HyperbandPruner)
    assert dead_trial_rule(spec, 0.99) is None  # one class fills the split: chance means nothing


ZOO = Path(__file__).resolve().parents[1] / "studies" / "cifar10-zoo.toml"


def _pruned_after(pruner: optuna.pruners.BasePruner, curve: list[float]) -> int | None:
    """Reports ``curve`` one epoch at a time to a fresh trial under ``pruner``; the 1-based epoch after which
    ``should_prune`` first says yes, None when it never does."""
    trial = optuna.create_study(direction="maximize", pruner=pruner).ask()
    for epoch, value in enumerate(curve):
        trial.report(value, epoch)
        if trial.should_prune():
            return epoch + 1
    return None


def test_the_zoo_studys_dead_after_2_waits_for_the_second_epoch():
    """studies/cifar10-zoo.toml ships dead_after = 2: through the pruner make_pruner builds from that very file, a
    trial at chance after its first epoch goes on, one still at chance after its second is pruned, one that learnt
    by then is not (the file's median pruner alone prunes nothing: it has no complete trial to compare with)."""
    spec = load_spec(ZOO)
    assert spec.pruner["dead_after"] == 2
    rule = dead_trial_rule(spec, 0.1)  # CIFAR-10's chance
    assert rule is not None and rule.after == 2
    pruner = make_pruner(spec, rule)
    assert _pruned_after(pruner, [0.1, 0.1, 0.1, 0.1]) == 2, "a trial at chance must be pruned after epoch 2"
    assert _pruned_after(pruner, [0.1, 0.5, 0.5, 0.5]) is None, "a trial at chance after epoch 1 only is not dead"
    assert rule.reason(0, 0.1) is None
    assert rule.reason(1, 0.1) == f"val accuracy 0.1000 after 2 epochs is at chance (below {rule.threshold:.4f})"
    # The default (dead_after = 1) prunes the same trial an epoch earlier: the knob is what made the difference.
    without = Path("zoo-default.toml")  # in the test's own directory (conftest's _isolated)
    without.write_text(ZOO.read_text().replace(", dead_after = 2", ""))
    default = load_spec(without)
    assert _pruned_after(make_pruner(default, dead_trial_rule(default, 0.1)), [0.1, 0.5, 0.5, 0.5]) == 1


def test_a_trial_at_chance_is_pruned_after_its_second_epoch_with_dead_after_2(run_cli, write_study):
    extra = f'pruner = {{ type = "median", n_startup_trials = 100, {MARGIN}, dead_after = 2 }}'
    path = write_study(text=study_text(epochs=5, n_trials=1, extra=extra, space=DEAD_SPACE, dataset=DATA))
    result = run_cli("run", str(path))
    assert result.code == 0, result
    [trial] = _trials()
    assert trial.state == TrialState.PRUNED
    assert list(trial.intermediate_values) == [0, 1], "pruned after its second epoch, not its first nor later"
    assert trial.user_attrs["dead"].startswith(f"val accuracy {trial.intermediate_values[1]:.4f} after 2 epochs "
                                               "is at chance (below 0.")


def test_dead_trial_knobs_are_validated(run_cli, write_study):
    result = run_cli("run", str(write_study(extra='pruner = { type = "median", dead_margin = 2 }')))
    assert result.code == 2
    assert "pruner.dead_margin = 2 must be >= 0 and <= 1" in result.err
    result = run_cli("run", str(write_study(extra='pruner = { type = "none", dead_trial = true }')))
    assert result.code == 2
    assert "pruner.dead_trial = true is not a knob of pruner 'none'; allowed: none" in result.err


ROOT = Path(__file__).resolve().parents[1]


def _bench_search():
    path = ROOT / "benchmarks" / "bench_search.py"
    module_spec = importlib.util.spec_from_file_location("bench_search", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules["bench_search"] = module  # its dataclass looks its module up there
    module_spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("study", ["mnist-scratch", "cifar10-scratch", "cifar10-beat-report"])
def test_the_pruner_comparison_runs_the_pruner_it_names(study, tmp_path):
    """benchmarks/bench_search.py --pruners: each preset, written into a shipped study file, is the pruner the study
    then runs, with dead-trial pruning exactly when the name says "+dead" (a comparison that kept the file's own
    pruner, or left dead-trial pruning on everywhere, would measure nothing)."""
    bench = _bench_search()
    kinds = {"median": optuna.pruners.MedianPruner, "successive-halving": optuna.pruners.SuccessiveHalvingPruner,
             "hyperband": optuna.pruners.HyperbandPruner}
    shipped = ROOT / "studies" / f"{study}.toml"
    original, base = shipped.read_text(), load_spec(shipped)
    for name, pruner in bench.PRUNERS.items():
        path = tmp_path / f"{name}.toml"
        path.write_text(bench.with_key(bench.with_key(original, "seed", "7"), "pruner", pruner))
        spec = load_spec(path)
        dead = dead_trial_rule(spec, chance=0.1)
        assert spec.seed == 7  # and nothing else of the study changed:
        assert dataclasses.replace(spec, seed=base.seed, pruner=base.pruner, space=base.space) == base
        assert (dead is not None) == name.endswith("+dead"), name
        assert isinstance(make_pruner(spec, dead), kinds[name.removesuffix("+dead")]), name


def test_the_pruner_comparison_reports_what_the_sampled_trials_reached():
    """bench_search's "best val of a sampled trial": an enqueued baseline is the study's best at a small budget
    whatever the pruner, so the comparison must also show the best epoch of any trial the sampler chose (pruned ones
    included), never the enqueued row's."""
    bench = _bench_search()
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"x": 0.0})

    def objective_fn(trial: optuna.Trial) -> float:
        trial.suggest_float("x", 0.0, 1.0)
        if trial.number == 3:
            raise optuna.TrialPruned()  # refused before training (like a rejected architecture): no epoch at all
        curve = [0.99, 0.99] if trial.number == 0 else [0.5 + trial.number / 10, 0.3]  # enqueued row: the best
        for step, value in enumerate(curve):
            trial.report(value, step)
        if trial.number == 2:
            raise optuna.TrialPruned()  # its best epoch (0.7) still counts
        return curve[-1]

    study.optimize(objective_fn, n_trials=4)
    trials = study.get_trials()
    assert study.best_trial.number == 0
    assert bench.sampled_best(trials) == (0.7, 2)
    assert bench.sampled_best(trials[:1]) is None  # only the enqueued row: nothing sampled


def test_the_best_sampled_value_counts_a_complete_trials_last_stage():
    """With rungs, a trial reports only its rungs' ends as intermediate values; its full-fidelity stage is its value
    (fashion-mnist-fast printed 0.8950, a rung value, as its best sampled; trial 17 completed at 0.935)."""
    bench = _bench_search()
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"x": 0.0})

    def objective_fn(trial: optuna.Trial) -> float:
        trial.suggest_float("x", 0.0, 1.0)
        trial.report(0.5 + trial.number / 10, 1)  # a rung's end
        return [0.8, 0.81, 0.82][trial.number]  # the last stage: above every rung value

    study.optimize(objective_fn, n_trials=3)
    assert bench.sampled_best(study.get_trials()) == (0.82, 2)


def test_the_before_figures_run_the_search_with_the_other_checkout(tmp_path):
    """bench_search --search-code DIR: the search must run the hpsearch of DIR (an older commit, for the issue's
    "before" figures), not this checkout's; `python -m` imports from its working directory first, so running it here
    with only PYTHONPATH changed would silently measure the new code twice."""
    bench = _bench_search()
    old = tmp_path / "old checkout"
    (old / "hpsearch").mkdir(parents=True)
    (old / "hpsearch" / "__init__.py").write_text("")
    (old / "hpsearch" / "__main__.py").write_text(
        "import pathlib, sys\npathlib.Path(sys.argv[-1]).write_text(str(pathlib.Path(__file__).resolve()))\n")
    marker = tmp_path / "which hpsearch ran"
    bench.hpsearch("run", str(marker), code=old)
    assert Path(marker.read_text()) == (old / "hpsearch" / "__main__.py").resolve()


def test_the_search_comparison_picks_the_best_enqueued_and_the_best_sampled_complete_trial():
    """bench_search --compare-sampled retrains both with the same final training: what the search added over its
    starting point (issue #23). Pruned trials (not promoted from a rung, say) have no final value: never picked."""
    bench = _bench_search()
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"x": 0.0})
    study.enqueue_trial({"x": 0.1})
    values = {0: 0.80, 1: 0.85, 2: 0.90, 3: 0.99, 4: 0.70}

    def objective_fn(trial: optuna.Trial) -> float:
        trial.suggest_float("x", 0.0, 1.0)
        if trial.number == 3:
            trial.report(values[3], 1)
            raise optuna.TrialPruned()  # a sampled trial's rung value: not a final one
        return values[trial.number]

    study.optimize(objective_fn, n_trials=5)
    trials = study.get_trials()
    enqueued, sampled = bench.best_complete(trials, enqueued=True), bench.best_complete(trials, enqueued=False)
    assert enqueued is not None and enqueued.number == 1
    assert sampled is not None and sampled.number == 2
    assert bench.best_complete(trials[:2], enqueued=False) is None
