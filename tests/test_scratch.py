"""The scratch strategy: the report's base CNN is an exact point of the space; impossible architectures are
rejected before training; FC-only models work."""

from __future__ import annotations

import optuna
import pytest
import torch
import torch.nn as nn

from hpsearch._errors import Rejected
from hpsearch.data import DataInfo
from hpsearch.space import resolve_space
from hpsearch.strategies.scratch import PARAMS, build, suggest

CIFAR = DataInfo(name="cifar10", channels=3, height=32, width=32, num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3,
                 flip=True, classes=tuple(str(i) for i in range(10)))
MNIST = DataInfo(name="mnist", channels=1, height=28, width=28, num_classes=10, mean=(0.13,), std=(0.31,),
                 flip=False, classes=tuple(str(i) for i in range(10)))

BASE_CNN = {
    "conv_layers": 2, "channels_0": 6, "channels_1": 16, "kernel_size": 5, "padding": 0, "stride": 1,
    "pool": "max", "pool_kernel": 2, "batch_norm": False, "fc_layers": 3, "fc_width_0": 120, "fc_width_1": 84,
    "dropout": 0.0, "optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4,
    "scheduler": "none", "batch_size": 64, "label_smoothing": 0.0, "augmentation": "base",
}


def _config_for(params: dict, info: DataInfo, overrides: dict | None = None):
    study = optuna.create_study()
    study.enqueue_trial(params)
    trial = study.ask()
    return suggest(trial, resolve_space(PARAMS, overrides or {}, where="test"), 3, info)


def test_base_cnn_is_an_exact_point_of_the_default_space():
    model = build(_config_for(BASE_CNN, CIFAR), CIFAR).model
    layers = [(type(m).__name__, tuple(p.shape for p in m.parameters())) for m in model if list(m.parameters())]
    assert layers == [
        ("Conv2d", ((6, 3, 5, 5), (6,))),
        ("Conv2d", ((16, 6, 5, 5), (16,))),
        ("Linear", ((120, 400), (120,))),
        ("Linear", ((84, 120), (84,))),
        ("Linear", ((10, 84), (10,))),
    ]
    assert [type(m) for m in model if isinstance(m, nn.MaxPool2d)] == [nn.MaxPool2d, nn.MaxPool2d]
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_fc_only_model():
    params = {**BASE_CNN, "conv_layers": 0, "fc_layers": 2, "fc_width_0": 64}
    config = _config_for(params, MNIST)
    assert config.channels == () and config.fc_widths == (64,)
    model = build(config, MNIST).model
    assert model(torch.zeros(4, 1, 28, 28)).shape == (4, 10)
    assert not any(isinstance(m, nn.Conv2d) for m in model)


def test_architecture_that_shrinks_below_one_pixel_is_rejected_with_the_reason():
    params = {**BASE_CNN, "conv_layers": 4, "channels_2": 8, "channels_3": 8, "kernel_size": 7, "stride": 2}
    with pytest.raises(Rejected, match=r"conv block 1 \(kernel 7, padding 0, stride 2\) shrinks the 28x28 input "
                                       r"below 1x1"):
        _config_for(params, MNIST)
    pooled = {**BASE_CNN, "conv_layers": 4, "channels_2": 8, "channels_3": 8, "padding": "same", "pool_kernel": 3}
    with pytest.raises(Rejected, match="pooling 3 after conv block 3 meets a 1x1 feature map"):
        _config_for(pooled, MNIST)


def test_every_sampled_architecture_builds_or_is_rejected():
    space = resolve_space(PARAMS, {}, where="test")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    built = 0
    for _ in range(60):
        trial = study.ask()
        try:
            config = suggest(trial, space, 1, MNIST)
        except Rejected:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        assert build(config, MNIST).model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
        study.tell(trial, 0.0)
        built += 1
    assert built > 20


def test_sgd_only_parameters_are_sampled_only_for_sgd():
    config = _config_for({**BASE_CNN, "optimizer": "adam"}, CIFAR)
    assert config.train.optimizer == "adam" and config.train.momentum == 0.0
    sgd = _config_for(BASE_CNN, CIFAR)
    assert sgd.train.momentum == 0.9


def _sampled_lrs(space_overrides: dict[str, object], sampler: optuna.samplers.BaseSampler) -> dict[str, list[float]]:
    """(optimizer -> sampled lrs) over 40 trials of the scratch space; each trial is told a value that favours SGD."""
    space = resolve_space(PARAMS, space_overrides, where="test")
    study = optuna.create_study(direction="maximize", sampler=sampler)
    by_optimizer: dict[str, list[float]] = {"sgd": [], "adam": [], "adamw": []}
    for _ in range(40):
        trial = study.ask()
        try:
            config = suggest(trial, space, 1, CIFAR)
        except Rejected:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        by_optimizer[config.train.optimizer].append(config.train.lr)
        assert trial.params["lr"] == config.train.lr  # one parameter name, whatever the optimizer
        study.tell(trial, float(config.train.optimizer == "sgd"))
    return by_optimizer


@pytest.mark.parametrize("sampler", [optuna.samplers.RandomSampler(seed=1),
                                     optuna.samplers.TPESampler(seed=1, n_startup_trials=5)], ids=["random", "tpe"])
def test_default_learning_rate_range_depends_on_the_sampled_optimizer(sampler: optuna.samplers.BaseSampler):
    lrs = _sampled_lrs({}, sampler)
    assert lrs["sgd"] and (lrs["adam"] or lrs["adamw"])
    assert all(1e-3 <= lr <= 0.3 for lr in lrs["sgd"]), lrs["sgd"]
    assert all(1e-4 <= lr <= 3e-3 for lr in lrs["adam"] + lrs["adamw"]), lrs["adam"] + lrs["adamw"]


def test_a_study_files_lr_range_applies_to_every_optimizer():
    lrs = _sampled_lrs({"lr": {"low": 0.02, "high": 0.05, "log": True}}, optuna.samplers.RandomSampler(seed=2))
    assert lrs["adam"] + lrs["adamw"] and all(0.02 <= lr <= 0.05 for v in lrs.values() for lr in v)


def test_enqueued_lr_is_checked_against_the_per_optimizer_ranges(write_study):
    from hpsearch._errors import SpecError
    from hpsearch.spec import load_spec
    from tests.conftest import study_text

    ok = write_study(text=study_text(space="") + '[[enqueue]]\noptimizer = "sgd"\nlr = 0.2\n')
    assert load_spec(ok).enqueue[0]["lr"] == 0.2
    bad = write_study(text=study_text(space="") + "[[enqueue]]\nlr = 0.5\n")
    with pytest.raises(SpecError, match=r"enqueue\[0\]\.lr = 0\.5 is outside this study's space for 'lr': "
                                        r"optimizer \"sgd\": 0\.001\.\.0\.3 log; optimizer \"adam\""):
        load_spec(bad)
