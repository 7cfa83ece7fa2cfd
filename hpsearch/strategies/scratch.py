"""``scratch``: a plain CNN built from the sampled config (conv blocks, then FC layers; 0 conv blocks = FC-only).

The report's base CNN, Conv(3,6,5)-pool-Conv(6,16,5)-pool-FC 120-84-10, is the point
conv_layers=2, channels_0=6, channels_1=16, kernel_size=5, padding=0, stride=1, pool="max", pool_kernel=2,
batch_norm=false, fc_layers=3, fc_width_0=120, fc_width_1=84, dropout=0.
"""

from __future__ import annotations

from dataclasses import dataclass

import optuna
import torch.nn as nn

from hpsearch.data import DataInfo
from hpsearch.space import Categorical, Fixed, FloatRange, IntRange, Param, Space
from hpsearch.strategies._base import Rejected, Strategy, suggest_train, train_params
from hpsearch.train import Built, TrainConfig

PARAMS: dict[str, Param] = {
    "conv_layers": Param(IntRange(0, 4), int, "conv blocks (0 = FC-only model)", low=0, high=8),
    "channels": Param(IntRange(4, 128, log=True), int, "output channels of each conv block", low=1, high=2048,
                      per="conv_layers"),
    "kernel_size": Param(Categorical((1, 3, 5, 7)), int, "conv kernel size", low=1, high=15),
    "padding": Param(Categorical((0, "same")), (int, str), 'conv padding: pixels, or "same" (kernel_size // 2)',
                     allowed=(0, 1, 2, 3, "same")),
    "stride": Param(Categorical((1, 2)), int, "conv stride", low=1, high=4),
    "pool": Param(Categorical(("max", "none")), str, "pooling after each conv block", allowed=("max", "avg", "none")),
    "pool_after": Param(Fixed("each"), str, "pool after each conv block, or only after the last",
                        allowed=("each", "last")),
    "pool_kernel": Param(Categorical((2, 3)), int, "pooling kernel (= its stride)", low=2, high=8),
    "batch_norm": Param(Categorical((False, True)), bool, "BatchNorm after each conv"),
    # Up to 16: the report's FC-only model with nine hidden layers of 32 has 10.
    "fc_layers": Param(IntRange(1, 8), int, "linear layers including the output layer", low=1, high=16),
    "fc_width": Param(IntRange(16, 1024, log=True), int, "width of each hidden linear layer", low=1, high=16384,
                      per="fc_layers"),
    "dropout": Param(FloatRange(0.0, 0.5), float, "dropout before each hidden linear layer", low=0.0, high=0.95),
    **train_params(batch_sizes=(64, 128, 256)),
}


@dataclass(frozen=True)
class ScratchConfig:
    channels: tuple[int, ...]  # one per conv block; () = FC-only
    kernel_size: int
    padding: int | str
    stride: int
    pool: str
    pool_kernel: int
    pool_after: str  # each | last (the report's MNIST net pools once, after its second conv)
    batch_norm: bool
    fc_widths: tuple[int, ...]  # hidden linear layers; the output layer is added for the dataset's classes
    dropout: float
    train: TrainConfig


def suggest(trial: optuna.Trial, space: Space, epochs: int, info: DataInfo) -> ScratchConfig:
    n_conv = space.suggest(trial, "conv_layers")
    channels = tuple(space.suggest(trial, "channels", i) for i in range(n_conv))
    # Conv-block parameters mean nothing for an FC-only model: not sampled, so they do not blur TPE's model.
    kernel_size, padding, stride, pool, batch_norm = 1, 0, 1, "none", False
    if n_conv:
        kernel_size = space.suggest(trial, "kernel_size")
        padding = space.suggest(trial, "padding")
        stride = space.suggest(trial, "stride")
        pool = space.suggest(trial, "pool")
        batch_norm = space.suggest(trial, "batch_norm")
    n_fc = space.suggest(trial, "fc_layers")
    config = ScratchConfig(
        channels=channels,
        kernel_size=kernel_size,
        padding=padding,
        stride=stride,
        pool=pool,
        pool_kernel=space.suggest(trial, "pool_kernel") if pool != "none" else 0,
        pool_after=space.suggest(trial, "pool_after") if pool != "none" else "each",
        batch_norm=batch_norm,
        fc_widths=tuple(space.suggest(trial, "fc_width", i) for i in range(n_fc - 1)),
        dropout=space.suggest(trial, "dropout") if n_fc > 1 else 0.0,
        train=suggest_train(trial, space, epochs),
    )
    feature_size(config, info)  # rejects, before any training, an architecture that shrinks below 1x1
    return config


def _pools(config: ScratchConfig, block: int) -> bool:
    """Whether conv block ``block`` is followed by pooling."""
    return config.pool != "none" and (config.pool_after == "each" or block == len(config.channels) - 1)


def _pad(config: ScratchConfig) -> int:
    return config.kernel_size // 2 if config.padding == "same" else int(config.padding)


def feature_size(config: ScratchConfig, info: DataInfo) -> tuple[int, int]:
    """Spatial size after the conv blocks; raises Rejected naming the block where it drops below 1x1."""
    h, w = info.height, info.width
    pad = _pad(config)
    for i in range(len(config.channels)):
        h, w = ((s + 2 * pad - config.kernel_size) // config.stride + 1 for s in (h, w))
        if min(h, w) < 1:
            raise Rejected(f"conv block {i} (kernel {config.kernel_size}, padding {config.padding}, stride "
                           f"{config.stride}) shrinks the {info.height}x{info.width} input below 1x1")
        if _pools(config, i):
            if min(h, w) < config.pool_kernel:
                raise Rejected(f"pooling {config.pool_kernel} after conv block {i} meets a {h}x{w} feature map: "
                               f"it would shrink below 1x1")
            h, w = h // config.pool_kernel, w // config.pool_kernel
    return h, w


def build(config: ScratchConfig, info: DataInfo) -> Built:
    layers: list[nn.Module] = []
    in_ch = info.channels
    for block, out_ch in enumerate(config.channels):
        layers.append(nn.Conv2d(in_ch, out_ch, config.kernel_size, stride=config.stride, padding=_pad(config),
                                bias=not config.batch_norm))
        if config.batch_norm:
            layers.append(nn.BatchNorm2d(out_ch))
        layers.append(nn.ReLU(inplace=True))
        if _pools(config, block):
            pool = nn.MaxPool2d if config.pool == "max" else nn.AvgPool2d
            layers.append(pool(config.pool_kernel))
        in_ch = out_ch
    h, w = feature_size(config, info)
    layers.append(nn.Flatten())
    width = in_ch * h * w
    for hidden in config.fc_widths:
        if config.dropout > 0:
            layers.append(nn.Dropout(config.dropout))
        layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
        width = hidden
    layers.append(nn.Linear(width, info.num_classes))
    model = nn.Sequential(*layers)
    return Built(model=model, param_groups=[{"params": list(model.parameters())}])


STRATEGY = Strategy(name="scratch", params=PARAMS, suggest=suggest, build=build,
                    help="a CNN built from sampled conv/FC layer counts, kernels, padding, stride, pooling")
