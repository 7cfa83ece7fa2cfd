"""Cost caps from the study file: ``max_flops`` (MACs per image) refuses a model before it trains, stored like a
rejected architecture; ``max_seconds_per_epoch`` prunes a trial after the epoch that took longer."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from tests.conftest import ONE_CONFIG_SPACE, study_text

STORAGE = "sqlite:///hpsearch.db"
# channels 4 -> about 5.6k MACs per 12x12 image, channels 64 -> about 90k; the cap lies between.
CAPPED = ONE_CONFIG_SPACE.replace("channels = 4", "channels = [4, 64]") + "\n[[enqueue]]\nchannels_0 = 64\n"


def _trials() -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="tiny", storage=STORAGE).get_trials()


def test_a_model_over_max_flops_never_trains_and_does_not_count(run_cli, write_study):
    path = write_study(text=study_text(n_trials=2, extra='max_flops = 20000\npruner = "none"', space=CAPPED))
    result = run_cli("run", str(path))
    assert result.code == 0, result
    trials = _trials()
    over = [t for t in trials if t.params["channels_0"] == 64]
    assert over and over[0].number == 0  # the enqueued row
    for t in over:
        assert t.state == TrialState.PRUNED and t.intermediate_values == {}
        assert t.user_attrs["macs"] > 20000
        assert t.user_attrs["rejected"] == f"{t.user_attrs['macs']:,} MACs per image, over max_flops = 20,000"
    trained = [t for t in trials if t.params["channels_0"] == 4]
    assert len(trained) == 2 and all(t.state == TrialState.COMPLETE and t.user_attrs["macs"] <= 20000
                                      for t in trained)  # rejections did not eat the budget of 2


def test_a_trial_over_max_seconds_per_epoch_is_pruned_after_that_epoch(run_cli, write_study):
    path = write_study(text=study_text(n_trials=1, epochs=3, extra='max_seconds_per_epoch = 0.001\npruner = "none"',
                                       space=ONE_CONFIG_SPACE))
    result = run_cli("run", str(path))
    assert result.code == 0, result
    [trial] = _trials()
    assert trial.state == TrialState.PRUNED
    assert list(trial.intermediate_values) == [0]  # its value counts; the two epochs left are not paid for
    assert trial.user_attrs["over_cost"].startswith("epoch 1 took ")
    assert trial.user_attrs["over_cost"].endswith(" s, over max_seconds_per_epoch = 0.001")
    line = next(x for x in result.out.splitlines() if x.startswith("time: "))
    assert " s over_cost (" in line


def test_cost_caps_are_validated(run_cli, write_study):
    result = run_cli("run", str(write_study(extra="max_flops = 0")))
    assert result.code == 2 and result.err.strip().endswith("max_flops = 0 must be an integer >= 1"), result
    result = run_cli("run", str(write_study(extra='max_seconds_per_epoch = "fast"')))
    assert result.code == 2 and result.err.strip().endswith(
        'max_seconds_per_epoch = "fast" must be a number >= 0.001'), result
