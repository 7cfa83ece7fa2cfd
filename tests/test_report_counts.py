"""The report's strategy row counts trials as ``hpsearch.trials`` does: a trial refused before training (rejected:
an architecture that does not fit, or a cost cap) is neither a finished trial nor a pruned one."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from hpsearch.report import strategy_row, top_trials


def _study() -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    dists = {"lr": FloatDistribution(1e-4, 1e-1, log=True)}

    def add(state: TrialState, value: float | None, curve: list[float], **attrs: object) -> None:
        study.add_trial(create_trial(state=state, value=value, params={"lr": 1e-3}, distributions=dists,
                                     intermediate_values=dict(enumerate(curve)),
                                     user_attrs={"seconds_per_epoch": 2.0, **attrs}))

    add(TrialState.COMPLETE, 0.6, [0.5, 0.6])
    add(TrialState.COMPLETE, 0.7, [0.6, 0.7])
    add(TrialState.PRUNED, None, [0.2], dead="at chance after 1 epoch")
    add(TrialState.PRUNED, None, [], rejected="40,000 MACs per image, over max_flops = 20,000", cost_cap="max_flops")
    add(TrialState.PRUNED, None, [], rejected="the feature map shrinks below 1x1")
    return study


def test_rejected_trials_are_neither_finished_nor_pruned() -> None:
    row = strategy_row(_study())
    assert row.trials == 3  # two complete, one pruned after training; the two rejected left out
    assert row.pruned_share == pytest.approx(1 / 3)
    assert row.best_val == pytest.approx(0.7)
    assert row.compute_seconds == pytest.approx(2 * 2.0 + 2 * 2.0 + 2.0)  # rejected trials trained 0 epochs


def test_top_trials_are_best_first() -> None:
    assert [t.value for t in top_trials(_study(), 5)] == [0.7, 0.6]
