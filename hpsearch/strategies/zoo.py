"""``zoo``: torchvision's AlexNet, ResNet18 and VGG16, trained from random initialisation.

Each model is torchvision's own architecture built with ``num_classes = N``, so the last layer of AlexNet's and
VGG16's ``classifier`` (not only ResNet's ``fc``) has N outputs. Images are resized on the device, in batch, to
the sampled ``input_size``.

Input sizes: AlexNet's three stride-2 max-pools after a stride-4 conv need >= 63 px, VGG16's five pools >= 32 px;
ResNet18 ends in an adaptive pool and takes any size. An Optuna categorical cannot change its choices between
trials under one name, so the size is sampled as ``input_size_<model>`` from the ``input_size`` choices (or
range) that model can take: a choice below a model's minimum is never sampled, and a space in which a model has
no size left is refused when the study file is loaded.

1-channel datasets: the first conv is built with the dataset's channel count instead of repeating grey into
three channels. A conv over three identical channels is the same function as one conv with the weights summed,
so nothing is lost, and with random weights there are no RGB filters to preserve; the first layer costs a third.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import optuna
import torch.nn as nn
import torchvision.models as tvm

from hpsearch.data import DataInfo
from hpsearch.space import Categorical, Dim, Fixed, IntRange, Param, Space, describe
from hpsearch.strategies._base import Strategy, suggest_train, train_params
from hpsearch.train_types import Built, TrainConfig

MODELS = ("alexnet", "resnet18", "vgg16")
# px; found by running each model at size and size-1. ResNet18 runs at any size (adaptive pool); 8 is the
# space's floor: below it the imagenet stem leaves 1x1 maps from layer2 on.
MIN_INPUT = {"alexnet": 63, "resnet18": 8, "vgg16": 32}

PARAMS: dict[str, Param] = {
    "model": Param(Categorical(MODELS), str, "torchvision architecture (random initialisation)", allowed=MODELS),
    "input_size": Param(Categorical((32, 64, 96, 128)), int,
                        "square size images are resized to on the device; sampled per model as input_size_<model> "
                        "from the choices >= that model's minimum (alexnet 63, vgg16 32, resnet18 8)",
                        low=8, high=512, per="model"),
    "stem": Param(Categorical(("imagenet", "cifar")), str,
                  "resnet18 stem: imagenet (7x7 stride-2 conv + max-pool) or cifar (3x3 stride-1 conv, no pool)",
                  allowed=("imagenet", "cifar")),
    **train_params(batch_sizes=(64, 128, 256)),
}


@dataclass(frozen=True)
class ZooConfig:
    model: str
    input_size: int
    stem: str  # resnet18 only; "" for the other models
    train: TrainConfig


def sizes_for(dim: Dim, model: str) -> Dim | None:
    """The part of an ``input_size`` dimension that ``model`` can take, or None when nothing is left."""
    low = MIN_INPUT[model]
    if isinstance(dim, Fixed):
        return dim if isinstance(dim.value, int) and dim.value >= low else None
    if isinstance(dim, Categorical):
        kept = tuple(c for c in dim.choices if isinstance(c, int) and c >= low)
        return Categorical(kept) if kept else None
    if isinstance(dim, IntRange):
        # The first point of the range's step grid at or above the minimum.
        start = dim.low if dim.low >= low else dim.low + math.ceil((low - dim.low) / dim.step) * dim.step
        return IntRange(start, dim.high, step=dim.step, log=dim.log) if start <= dim.high else None
    return None  # input_size is an int key: a FloatRange cannot reach here


def check(space: Space) -> None:
    models = space.dims["model"]
    chosen = (models.value,) if isinstance(models, Fixed) else models.choices if isinstance(models, Categorical) else ()
    for model in chosen:
        if sizes_for(space.dims["input_size"], str(model)) is None:
            sizes = describe(space.dims["input_size"])
            raise ValueError(f"input_size: {sizes} has no size >= {MIN_INPUT[str(model)]}, the smallest {model} "
                             f"can take; add one or remove {model} from model")


def suggest(trial: optuna.Trial, space: Space, epochs: int, info: DataInfo) -> ZooConfig:
    model = space.suggest(trial, "model")
    sizes = sizes_for(space.dims["input_size"], model)
    assert sizes is not None  # check() refused the study file otherwise
    input_size = Space(space.params, {"input_size": sizes}).suggest(trial, "input_size", model)
    return ZooConfig(
        model=model,
        input_size=input_size,
        stem=space.suggest(trial, "stem") if model == "resnet18" else "",
        train=suggest_train(trial, space, epochs),
    )


def _conv_like(conv: nn.Conv2d, in_channels: int, *, kaiming: bool) -> nn.Conv2d:
    """``conv`` rebuilt for ``in_channels`` inputs, initialised as torchvision initialises that model."""
    new = nn.Conv2d(in_channels, conv.out_channels, cast(tuple[int, int], conv.kernel_size),
                    stride=cast(tuple[int, int], conv.stride), padding=cast(tuple[int, int], conv.padding),
                    bias=conv.bias is not None)
    if kaiming:  # ResNet and VGG: kaiming_normal_(fan_out); AlexNet keeps PyTorch's default init
        nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
        if new.bias is not None:
            nn.init.zeros_(new.bias)
    return new


def _adapt_first(features: nn.Module, in_channels: int, *, kaiming: bool) -> None:
    assert isinstance(features, nn.Sequential)  # AlexNet's and VGG16's .features
    conv = features[0]
    assert isinstance(conv, nn.Conv2d)
    features[0] = _conv_like(conv, in_channels, kaiming=kaiming)


def build(config: ZooConfig, info: DataInfo) -> Built:
    n, c = info.num_classes, info.channels
    net: nn.Module
    if config.model in ("alexnet", "vgg16"):
        net = tvm.alexnet(num_classes=n) if config.model == "alexnet" else tvm.vgg16(num_classes=n)
        if c != 3:
            _adapt_first(net.get_submodule("features"), c, kaiming=config.model == "vgg16")
    elif config.model == "resnet18":
        resnet = net = tvm.resnet18(num_classes=n)
        if config.stem == "cifar":  # the standard small-image ResNet18: keep full resolution into layer1
            resnet.conv1 = nn.Conv2d(c, 64, 3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(resnet.conv1.weight, mode="fan_out", nonlinearity="relu")
            resnet.maxpool = nn.Identity()
        elif c != 3:
            resnet.conv1 = _conv_like(resnet.conv1, c, kaiming=True)
    else:
        raise ValueError(f"model {config.model!r} is not known; allowed: {', '.join(MODELS)}")
    return Built(model=net, param_groups=[{"params": list(net.parameters())}], input_size=config.input_size)


STRATEGY = Strategy(name="zoo", params=PARAMS, suggest=suggest, build=build, check=check,
                    help="torchvision AlexNet / ResNet18 / VGG16 from random init, classifier ending in N classes")
