"""The input pipeline a model is fed through, one definition for training and for the saved model.

uint8 (or 0..255 float) images [B, C, H, W] -> x/255 normalised per channel -> resized (bilinear) to the model's
square input size when it has one. The statistics are the model's own where its strategy gives them (a pretrained
backbone's), else the dataset's. ``train.BatchPrep`` runs ``normalise`` after the augmentation;
``saved_model.Classifier`` (hence ``load_model`` and every exported file) runs it on the constants ``save_model``
stored: a saved model sees its inputs exactly as training did (tests/test_preprocess.py holds the two equal).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hpsearch.data import DataInfo
from hpsearch.train_types import Built


@dataclass(frozen=True)
class InputPipeline:
    """What a model's inputs go through: normalisation statistics (0..1 units) and the resize (None: none)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: int | None

    @classmethod
    def of(cls, built: Built, info: DataInfo) -> InputPipeline:
        """The model's own statistics (``Built.mean``/``std``) win over the dataset's."""
        return cls(tuple(built.mean or info.mean), tuple(built.std or info.std), built.input_size)

    def constants(self, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) for ``normalise``: x/255 then (x - mean)/std folded into one multiply-add on 0..255."""
        mean = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, -1, 1, 1)
        return 1.0 / (255.0 * std), -mean / std


def normalise(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, input_size: int | None) -> torch.Tensor:
    """0..255 images -> the model's float input (``InputPipeline.constants`` gives ``scale`` and ``shift``)."""
    x = torch.addcmul(shift, x.float(), scale)
    if input_size is not None and input_size != x.shape[-1]:
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False, antialias=False)
    return x


def channels_last(device: torch.device) -> bool:
    """NHWC activations: tensor cores want them on CUDA; on CPU oneDNN's kernels measured faster too (2 threads,
    batch 64, one SGD step: the base CNN 4.06 ms vs 5.27 ms, a 3-conv 32-64-128 BatchNorm net 30.4 ms vs 45.9 ms).
    MPS is left as is: not measured."""
    return device.type in ("cuda", "cpu")
