"""The scratch strategy: the report's base CNN is an exact point of the space; impossible architectures are
rejected before training; FC-only models work."""

from __future__ import annotations

import optuna
import pytest
import torch
import torch.nn as nn

from hpsearch.data import DataInfo
from hpsearch.space import resolve_space
from hpsearch.strategies import Rejected
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
