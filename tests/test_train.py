"""fit(): learns, detects divergence, resumes from its checkpoint to the same result, schedules on val accuracy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from hpsearch.data import load
from hpsearch.train import Built, Diverged, FitResult, TrainConfig, fit, make_optimizer, make_scheduler

CPU = torch.device("cpu")


@pytest.fixture
def data(tmp_path: Path):
    return load("synthetic:classes=4,size=12,train=480,test=16", data_dir=tmp_path, cache_dir=tmp_path, device=CPU,
                val_fraction=0.2)


def _cnn(info) -> Built:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(info.channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, info.num_classes))
    return Built(model=model, param_groups=[{"params": list(model.parameters())}])


def _config(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "batch_size": 32, "optimizer": "adam", "lr": 3e-3, "weight_decay": 0.0, **kw})


def test_small_cnn_beats_chance_clearly_on_synthetic_data_in_two_epochs(data):
    result = fit(_cnn(data.info), data, _config(), device=CPU, seed=0)
    assert result.best_val_accuracy > 0.6  # chance is 0.25
    assert len(result.val_accuracy) == len(result.train_loss) == 2
    assert result.train_loss[1] < result.train_loss[0]


def test_divergence_is_reported(data):
    with pytest.raises(Diverged, match=r"training loss is (nan|inf) at epoch 0"):
        fit(_cnn(data.info), data, _config(optimizer="sgd", lr=1e6), device=CPU, seed=0)


def test_resume_from_checkpoint_gives_the_uninterrupted_result(data, tmp_path: Path):
    config = _config(epochs=3, augmentation="base", scheduler="cosine")
    straight = fit(_cnn(data.info), data, config, device=CPU, seed=7)

    checkpoint = tmp_path / "ckpt.pt"

    class Killed(Exception):
        pass

    def die_after_first_epoch(epoch: int, result: FitResult) -> None:
        if epoch == 0:
            raise Killed

    with pytest.raises(Killed):
        fit(_cnn(data.info), data, config, device=CPU, seed=7, on_epoch=die_after_first_epoch, checkpoint=checkpoint)
    assert checkpoint.is_file()
    seen: list[int] = []
    resumed = fit(_cnn(data.info), data, config, device=CPU, seed=7, checkpoint=checkpoint,
                  on_epoch=lambda epoch, result: seen.append(epoch))
    assert seen == [1, 2]  # epoch 0 was not trained again
    assert resumed.val_accuracy == straight.val_accuracy
    assert resumed.train_loss == pytest.approx(straight.train_loss, rel=1e-5)


def test_plateau_scheduler_watches_validation_accuracy():
    param = nn.Parameter(torch.zeros(1))
    optimizer = make_optimizer(_config(optimizer="sgd", lr=1.0, scheduler="plateau"), [{"params": [param]}])
    scheduler = make_scheduler(_config(scheduler="plateau", plateau_factor=0.5, plateau_patience=1), optimizer)
    for accuracy in (0.5, 0.6, 0.7, 0.8):  # rising accuracy: no cut (mode "max")
        scheduler.step(accuracy)
    assert optimizer.param_groups[0]["lr"] == 1.0
    for accuracy in (0.8, 0.8):
        scheduler.step(accuracy)
    assert optimizer.param_groups[0]["lr"] == 0.5


def test_frozen_parameters_are_left_out_of_the_optimizer():
    frozen, trained = nn.Parameter(torch.zeros(1), requires_grad=False), nn.Parameter(torch.zeros(1))
    optimizer = make_optimizer(_config(), [{"params": [frozen]}, {"params": [trained], "lr": 0.5}])
    assert [g["params"] for g in optimizer.param_groups] == [[trained]]
    assert optimizer.param_groups[0]["lr"] == 0.5
