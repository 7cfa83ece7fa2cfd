"""``finetune``: an ImageNet-pretrained ResNet18/ResNet50 with a new head; a trial picks how much of it trains.

``unfreeze`` names the lowest block that trains: fc (the head only), layer4, layer3, layer2 (that block and every
one above it), or all (conv1/bn1 and layer1 too). What is frozen is really frozen: requires_grad=False, in no
optimizer group, and its BatchNorm stays in eval mode through ``model.train()`` (its running statistics are the
pretrained ones; updating them from a few batches would change the frozen function).

The network is split into ``trunk`` (frozen) and ``top`` (trains); parameter names keep torchvision's block
names under them (``trunk.layer3.0.conv1.weight``, ``top.layer4...``, ``top.head.1.weight``). Without
augmentation the trunk's outputs never change, so fit trains ``top`` on them, computed once
(hpsearch.feature_cache).

Weights: ``"imagenet"`` is torchvision's weights API (its DEFAULT weights for the backbone: downloaded into the
torch hub cache when online, read from it when present); anything else is the path of a state_dict file for
torchvision's model (relative paths are read from the working directory), assumed to want torchvision's ImageNet
preprocessing. Inputs are normalised with the weights' own statistics.

1-channel datasets: grey is fed as RGB (each channel normalised with the weights' statistics for it), which is
what the pretrained conv1 was trained on, and conv1 keeps its weights whole (it may be unfrozen with "all").
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
import torch.nn as nn
import torchvision.models as tvm

from hpsearch import feature_cache
from hpsearch._errors import HpsearchError
from hpsearch.data import DataInfo
from hpsearch.space import Categorical, Fixed, FloatRange, IntRange, Param, Space
from hpsearch.strategies._base import Strategy, suggest_train, train_params
from hpsearch.train_types import Built, Precomputed, TrainConfig

BACKBONES = ("resnet18", "resnet50")
UNFREEZE = ("fc", "layer4", "layer3", "layer2", "all")
FIRST_TRAINED = {"fc": "head", "layer4": "layer4", "layer3": "layer3", "layer2": "layer2", "all": "conv1"}
# Backbone blocks from the top down: layer-wise LR decay multiplies by layer_decay once per step down.
BLOCKS_TOP_DOWN = (("layer4",), ("layer3",), ("layer2",), ("layer1",), ("conv1", "bn1"))
# torchvision's ImageNet preprocessing, for state_dict files (which carry no statistics of their own).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_weights(value: Any) -> None:
    """Load-time rule for ``weights``: "imagenet" or a file that exists (its content is read by build)."""
    if value != "imagenet" and not Path(value).expanduser().is_file():
        raise ValueError('must be "imagenet" or the path of a state_dict file; there is no file at that path')


PARAMS: dict[str, Param] = {
    "backbone": Param(Fixed("resnet18"), str, "pretrained torchvision backbone", allowed=BACKBONES),
    "weights": Param(Fixed("imagenet"), str, '"imagenet" (torchvision weights; torch hub cache) or a state_dict file',
                     check=check_weights),
    "unfreeze": Param(Categorical(UNFREEZE), str, "lowest block that trains (with every block above it and the head)",
                      allowed=UNFREEZE),
    "head_layers": Param(IntRange(1, 4), int, "linear layers of the head, including the output layer", low=1, high=8),
    "head_width": Param(IntRange(64, 1024, log=True), int, "width of each hidden head layer", low=1, high=16384,
                        per="head_layers"),
    "head_dropout": Param(FloatRange(0.0, 0.5), float, "dropout before each head layer", low=0.0, high=0.95),
    "head_lr": Param(FloatRange(1e-4, 1e-1, log=True), float, "learning rate of the head", low=1e-7, high=10.0),
    "backbone_lr": Param(FloatRange(1e-5, 1e-2, log=True), float,
                         "learning rate of the top unfrozen block (not sampled for unfreeze=fc)", low=1e-8, high=10.0),
    "layer_decay": Param(Fixed(1.0), float, "LR factor per block further down (1 = one backbone LR)",
                         low=0.01, high=1.0),
    "input_size": Param(Categorical((32, 64, 128, 224)), int, "square size images are resized to on the device",
                        low=16, high=512),
    # The LRs are head_lr/backbone_lr, one per parameter group: the shared "lr" key would mean nothing here.
    **{k: v for k, v in train_params(batch_sizes=(32, 64, 128)).items() if k != "lr"},
}


@dataclass(frozen=True)
class FinetuneConfig:
    backbone: str
    weights: str
    unfreeze: str
    head_widths: tuple[int, ...]  # hidden head layers; the output layer is added for the dataset's classes
    head_dropout: float
    head_lr: float
    backbone_lr: float  # 0 when only the head trains
    layer_decay: float
    input_size: int
    train: TrainConfig


def suggest(trial: optuna.Trial, space: Space, epochs: int, info: DataInfo) -> FinetuneConfig:
    unfreeze = space.suggest(trial, "unfreeze")
    n_head = space.suggest(trial, "head_layers")
    head_lr = space.suggest(trial, "head_lr")
    return FinetuneConfig(
        backbone=space.suggest(trial, "backbone"),
        weights=space.suggest(trial, "weights"),
        unfreeze=unfreeze,
        head_widths=tuple(space.suggest(trial, "head_width", i) for i in range(n_head - 1)),
        head_dropout=space.suggest(trial, "head_dropout"),
        head_lr=head_lr,
        backbone_lr=space.suggest(trial, "backbone_lr") if unfreeze != "fc" else 0.0,
        # A decay needs two trainable backbone blocks to mean anything.
        layer_decay=space.suggest(trial, "layer_decay") if unfreeze not in ("fc", "layer4") else 1.0,
        input_size=space.suggest(trial, "input_size"),
        train=suggest_train(trial, space, epochs, lr=head_lr),
    )


# ---------------------------------------------------------------- weights


@dataclass(frozen=True)
class Weights:
    state: dict[str, torch.Tensor]
    name: str  # for messages: the torchvision weights' name or the file's path
    identity: str  # for the feature-cache key: the name, and for a file its mtime and size too
    mean: tuple[float, ...]
    std: tuple[float, ...]


def load_weights(backbone: str, weights: str) -> Weights:
    if weights == "imagenet":
        api = tvm.get_model_weights(backbone).DEFAULT
        preprocess = api.transforms()
        try:
            state = api.get_state_dict(progress=False)  # the torch hub cache when there, else a download into it
        except Exception as e:  # offline shows up as URLError, OSError or RuntimeError depending on where it fails
            cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(api.url).name
            reason = str(e).splitlines()[0] if str(e) else "no message"
            raise HpsearchError(
                f'weights "imagenet" for {backbone}: {cached} is not there and downloading {api.url} failed '
                f"({type(e).__name__}: {reason}); put that file there, or set weights in [space] to the path of a "
                f"{backbone} state_dict file") from None
        return Weights(state, str(api), str(api), tuple(preprocess.mean), tuple(preprocess.std))
    path = Path(weights).expanduser()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # missing file, not a torch file, pickled objects beyond tensors
        raise HpsearchError(f"weights {weights!r}: cannot be read as a state_dict ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else 'no message'})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HpsearchError(f"weights {weights!r}: is not a state_dict (a dict of tensor names to tensors)")
    stat = path.stat()  # a file rewritten in place must not hit features cached from its old content
    return Weights(state, str(path), f"{path.resolve()}@{stat.st_mtime_ns}:{stat.st_size}", IMAGENET_MEAN,
                   IMAGENET_STD)


def pretrained(backbone: str, weights: Weights) -> tvm.ResNet:
    """torchvision's model with ``weights`` loaded; the 1000-class fc is left out (it is replaced by the head)."""
    net = tvm.get_model(backbone)
    state = {k: v for k, v in weights.state.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches are raised even with strict=False
        raise HpsearchError(f"weights {weights.name}: do not fit {backbone} "
                            f"({str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e})") from None
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise HpsearchError(f"weights {weights.name}: do not fit {backbone} ({len(missing)} missing keys, e.g. "
                            f"{missing[:1]}; {len(unexpected)} unexpected, e.g. {unexpected[:1]})")
    assert isinstance(net, tvm.ResNet)
    return net


# ---------------------------------------------------------------- the model


class GreyAsRGB(nn.Module):
    """Grey in 0..1 [B, 1, H, W] -> [B, 3, H, W] normalised per RGB channel: the image as an RGB one."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std  # broadcasting repeats the one channel three times


class FinetuneNet(nn.Module):
    def __init__(self, trunk: nn.Sequential, top: nn.Sequential) -> None:
        super().__init__()
        self.trunk = trunk.requires_grad_(False)
        self.top = top
        self.train()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.top(self.trunk(x))

    def train(self, mode: bool = True) -> FinetuneNet:
        super().train(mode)
        self.trunk.eval()  # frozen BatchNorm keeps the pretrained running statistics
        return self


def head(in_features: int, widths: tuple[int, ...], dropout: float, num_classes: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers += [nn.Linear(in_features, width), nn.ReLU(inplace=True)]
        in_features = width
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(in_features, num_classes))
    return nn.Sequential(*layers)


def build(config: FinetuneConfig, info: DataInfo) -> Built:
    weights = load_weights(config.backbone, config.weights)
    net = pretrained(config.backbone, weights)
    stages: list[tuple[str, nn.Module]] = []
    mean, std = weights.mean, weights.std
    if info.channels == 1:
        stages.append(("grey_as_rgb", GreyAsRGB(weights.mean, weights.std)))
        mean, std = (0.0,), (1.0,)  # BatchPrep only scales to 0..1; GreyAsRGB normalises per RGB channel
    elif info.channels != 3:
        raise HpsearchError(f"finetune: {info.name!r} has {info.channels} channels; pretrained backbones take 1 or 3")
    stages += [(name, getattr(net, name)) for name in
               ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool")]
    stages += [("flatten", nn.Flatten()),
               ("head", head(net.fc.in_features, config.head_widths, config.head_dropout, info.num_classes))]
    cut = [name for name, _ in stages].index(FIRST_TRAINED[config.unfreeze])
    model = FinetuneNet(nn.Sequential(OrderedDict(stages[:cut])), nn.Sequential(OrderedDict(stages[cut:])))

    top = dict(model.top.named_children())
    groups: list[dict[str, Any]] = [{"params": list(top["head"].parameters()), "lr": config.head_lr}]
    trained = [block for block in BLOCKS_TOP_DOWN if block[0] in top]
    for depth, block in enumerate(trained):
        params = [p for name in block for p in top[name].parameters()]
        groups.append({"params": params, "lr": config.backbone_lr * config.layer_decay**depth})

    precomputed = None
    if config.unfreeze != "all":  # with "all" nothing but the grey-to-RGB step is frozen: nothing to save
        key = (config.backbone, weights.identity, config.unfreeze, config.input_size, info.channels)
        precomputed = Precomputed(model=model.top,
                                  inputs=functools.partial(feature_cache.trunk_features, key, model.trunk))
    return Built(model=model, param_groups=groups, input_size=config.input_size, mean=mean, std=std,
                 precomputed=precomputed)


STRATEGY = Strategy(name="finetune", params=PARAMS, suggest=suggest, build=build,
                    help="an ImageNet-pretrained ResNet18/50 with a new head; searches what to unfreeze and the LRs")
