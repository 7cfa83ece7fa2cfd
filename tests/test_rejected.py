"""Architectures rejected before training (feature map below 1x1) stay PRUNED for TPE but do not use the budget."""

from __future__ import annotations

import re

import optuna
from optuna.trial import TrialState

from hpsearch import study as study_mod

STORAGE = "sqlite:///hpsearch.db"
# On a 12x12 input, kernel 7 without padding and 2x2 pooling: one block leaves 3x3, three blocks cannot be built.
HALF_REJECTED = """
[space]
conv_layers = [1, 3]
channels = [4]
kernel_size = 7
padding = 0
stride = 1
pool = "max"
pool_kernel = 2
fc_layers = 1
batch_size = 64
"""


def test_rejected_trials_do_not_count_toward_n_trials(run_cli, write_study):
    path = write_study(n_trials=3, extra='sampler = { type = "random" }\npruner = "none"', space=HALF_REJECTED)
    result = run_cli("run", str(path))
    assert result.code == 0, result
    trials = optuna.load_study(study_name="tiny", storage=STORAGE).get_trials()
    rejected = [t for t in trials if "rejected" in t.user_attrs]
    assert rejected, "the seeded random sampler should hit the 3-block architecture"
    assert all(t.state == TrialState.PRUNED and t.params["conv_layers"] == 3 for t in rejected)
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3
    assert len(trials) == 3 + len(rejected)
    flat = re.sub(r"[│\s]+", " ", result.out)  # the summary table may wrap a long cell
    n = len(rejected)
    assert f"rejected {n} of the pruned ({n} architecture shrinks below 1x1; not counted)" in flat
    assert f"finished 3/3, pruned 0, rejected {len(rejected)}" in result.out
    # The study is full: a second run trains nothing.
    again = run_cli("run", str(path))
    assert "already holds 3 finished trials (target 3); nothing to run." in again.out


def test_a_space_of_rejections_only_ends_with_one_line(run_cli, write_study, monkeypatch):
    monkeypatch.setattr(study_mod, "MAX_REJECTED_IN_A_ROW", 5)
    result = run_cli("run", str(write_study(n_trials=3, space=HALF_REJECTED.replace("[1, 3]", "3"))))
    assert result.code == 2
    assert result.err.strip() == (
        "error: tiny: 5 sampled architectures in a row were rejected before training (last: conv block 1 "
        "(kernel 7, padding 0, stride 1) shrinks the 12x12 input below 1x1); make the [space] fit the input size "
        "(fewer conv_layers, smaller kernel_size/stride/pool_kernel, or padding) and max_flops, if set")
    trials = optuna.load_study(study_name="tiny", storage=STORAGE).get_trials()
    assert len(trials) == 5 and all("rejected" in t.user_attrs for t in trials)
