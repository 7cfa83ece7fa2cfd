"""One input pipeline for training and the saved model: the model ``evaluate --save`` wrote, loaded by ``load_model``
(the Classifier every exported file is traced from), normalises and resizes uint8 images exactly as ``train.BatchPrep``
fed the network during training. A drift would leave saved models silently wrong on every image."""

from __future__ import annotations

import tomllib
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
import torch.nn as nn

import hpsearch
from hpsearch.data import load
from hpsearch.saved_model import built_info, save_model
from hpsearch.spec import spec_from_dict
from hpsearch.strategies import STRATEGIES
from hpsearch.train import BatchPrep
from tests.conftest import ONE_CONFIG_SPACE, study_text

CPU = torch.device("cpu")
RGB = 'dataset = "synthetic:classes=3,size=12,channels=3,train=64,test=8"'
STUDIES = {
    # scratch: the network takes the dataset's 12 px images as they are, with the dataset's statistics
    "not resized": study_text(dataset=RGB, space=ONE_CONFIG_SPACE),
    # zoo: the network takes 16 px images (resized on the device); below, the model's own statistics as well
    "resized": f'name = "z"\n{RGB}\nstrategy = "zoo"\nepochs = 1\nn_trials = 1\n'
               '[space]\nmodel = "resnet18"\ninput_size = 16\nstem = "cifar"\nbatch_size = 16\n',
}


@pytest.mark.parametrize("case", list(STUDIES))
def test_a_saved_model_sees_its_images_as_training_did(tmp_path: Path, case: str) -> None:
    spec = spec_from_dict(tomllib.loads(STUDIES[case]), where="test")
    assert spec.tta == "none"  # the Classifier's output below is then its network's input
    data = load(spec.dataset, data_dir=tmp_path, cache_dir=tmp_path, device=CPU, val_fraction=spec.val_fraction,
                seed=spec.seed)
    strategy = STRATEGIES[spec.strategy]
    trial = optuna.create_study().ask()  # in memory: the parameters the strategy suggests
    config = strategy.suggest(trial, spec.space, spec.epochs, data.info)
    built = strategy.build(config, data.info)
    if case == "resized":  # a pretrained backbone's statistics win over the dataset's, in training and when saved
        built = replace(built, mean=(0.3, 0.4, 0.5), std=(0.2, 0.25, 0.3))
    weights = save_model(built.model, built_info(built, data.info), SimpleNamespace(number=0, params=trial.params),
                         spec, config, 0, tmp_path / "models" / "m")
    saved = hpsearch.load_model(weights)
    saved.model = nn.Identity()  # what reaches the network: the preprocessed batch itself

    images = data.train.x[:8]
    trained_on = BatchPrep(data, built, CPU)(images)  # the training batch step, without augmentation
    with torch.inference_mode():
        seen = saved(images)
    assert trained_on.shape == (8, 3, *((16, 16) if case == "resized" else (12, 12)))
    # Not bit-equal by contract: training runs NHWC (channels_last) kernels and the saved model NCHW ones.
    torch.testing.assert_close(seen, trained_on, rtol=0, atol=1e-5)
    assert trained_on.abs().max() > 0.5  # normalised values, not a blank batch that would match anything
