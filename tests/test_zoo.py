"""zoo strategy: classifier shapes, 1-channel inputs, per-model input sizes, and a CLI run on synthetic data."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
import torch.nn as nn

from hpsearch._errors import SpecError
from hpsearch.data import DataInfo
from hpsearch.space import Categorical, Fixed, IntRange
from hpsearch.spec import load_spec
from hpsearch.strategies import zoo
from hpsearch.train_types import TrainConfig

TRAIN = TrainConfig(epochs=1, batch_size=8, optimizer="sgd", lr=0.01, weight_decay=0.0)


def info(channels: int, classes: int = 7) -> DataInfo:
    return DataInfo(name="t", channels=channels, height=16, width=16, num_classes=classes,
                    mean=(0.5,) * channels, std=(0.25,) * channels, flip=True, classes=tuple(map(str, range(classes))))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("model", "stem", "size", "channels"), [
    ("alexnet", "", 63, 3), ("alexnet", "", 63, 1), ("resnet18", "imagenet", 16, 1), ("resnet18", "cifar", 16, 3),
    ("vgg16", "", 32, 1),
])
def test_output_is_batch_by_classes_and_first_conv_takes_the_data_channels(model, stem, size, channels):
    built = zoo.build(zoo.ZooConfig(model, size, stem, TRAIN), info(channels))
    net = built.model.eval()
    with torch.no_grad():
        out = net(torch.randn(2, channels, size, size))
    assert out.shape == (2, 7)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].in_channels == channels
    assert built.input_size == size
    assert [p for g in built.param_groups for p in g["params"]] == list(net.parameters())


def test_cifar_stem_keeps_full_resolution_into_layer1():
    net = zoo.build(zoo.ZooConfig("resnet18", 32, "cifar", TRAIN), info(3)).model
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity)


def test_sizes_for_drops_choices_below_the_model_minimum():
    assert zoo.sizes_for(Categorical((32, 64, 96)), "alexnet") == Categorical((64, 96))
    assert zoo.sizes_for(Categorical((32, 64)), "vgg16") == Categorical((32, 64))
    assert zoo.sizes_for(Fixed(32), "alexnet") is None
    assert zoo.sizes_for(IntRange(32, 224, step=16), "alexnet") == IntRange(64, 224, step=16)  # on the step grid
    assert zoo.sizes_for(IntRange(16, 40), "vgg16") == IntRange(32, 40)
    assert zoo.sizes_for(IntRange(16, 40), "alexnet") is None


def test_each_model_samples_its_own_input_size_and_never_one_below_its_minimum(tmp_path):
    spec = load_spec(write(tmp_path, 'name = "z"\ndataset = "synthetic"\nstrategy = "zoo"\nepochs = 1\nn_trials = 1\n'
                                     '[space]\ninput_size = [32, 48, 64, 96]\n'))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen: dict[str, set[int]] = {m: set() for m in zoo.MODELS}
    for _ in range(60):
        trial = study.ask()
        config = zoo.suggest(trial, spec.space, 1, info(3))
        seen[config.model].add(config.input_size)
        assert trial.params[f"input_size_{config.model}"] == config.input_size
        assert ("stem" in trial.params) == (config.model == "resnet18")
        study.tell(trial, 0.5)
    assert seen == {"alexnet": {64, 96}, "resnet18": {32, 48, 64, 96}, "vgg16": {32, 48, 64, 96}}


def test_a_model_left_without_input_sizes_is_refused_at_load_time(tmp_path):
    path = write(tmp_path, 'name = "z"\ndataset = "synthetic"\nstrategy = "zoo"\nepochs = 1\nn_trials = 1\n'
                           '[space]\nmodel = ["alexnet", "resnet18"]\ninput_size = [32, 48]\n')
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert str(e.value) == (f"{path}: space.input_size: [32, 48] has no size >= 63, the smallest alexnet can take; "
                            "add one or remove alexnet from model")


def test_enqueue_names_the_per_model_input_size(tmp_path):
    head = 'name = "z"\ndataset = "synthetic"\nstrategy = "zoo"\nepochs = 1\nn_trials = 1\n'
    spec = load_spec(write(tmp_path, head + '[[enqueue]]\nmodel = "alexnet"\ninput_size_alexnet = 64\n'))
    assert spec.enqueue == ({"model": "alexnet", "input_size_alexnet": 64},)
    path = write(tmp_path, head + '[[enqueue]]\ninput_size_lenet = 64\n')
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert str(e.value).startswith(f"{path}: enqueue[0].input_size_lenet = 64 is not a parameter of this strategy; "
                                   "allowed: ")


def test_shipped_study_loads():
    spec = load_spec(Path(__file__).parent.parent / "studies" / "cifar10-zoo.toml")
    assert spec.strategy == "zoo" and spec.train_fraction < 1


def completed_trial(tmp_path: Path, name: str) -> optuna.trial.FrozenTrial:
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'db.sqlite'}")
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.COMPLETE, trial.user_attrs.get("error")
    return trial


def test_cli_runs_one_resnet18_trial_on_one_channel_synthetic_data(tmp_path, run_cli):
    study = write(tmp_path, 'name = "zoo-cli"\ndataset = "synthetic:channels=1,size=12,train=128,test=16"\n'
                            'strategy = "zoo"\nepochs = 1\nn_trials = 1\npruner = "none"\n'
                            '[space]\nmodel = "resnet18"\ninput_size = 16\nbatch_size = 32\n')
    done = run_cli("run", str(study), "--device", "cpu", "--storage", f"sqlite:///{tmp_path / 'db.sqlite'}")
    assert done.code == 0, done
    trial = completed_trial(tmp_path, "zoo-cli")
    assert trial.params["input_size_resnet18"] == 16
    assert trial.user_attrs["config"]["model"] == "resnet18"


@pytest.mark.slow
@pytest.mark.parametrize(("model", "size"), [("alexnet", 63), ("vgg16", 32)])
def test_cli_runs_alexnet_and_vgg16(tmp_path, run_cli, model, size):
    study = write(tmp_path, f'name = "zoo-{model}"\ndataset = "synthetic:channels=3,size=12,train=64,test=16"\n'
                            f'strategy = "zoo"\nepochs = 1\nn_trials = 1\npruner = "none"\n'
                            f'[space]\nmodel = "{model}"\ninput_size = {size}\nbatch_size = 32\noptimizer = "sgd"\n')
    done = run_cli("run", str(study), "--device", "cpu", "--storage", f"sqlite:///{tmp_path / 'db.sqlite'}")
    assert done.code == 0, done
    assert completed_trial(tmp_path, f"zoo-{model}").params[f"input_size_{model}"] == size
