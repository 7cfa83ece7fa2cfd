"""fit(): learns, detects divergence, resumes from its checkpoint to the same result, schedules on val accuracy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from hpsearch.artifacts import load_checkpoint, open_artifact_store, save_checkpoint
from hpsearch.data import load
from hpsearch.schedules import make_optimizer, make_scheduler
from hpsearch.train import fit
from hpsearch.train_types import Built, Diverged, FitResult, TrainConfig

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


class Killed(Exception):
    pass


def _interrupted_then_resumed(built_fn, data, config, *, seed: int, tmp_path: Path, kill_after: int = 0):
    """fit killed after epoch ``kill_after`` is reported (its checkpoint stored through an FS artifact store),
    then a fresh build resumed from that checkpoint; returns (resumed result, epochs the resumed run trained)."""
    store = open_artifact_store(str(tmp_path / "artifacts"))

    def die(epoch: int, result: FitResult) -> None:
        if epoch == kill_after + 1:
            raise Killed  # a kill after epoch kill_after + 1 was reported but before it was checkpointed

    with pytest.raises(Killed):
        fit(built_fn(), data, config, device=CPU, seed=seed, on_epoch=die,
            on_checkpoint=lambda state: save_checkpoint(store, "ckpt.pt", state))
    state = load_checkpoint(store, "ckpt.pt")
    assert state is not None and state["epoch"] == kill_after
    torch.manual_seed(12345)  # the resuming process's global RNG is anywhere: the checkpoint must restore it
    seen: list[int] = []
    resumed = fit(built_fn(), data, config, device=CPU, seed=seed, resume=state,
                  on_epoch=lambda epoch, result: seen.append(epoch))
    return resumed, seen


def test_resume_from_checkpoint_gives_the_uninterrupted_result(data, tmp_path: Path):
    config = _config(epochs=3, augmentation="base", scheduler="cosine")
    straight = fit(_cnn(data.info), data, config, device=CPU, seed=7)
    resumed, seen = _interrupted_then_resumed(lambda: _cnn(data.info), data, config, seed=7, tmp_path=tmp_path)
    assert seen == [1, 2]  # epoch 0 was not trained again
    assert resumed.val_accuracy == straight.val_accuracy
    assert resumed.train_loss == straight.train_loss


def _dropout_cnn(info) -> Built:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(info.channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Dropout(0.5), nn.Linear(8 * 6 * 6, 32), nn.ReLU(), nn.Dropout(0.3),
                          nn.Linear(32, info.num_classes))
    return Built(model=model, param_groups=[{"params": list(model.parameters())}])


def test_dropout_model_resumes_bit_identically_on_cpu(data, tmp_path: Path):
    # dropout draws from torch's global generator: without it in the checkpoint the curves part after epoch 0
    config = _config(epochs=4, scheduler="multistep", optimizer="sgd", lr=0.05, momentum=0.9)
    torch.manual_seed(99)
    built = _dropout_cnn(data.info)
    straight = fit(built, data, config, device=CPU, seed=3)
    resumed, seen = _interrupted_then_resumed(lambda: _dropout_cnn(data.info), data, config, seed=3,
                                              tmp_path=tmp_path, kill_after=1)
    assert seen == [2, 3]
    assert resumed.train_loss == straight.train_loss  # bit-identical, not approximately
    assert resumed.val_accuracy == straight.val_accuracy


def test_checkpoint_rng_states_load_as_cpu_tensors(data, tmp_path: Path):
    store = open_artifact_store(str(tmp_path / "artifacts"))
    fit(_dropout_cnn(data.info), data, _config(epochs=1), device=CPU, seed=0,
        on_checkpoint=lambda state: save_checkpoint(store, "ckpt.pt", state))
    state = load_checkpoint(store, "ckpt.pt")
    assert state is not None
    assert set(state["rng"]) == {"generator", "cpu"}  # no CUDA state from a CPU trial (no context created)
    for value in state["rng"].values():
        assert value.device.type == "cpu" and value.dtype == torch.uint8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_checkpoint_resumes_with_its_rng_states_on_the_cpu(data, tmp_path: Path):
    cuda = torch.device("cuda")
    gpu_data = load("synthetic:classes=4,size=12,train=480,test=16", data_dir=tmp_path, cache_dir=tmp_path,
                    device=cuda, val_fraction=0.2)
    config = _config(epochs=3)
    store = open_artifact_store(str(tmp_path / "artifacts"))
    straight = fit(_dropout_cnn(data.info), gpu_data, config, device=cuda, seed=5)

    def die(epoch: int, result: FitResult) -> None:
        if epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        fit(_dropout_cnn(data.info), gpu_data, config, device=cuda, seed=5, on_epoch=die,
            on_checkpoint=lambda state: save_checkpoint(store, "ckpt.pt", state))
    state = load_checkpoint(store, "ckpt.pt")
    assert state is not None and "cuda" in state["rng"]
    assert all(v.device.type == "cpu" for v in state["rng"].values())
    torch.manual_seed(1)
    torch.cuda.manual_seed(1)
    resumed = fit(_dropout_cnn(data.info), gpu_data, config, device=cuda, seed=5, resume=state)
    assert resumed.val_accuracy == straight.val_accuracy


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
