"""Cost caps from the study file: ``max_flops`` (MACs per image) refuses a model before it trains, stored like a
rejected architecture; ``max_seconds_per_epoch`` refuses a model whose epoch, estimated from a few timed steps, is
over the cap, and prunes a trial after an epoch that took longer."""

from __future__ import annotations

import copy
import re
import time

import optuna
import torch
from optuna.trial import TrialState

from hpsearch import objective
from hpsearch.data import load
from hpsearch.saved_model import replay
from hpsearch.space import resolve_space
from hpsearch.strategies.scratch import PARAMS, build, suggest
from hpsearch.train import estimate_epoch_seconds
from tests.conftest import ONE_CONFIG_SPACE, fake_probe, study_text

STORAGE = "sqlite:///hpsearch.db"
# channels 4 -> about 5.6k MACs per 12x12 image, channels 64 -> about 90k; the cap lies between.
CAPPED = ONE_CONFIG_SPACE.replace("channels = 4", "channels = [4, 64]") + "\n[[enqueue]]\nchannels_0 = 64\n"


def _trials() -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="tiny", storage=STORAGE).get_trials()


def _run_capped(run_cli, write_study, cap: str):
    """Runs 2 trials of CAPPED under ``cap``; returns the output and the 64-channel / 4-channel trials."""
    path = write_study(text=study_text(n_trials=2, extra=f'{cap}\npruner = "none"', space=CAPPED))
    result = run_cli("run", str(path))
    assert result.code == 0, result
    trials = _trials()
    over = [t for t in trials if t.params["channels_0"] == 64]
    assert over and over[0].number == 0  # the enqueued row
    return result, over, [t for t in trials if t.params["channels_0"] == 4]


def test_a_model_over_max_flops_never_trains_and_does_not_count(run_cli, write_study):
    _, over, trained = _run_capped(run_cli, write_study, "max_flops = 20000")
    for t in over:
        assert t.state == TrialState.PRUNED and t.intermediate_values == {}
        assert t.user_attrs["macs"] > 20000
        assert t.user_attrs["rejected"] == f"{t.user_attrs['macs']:,} MACs per image, over max_flops = 20,000"
    assert len(trained) == 2 and all(t.state == TrialState.COMPLETE and t.user_attrs["macs"] <= 20000
                                      for t in trained)  # rejections did not eat the budget of 2


def test_a_trial_over_max_seconds_per_epoch_is_pruned_after_that_epoch(run_cli, write_study, monkeypatch):
    monkeypatch.setattr(objective, "probe_steps", fake_probe(0.0))  # the estimate lets it train
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


def test_a_model_whose_estimated_epoch_is_over_the_cap_never_trains(run_cli, write_study, monkeypatch):
    # The estimate is replaced by one proportional to the width, so the test does not hang on this machine's speed.
    def per_width(built):
        return sum(p.numel() for p in built.model.parameters()) / 1000

    monkeypatch.setattr(objective, "probe_steps", fake_probe(per_width))
    result, over, trained = _run_capped(run_cli, write_study, "max_seconds_per_epoch = 8")
    for t in over:
        assert t.state == TrialState.PRUNED and t.intermediate_values == {} and "val_accuracy" not in t.user_attrs
        assert t.user_attrs["rejected"] == (f"estimated {t.user_attrs['estimated_seconds_per_epoch']:.1f} s per "
                                            "epoch from timed steps, over max_seconds_per_epoch = 8")
    assert len(trained) == 2 and all(t.state == TrialState.COMPLETE for t in trained)  # not counted toward 2
    assert all(t.user_attrs["estimated_seconds_per_epoch"] <= 8 for t in trained)
    flat = re.sub(r"[│\s]+", " ", result.out)  # the summary table may wrap a long cell
    assert f"rejected {len(over)} of the pruned ({len(over)} over a cost cap; not counted)" in flat


def _tiny_cnn(channels: int, blocks: int, tmp_path):
    space = resolve_space(PARAMS, {}, where="test")
    params = {"conv_layers": blocks, **{f"channels_{i}": channels for i in range(blocks)}, "kernel_size": 3,
              "padding": "same", "stride": 1, "pool": "none", "batch_norm": True, "fc_layers": 2,
              "fc_width_0": 32, "dropout": 0.5,
              "optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "nesterov": False, "weight_decay": 1e-4,
              "scheduler": "none", "batch_size": 64, "label_smoothing": 0.0, "augmentation": "base"}
    data = load("synthetic:classes=3,size=24,train=640,test=32", data_dir=tmp_path, cache_dir=tmp_path,
                device=torch.device("cpu"), val_fraction=0.1)
    config = suggest(replay(params, space), space, 1, data.info)
    torch.manual_seed(0)
    return build(config, data.info), data, config


class _Slow(torch.nn.Module):
    """A model whose every forward pass computes for at least ``seconds`` of this thread's CPU time (``busy``), or
    waits that long without computing (what a step looks like while another process holds the core)."""

    def __init__(self, model: torch.nn.Module, seconds: float, *, busy: bool = True) -> None:
        super().__init__()
        self.model, self.seconds, self.busy = model, seconds, busy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.busy:
            start = time.thread_time()
            while time.thread_time() - start < self.seconds:
                pass
        else:
            time.sleep(self.seconds)
        return self.model(x)


def test_time_another_process_holds_the_core_is_not_counted_by_the_estimate(tmp_path):
    """The cost cap's clock is the process's CPU time (over its threads): a step that waits (the core given to another
    process) costs what it computed, so a busy machine does not get a configuration refused (issue #23: a study's own
    enqueued CNN refused at 545 s per epoch beside other work, 13 s idle)."""
    built, data, config = _tiny_cnn(16, 2, tmp_path)
    batches = len(data.train) // config.train.batch_size
    plain = estimate_epoch_seconds(built, data, config.train, torch.device("cpu"))
    built.model = _Slow(built.model, 0.05, busy=False)
    waiting = estimate_epoch_seconds(built, data, config.train, torch.device("cpu"))
    assert waiting < plain + 0.02 * batches  # 0.05 s per step of waiting: not counted


def test_the_epoch_estimate_is_a_step_time_per_batch_and_leaves_model_and_rngs_alone(tmp_path):
    built, data, config = _tiny_cnn(16, 2, tmp_path)
    built.model = _Slow(built.model, 0.05)
    before = copy.deepcopy(built.model.state_dict())
    rng = torch.get_rng_state()
    estimate = estimate_epoch_seconds(built, data, config.train, torch.device("cpu"))
    batches = len(data.train) // config.train.batch_size
    # every batch of the epoch pays at least one slow step: 0.05 s of CPU time, spread over the training's threads
    assert batches >= 8 and estimate >= 0.05 * batches / torch.get_num_threads()
    assert torch.equal(torch.get_rng_state(), rng)  # dropout/augmentation draws of the trial are not shifted
    assert all(torch.equal(v, before[k]) for k, v in built.model.state_dict().items())  # incl. BatchNorm stats
