"""``scratch``: a plain CNN built from the sampled config (conv blocks, then FC layers; 0 conv blocks = FC-only).

The report's base CNN, Conv(3,6,5)-pool-Conv(6,16,5)-pool-FC 120-84-10, is the point
conv_layers=2, channels_0=6, channels_1=16, kernel_size=5, padding=0, stride=1, pool="max", pool_kernel=2,
batch_norm=false, fc_layers=3, fc_width_0=120, fc_width_1=84, dropout=0.

The airbench-class keys (fixed to the plain CNN by default) make airbench94's network (github.com/KellerJordan/
cifar10-airbench) one point of the space too: whiten=true, conv_layers=3, channels 64-256-256, block_convs=2,
block_layout="airbench", activation="gelu", dirac_init=true, global_pool="max", fc_layers=1, bn_scale=false,
bn_momentum=0.4, logit_scale=1/9 (studies/cifar10-fast.toml enqueues it first).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import optuna
import torch
import torch.nn as nn

from hpsearch._errors import Rejected
from hpsearch.data import DataInfo
from hpsearch.space import Categorical, Fixed, FloatRange, IntRange, Param, Space
from hpsearch.strategies._base import Strategy, suggest_train, train_params
from hpsearch.train_types import Built, TrainConfig

PARAMS: dict[str, Param] = {
    "conv_layers": Param(IntRange(0, 4), int, "conv blocks (0 = FC-only model)", low=0, high=8),
    "channels": Param(IntRange(4, 128, log=True), int, "output channels of each conv block", low=1, high=2048,
                      per="conv_layers"),
    "kernel_size": Param(Categorical((1, 3, 5, 7)), int, "conv kernel size", low=1, high=15),
    "padding": Param(Categorical((0, "same")), (int, str), 'conv padding: pixels, or "same" (kernel_size // 2)',
                     allowed=(0, 1, 2, 3, "same")),
    "stride": Param(Categorical((1, 2)), int, "conv stride (of a block's first conv)", low=1, high=4),
    "pool": Param(Categorical(("max", "none")), str, "pooling in each conv block", allowed=("max", "avg", "none")),
    "pool_after": Param(Fixed("each"), str, "pool in each conv block, or only in the last",
                        allowed=("each", "last")),
    "pool_kernel": Param(Categorical((2, 3)), int, "pooling kernel (= its stride)", low=2, high=8),
    "batch_norm": Param(Categorical((False, True)), bool, "BatchNorm after each conv"),
    # Up to 16: the report's FC-only model with nine hidden layers of 32 has 10.
    "fc_layers": Param(IntRange(1, 8), int, "linear layers including the output layer", low=1, high=16),
    "fc_width": Param(IntRange(16, 1024, log=True), int, "width of each hidden linear layer", low=1, high=16384,
                      per="fc_layers"),
    "dropout": Param(FloatRange(0.0, 0.5), float, "dropout before each hidden linear layer", low=0.0, high=0.95),
    # ---- the airbench-class keys: fixed to the plain CNN above unless a study opens them up
    "width_scale": Param(Fixed(1.0), float, "multiplier on every conv block's channels (rounded, at least 1): "
                         "scales a network's width and keeps its shape", low=0.05, high=16.0),
    "block_convs": Param(Fixed(1), int, "convolutions per conv block (one pooling per block)", low=1, high=4),
    "block_layout": Param(Fixed("classic"), str, 'order in a block: "classic" (conv -> norm -> act, per conv, then '
                          'pool) or "airbench" (conv -> pool -> norm -> act, then conv -> norm -> act)',
                          allowed=("classic", "airbench")),
    "activation": Param(Fixed("relu"), str, "activation after each conv and hidden linear layer",
                        allowed=("relu", "gelu")),
    "residual": Param(Fixed(False), bool, "blocks of 2+ convs add their first conv's output to their last's"),
    "whiten": Param(Fixed(False), bool, "a frozen 2x2 patch-whitening conv first, set from the training images' "
                    "patch covariance"),
    "dirac_init": Param(Fixed(False), bool, "conv filters start as the identity on their first in_channels"),
    "global_pool": Param(Fixed("none"), str, "pool the last feature map to 1x1 before the linear layers",
                         allowed=("none", "max", "avg")),
    "bn_momentum": Param(Fixed(0.1), float, "BatchNorm running-statistics momentum (PyTorch's: the new batch's "
                         "weight)", low=0.001, high=1.0),
    "bn_scale": Param(Fixed(True), bool, "BatchNorm learns a per-channel scale (false: fixed at 1, as airbench94)"),
    "norm_lr_scale": Param(Fixed(1.0), float, "LR multiplier of the BatchNorm parameters (their weight decay is "
                           "divided by it: the same decay per step)", low=0.01, high=1000.0),
    "logit_scale": Param(Fixed(1.0), float, "multiplier on the logits (airbench94: 1/9)", low=0.001, high=100.0),
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
    block_convs: int = 1
    block_layout: str = "classic"
    activation: str = "relu"
    residual: bool = False
    whiten: bool = False
    dirac_init: bool = False
    global_pool: str = "none"
    bn_momentum: float = 0.1
    bn_scale: bool = True
    norm_lr_scale: float = 1.0
    logit_scale: float = 1.0


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
    # The airbench-class keys, after the others (earlier parameters are drawn in the order they always were), and
    # only where they mean something: block knobs with conv blocks, BatchNorm knobs with BatchNorm.
    if n_conv:
        block_convs = space.suggest(trial, "block_convs")
        config = _with(
            config,
            block_convs=block_convs,
            block_layout=space.suggest(trial, "block_layout"),
            activation=space.suggest(trial, "activation"),
            residual=space.suggest(trial, "residual") if block_convs > 1 else False,
            whiten=space.suggest(trial, "whiten"),
            dirac_init=space.suggest(trial, "dirac_init"),
            global_pool=space.suggest(trial, "global_pool"),
        )
        if batch_norm:
            config = _with(config, bn_momentum=space.suggest(trial, "bn_momentum"),
                           bn_scale=space.suggest(trial, "bn_scale"),
                           norm_lr_scale=space.suggest(trial, "norm_lr_scale"))
    else:
        config = _with(config, activation=space.suggest(trial, "activation") if n_fc > 1 else "relu")
    config = _with(config, logit_scale=space.suggest(trial, "logit_scale"))
    if n_conv:  # one knob for capacity: the blocks' channels scaled together (the stored channels_i are unscaled)
        scale = space.suggest(trial, "width_scale")
        config = _with(config, channels=tuple(max(1, round(c * scale)) for c in channels))
    feature_size(config, info)  # rejects, before any training, an architecture that shrinks below 1x1
    return config


def _with(config: ScratchConfig, **changes: object) -> ScratchConfig:
    from dataclasses import replace

    return replace(config, **changes)  # type: ignore[arg-type]


def _pools(config: ScratchConfig, block: int) -> bool:
    """Whether conv block ``block`` has a pooling layer."""
    return config.pool != "none" and (config.pool_after == "each" or block == len(config.channels) - 1)


def _pad(config: ScratchConfig) -> int:
    return config.kernel_size // 2 if config.padding == "same" else int(config.padding)


WHITEN_KERNEL = 2  # airbench94's patch size


def _ops(config: ScratchConfig) -> Iterator[tuple[int, str, int]]:
    """The spatial operations of the conv part in order: (block, "conv", stride) and (block, "pool", kernel). A
    block's first conv has the stride; pooling follows its last conv ("classic") or its first ("airbench")."""
    for block in range(len(config.channels)):
        for i in range(config.block_convs):
            yield block, "conv", config.stride if i == 0 else 1
            last = i == config.block_convs - 1
            if _pools(config, block) and (i == 0 if config.block_layout == "airbench" else last):
                yield block, "pool", config.pool_kernel


def feature_size(config: ScratchConfig, info: DataInfo) -> tuple[int, int]:
    """Spatial size after the conv blocks; raises Rejected naming the block where it drops below 1x1."""
    h, w = info.height, info.width
    if config.whiten:
        h, w = h - WHITEN_KERNEL + 1, w - WHITEN_KERNEL + 1
    pad = _pad(config)
    for block, op, arg in _ops(config):
        if op == "conv":
            h, w = ((s + 2 * pad - config.kernel_size) // arg + 1 for s in (h, w))
            if min(h, w) < 1:
                raise Rejected(f"conv block {block} (kernel {config.kernel_size}, padding {config.padding}, stride "
                               f"{config.stride}) shrinks the {info.height}x{info.width} input below 1x1")
        else:
            if min(h, w) < arg:
                raise Rejected(f"pooling {arg} after conv block {block} meets a {h}x{w} feature map: it would "
                               "shrink below 1x1")
            h, w = h // arg, w // arg
    if config.channels and config.global_pool != "none":
        return 1, 1
    return h, w


class Residual(nn.Module):
    """x + body(x): a block's convs after its first, around which the residual connection runs."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def _act(config: ScratchConfig) -> nn.Module:
    return nn.GELU() if config.activation == "gelu" else nn.ReLU(inplace=True)


def _conv(config: ScratchConfig, cin: int, cout: int, stride: int) -> nn.Conv2d:
    layer = nn.Conv2d(cin, cout, config.kernel_size, stride=stride, padding=_pad(config), bias=not config.batch_norm)
    if config.dirac_init:
        with torch.no_grad():
            nn.init.dirac_(layer.weight[: min(cin, cout)])
    return layer


def _norm(config: ScratchConfig, channels: int) -> list[nn.Module]:
    if not config.batch_norm:
        return []
    bn = nn.BatchNorm2d(channels, momentum=config.bn_momentum)
    bn.weight.requires_grad_(config.bn_scale)
    return [bn]


def build(config: ScratchConfig, info: DataInfo) -> Built:
    """The plain CNN's layers are one flat nn.Sequential, as they always were (models saved by ``evaluate --save``
    keep loading); the airbench-class keys add to it (a whitening conv first, a Residual per block, pooling)."""
    act, norm = partial(_act, config), partial(_norm, config)
    layers: list[nn.Module] = []
    in_ch = info.channels
    whiten: nn.Conv2d | None = None
    if config.whiten and config.channels:
        whiten = nn.Conv2d(in_ch, 2 * in_ch * WHITEN_KERNEL**2, WHITEN_KERNEL, bias=True)
        whiten.weight.requires_grad_(False)  # set from the training images (init_whitening), then frozen
        layers += [whiten, act()]
        in_ch = whiten.out_channels
    pool_layer = nn.MaxPool2d if config.pool == "max" else nn.AvgPool2d
    for block, out_ch in enumerate(config.channels):
        pool: list[nn.Module] = [pool_layer(config.pool_kernel)] if _pools(config, block) else []
        first: list[nn.Module] = [_conv(config, in_ch, out_ch, config.stride)]
        if config.block_layout == "airbench":
            first += pool + norm(out_ch) + [act()]
            pool = []
        else:
            first += norm(out_ch) + [act()]
        rest: list[nn.Module] = []
        for _ in range(config.block_convs - 1):
            rest += [_conv(config, out_ch, out_ch, 1)] + norm(out_ch) + [act()]
        if config.residual and rest:
            rest = [Residual(nn.Sequential(*rest))]
        layers += first + rest + pool  # "classic": the pooling after the block's last conv
        in_ch = out_ch
    if config.channels and config.global_pool != "none":
        layers.append(nn.AdaptiveMaxPool2d(1) if config.global_pool == "max" else nn.AdaptiveAvgPool2d(1))
    h, w = feature_size(config, info)
    layers.append(nn.Flatten())
    width = in_ch * h * w
    for hidden in config.fc_widths:
        if config.dropout > 0:
            layers.append(nn.Dropout(config.dropout))
        layers += [nn.Linear(width, hidden), act()]
        width = hidden
    layers.append(nn.Linear(width, info.num_classes))
    if config.logit_scale != 1.0:
        layers.append(Scale(config.logit_scale))
    model = nn.Sequential(*layers)
    return Built(model=model, param_groups=_param_groups(model, config),
                 init_from_data=None if whiten is None else lambda images: init_whitening(whiten, images))


def _param_groups(model: nn.Module, config: ScratchConfig) -> list[dict[str, object]]:
    params = [p for p in model.parameters()]
    if config.norm_lr_scale == 1.0:
        return [{"params": params}]
    norms = [p for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()]
    ids = {id(p) for p in norms}
    scale = config.norm_lr_scale
    return [{"params": [p for p in params if id(p) not in ids]},
            {"params": norms, "lr": config.train.lr * scale, "weight_decay": config.train.weight_decay / scale}]


@torch.no_grad()
def init_whitening(conv: nn.Conv2d, images: torch.Tensor, eps: float = 5e-4) -> None:
    """airbench94's whitening filters from normalised training images [N, C, H, W]: the eigenvectors of the
    covariance of every k x k patch, each scaled by 1/sqrt(its eigenvalue + eps), and their negatives (2*C*k*k
    filters). The first layer then sees decorrelated, unit-variance patch components."""
    c, (kh, kw) = images.shape[1], conv.weight.shape[2:]
    patches = images.float().unfold(2, kh, 1).unfold(3, kw, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, c * kh * kw)
    patches = patches.double()
    cov = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # ascending
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.T.flip(0)
    filters = (eigenvectors / torch.sqrt(eigenvalues.clamp_min(0) + eps)[:, None]).reshape(-1, c, kh, kw)
    conv.weight.copy_(torch.cat((filters, -filters)).to(conv.weight.dtype))
    if conv.bias is not None:
        conv.bias.zero_()


STRATEGY = Strategy(name="scratch", params=PARAMS, suggest=suggest, build=build,
                    help="a CNN built from sampled conv/FC layer counts, kernels, padding, stride, pooling")
