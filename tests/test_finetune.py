"""finetune strategy: what trains for each unfreeze value, frozen really frozen, weights resolution, the
frozen-trunk feature cache against the uncached path, and a CLI run on synthetic data."""

from __future__ import annotations

import copy
import urllib.error
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import torch
import torch.nn as nn
import torchvision.models as tvm

from hpsearch import feature_cache
from hpsearch._errors import HpsearchError, SpecError
from hpsearch.data import Data, load
from hpsearch.schedules import make_optimizer
from hpsearch.spec import load_spec
from hpsearch.strategies import finetune
from hpsearch.train import BatchPrep, fit
from hpsearch.train_types import TrainConfig

STUDIES = Path(__file__).parent.parent / "studies"
TRAIN = TrainConfig(epochs=1, batch_size=16, optimizer="sgd", lr=0.05, weight_decay=0.0, momentum=0.9)
BACKBONE_BLOCKS = {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"}
TRAINS = {
    "fc": {"head"},
    "layer4": {"layer4", "head"},
    "layer3": {"layer3", "layer4", "head"},
    "layer2": {"layer2", "layer3", "layer4", "head"},
    "all": BACKBONE_BLOCKS | {"head"},
}


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """No ImageNet ResNet18 weights can be had here: a seeded random state_dict stands in for them."""
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.manual_seed(0)
    torch.save(tvm.resnet18().state_dict(), path)
    return path


def config(weights: Path | str, **changes: object) -> finetune.FinetuneConfig:
    base = finetune.FinetuneConfig(backbone="resnet18", weights=str(weights), unfreeze="fc", head_widths=(),
                                   head_dropout=0.0, head_lr=0.05, backbone_lr=0.01, layer_decay=1.0, input_size=32,
                                   train=TRAIN)
    return replace(base, **changes)  # type: ignore[arg-type]


def synthetic(channels: int = 3, train: int = 64) -> Data:
    return load(f"synthetic:channels={channels},size=16,train={train},test=8", data_dir=Path("/nonexistent"),
                cache_dir=Path("/nonexistent"), device=torch.device("cpu"), val_fraction=0.25)


def block(name: str) -> str:
    return name.split(".")[1]  # trunk.layer3.0.conv1.weight -> layer3; top.head.0.weight -> head


@pytest.mark.parametrize("unfreeze", finetune.UNFREEZE)
def test_exactly_the_unfrozen_blocks_train_and_only_they_reach_the_optimizer(resnet18_file, unfreeze):
    built = finetune.build(config(resnet18_file, unfreeze=unfreeze), synthetic().info)
    named = list(built.model.named_parameters())
    trainable = {block(n) for n, p in named if p.requires_grad}
    frozen = {block(n) for n, p in named if not p.requires_grad}
    assert trainable == TRAINS[unfreeze]
    assert frozen == BACKBONE_BLOCKS - TRAINS[unfreeze]
    optimizer = make_optimizer(TRAIN, built.param_groups)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for _, p in named if p.requires_grad}


def test_frozen_weights_and_batchnorm_statistics_are_bit_identical_after_training(resnet18_file):
    data = synthetic()
    # augmentation "base" keeps the trunk in the training loop (no feature cache), as in an augmented trial.
    built = finetune.build(config(resnet18_file, unfreeze="layer3", input_size=16), data.info)
    before = {k: v.clone() for k, v in built.model.state_dict().items()}
    fit(built, data, replace(TRAIN, augmentation="base"), device=torch.device("cpu"), seed=0)
    after = built.model.state_dict()
    trunk = [k for k in before if k.startswith("trunk.")]
    assert any("running_mean" in k for k in trunk) and any("layer2" in k for k in trunk)
    assert all(torch.equal(before[k], after[k]) for k in trunk)
    assert not torch.equal(before["top.layer3.0.conv1.weight"], after["top.layer3.0.conv1.weight"])
    assert not torch.equal(before["top.layer3.0.bn1.running_mean"], after["top.layer3.0.bn1.running_mean"])
    built.model.train()
    assert not any(m.training for m in built.model.trunk.modules())
    assert all(m.training for m in built.model.top.modules())


@pytest.mark.parametrize("widths", [(), (64,), (64, 32), (64, 32, 16)])
def test_head_has_the_sampled_layers_and_ends_in_the_dataset_classes(resnet18_file, widths):
    built = finetune.build(config(resnet18_file, head_widths=widths, head_dropout=0.2), synthetic().info)
    linears = [m for m in built.model.top.head if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linears] == [*widths, 4]
    assert linears[0].in_features == 512
    assert sum(isinstance(m, nn.Dropout) for m in built.model.top.head) == len(widths) + 1
    with torch.no_grad():
        assert built.model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_backbone_blocks_get_backbone_lr_decayed_per_block_down(resnet18_file):
    built = finetune.build(config(resnet18_file, unfreeze="all", head_lr=0.1, backbone_lr=0.01, layer_decay=0.5),
                           synthetic().info)
    assert [g["lr"] for g in built.param_groups] == [0.1, 0.01, 0.005, 0.0025, 0.00125, 0.000625]
    stem = {id(p) for p in built.model.top.conv1.parameters()} | {id(p) for p in built.model.top.bn1.parameters()}
    assert {id(p) for p in built.param_groups[-1]["params"]} == stem


def test_grey_images_are_fed_as_rgb_normalised_with_the_weights_statistics(resnet18_file):
    grey = synthetic(channels=1)
    built1 = finetune.build(config(resnet18_file, unfreeze="layer4"), grey.info)
    built3 = finetune.build(config(resnet18_file, unfreeze="layer4"), synthetic(channels=3).info)
    assert built3.mean == finetune.IMAGENET_MEAN and built1.mean == (0.0,)
    x = grey.val.x
    prep1 = BatchPrep(grey, built1, torch.device("cpu"))
    prep3 = BatchPrep(replace(grey, info=replace(grey.info, channels=3)), built3, torch.device("cpu"))
    with torch.no_grad():
        as_grey = built1.model.trunk(prep1(x))
        as_rgb = built3.model.trunk(prep3(x.expand(-1, 3, -1, -1)))
    torch.testing.assert_close(as_grey, as_rgb)


def test_imagenet_weights_are_read_from_the_torch_hub_cache(resnet18_file, tmp_path, monkeypatch):
    api = tvm.ResNet18_Weights.DEFAULT
    cached = tmp_path / "hub" / "checkpoints" / Path(api.url).name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(resnet18_file.read_bytes())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    built = finetune.build(config("imagenet"), synthetic().info)
    expected = torch.load(resnet18_file, weights_only=True)["layer1.0.conv1.weight"]
    assert torch.equal(built.model.trunk.layer1[0].conv1.weight, expected)
    assert built.mean == tuple(api.transforms().mean) and built.std == tuple(api.transforms().std)


def test_imagenet_weights_offline_and_not_cached_is_a_one_line_error(tmp_path, monkeypatch):
    def offline(url: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(HpsearchError) as e:
        finetune.build(config("imagenet"), synthetic().info)
    url = tvm.ResNet18_Weights.DEFAULT.url
    assert str(e.value) == (
        f'weights "imagenet" for resnet18: {tmp_path}/hub/checkpoints/resnet18-f37072fd.pth is not there and '
        f"downloading {url} failed (URLError: <urlopen error [Errno -3] Temporary failure in name resolution>); "
        "put that file there, or set weights in [space] to the path of a resnet18 state_dict file")


def test_weights_path_that_does_not_exist_is_refused_at_load_time(tmp_path):
    path = tmp_path / "study.toml"
    path.write_text('name = "f"\ndataset = "synthetic"\nstrategy = "finetune"\nepochs = 1\nn_trials = 1\n'
                    '[space]\nweights = ["imagenet", "missing.pth"]\n')
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert str(e.value) == (f'{path}: space.weights: ["imagenet", "missing.pth"] must be "imagenet" or the path '
                            "of a state_dict file; there is no file at that path")


def test_weights_of_another_backbone_are_refused_when_building(resnet18_file):
    with pytest.raises(HpsearchError, match=r"do not fit resnet50 \(size mismatch for layer1.0.conv1.weight"):
        finetune.build(config(resnet18_file, backbone="resnet50"), synthetic().info)


@pytest.mark.parametrize("unfreeze", ["fc", "layer4"])
def test_training_on_cached_trunk_outputs_matches_the_uncached_path(resnet18_file, unfreeze):
    feature_cache.clear()
    data = synthetic(train=96)
    train = replace(TRAIN, epochs=3, optimizer="adam", lr=1e-3)
    results = []
    for cached in (True, False):
        torch.manual_seed(0)  # the same head initialisation for both
        built = finetune.build(config(resnet18_file, unfreeze=unfreeze, head_lr=1e-3, backbone_lr=1e-4,
                                      input_size=24), data.info)
        if not cached:
            built.precomputed = None
        results.append(fit(built, data, train, device=torch.device("cpu"), seed=0))
    with_cache, without = results
    assert feature_cache.cached_bytes() > 0  # the cached run really went through the cache
    # fp16 storage of the trunk outputs is the only difference: the same predictions, losses to ~1e-3.
    assert with_cache.val_accuracy == without.val_accuracy
    torch.testing.assert_close(with_cache.train_loss, without.train_loss, rtol=5e-3, atol=0)


def test_a_trial_trained_on_cached_outputs_resumes_from_its_checkpoint(resnet18_file, tmp_path):
    data = synthetic()
    train = replace(TRAIN, epochs=3, optimizer="adam", lr=1e-3)
    torch.manual_seed(0)
    straight = fit(finetune.build(config(resnet18_file), data.info), data, train, device=torch.device("cpu"), seed=0)
    states: list[dict] = []
    torch.manual_seed(0)
    fit(finetune.build(config(resnet18_file), data.info), data, replace(train, epochs=2), device=torch.device("cpu"),
        seed=0, on_checkpoint=lambda state: states.append(copy.deepcopy(state)))
    torch.manual_seed(1)  # a retried trial's fresh head: its checkpoint must replace it
    resumed = fit(finetune.build(config(resnet18_file), data.info), data, train, device=torch.device("cpu"), seed=0,
                  resume=states[-1])
    assert resumed.val_accuracy == straight.val_accuracy
    assert resumed.train_loss == straight.train_loss


def test_a_trial_trained_on_cached_outputs_resumes_where_the_cache_cannot_be_used(resnet18_file, tmp_path,
                                                                                  monkeypatch):
    feature_cache.clear()
    data = synthetic(train=96)
    train = replace(TRAIN, epochs=2, optimizer="adam", lr=1e-3)
    small_lr = config(resnet18_file, head_lr=1e-3, backbone_lr=1e-4, input_size=24)  # as in the test above
    states: list[dict] = []
    torch.manual_seed(0)
    straight = fit(finetune.build(small_lr, data.info), data, train, device=torch.device("cpu"),
                   seed=0, on_checkpoint=lambda state: states.append(copy.deepcopy(state)))
    assert feature_cache.cached_bytes() > 0  # the first process trained on cached trunk outputs
    assert not any(k.startswith("trunk.") for k in states[0]["model"])  # the frozen trunk is not in the file
    feature_cache.clear()
    monkeypatch.setenv("HPSEARCH_FEATURE_CACHE_MB", "0")  # the resuming process cannot hold the features
    torch.manual_seed(1)
    seen: list[int] = []
    resumed = fit(finetune.build(small_lr, data.info), data, train, device=torch.device("cpu"), seed=0,
                  resume=states[0], on_epoch=lambda epoch, result: seen.append(epoch))
    assert feature_cache.cached_bytes() == 0
    assert seen == [1]
    # the uncached path runs the fp32 trunk every batch: the same predictions, losses to ~1e-3 (see above)
    assert resumed.val_accuracy == straight.val_accuracy
    torch.testing.assert_close(resumed.train_loss, straight.train_loss, rtol=5e-3, atol=0)


def test_trunk_outputs_are_reused_across_trials_and_bounded(resnet18_file, monkeypatch):
    feature_cache.clear()
    data = synthetic()
    built = finetune.build(config(resnet18_file), data.info)
    prep = BatchPrep(data, built, torch.device("cpu"))
    assert built.precomputed is not None
    first = built.precomputed.inputs(data, prep)
    again = finetune.build(config(resnet18_file, head_widths=(32,)), data.info).precomputed
    assert first is not None and again is not None
    second = again.inputs(data, prep)
    assert second is not None and second.train.x is first.train.x and second.val.x is first.val.x  # no recompute
    assert first.train.x.shape == (len(data.train), 512) and first.train.x.dtype == torch.float16
    assert feature_cache.cached_bytes() == (len(data.train) + len(data.val)) * 512 * 2
    # Another input size is another entry; with room for one, the least recently used one makes way.
    monkeypatch.setenv("HPSEARCH_FEATURE_CACHE_MB", str(feature_cache.cached_bytes() / 2**20))
    other = finetune.build(config(resnet18_file, input_size=48), data.info).precomputed
    assert other is not None and other.inputs(data, prep) is not None
    assert feature_cache.cached_bytes() == (len(data.train) + len(data.val)) * 512 * 2
    third = again.inputs(data, prep)
    assert third is not None and third.train.x is not first.train.x and torch.equal(third.train.x, first.train.x)
    # Outputs that alone exceed the budget are not cached: fit then trains through the trunk.
    monkeypatch.setenv("HPSEARCH_FEATURE_CACHE_MB", "0.01")
    assert other.inputs(data, prep) is None


def test_a_different_split_of_the_same_dataset_never_hits(resnet18_file):
    feature_cache.clear()
    built = finetune.build(config(resnet18_file), synthetic().info)
    assert built.precomputed is not None
    a = synthetic(train=64)
    b = synthetic(train=48)  # same name pattern, other images
    fa = built.precomputed.inputs(a, BatchPrep(a, built, torch.device("cpu")))
    fb = built.precomputed.inputs(b, BatchPrep(b, built, torch.device("cpu")))
    assert fa is not None and fb is not None and len(fb.train) == len(b.train) != len(fa.train)


@pytest.mark.parametrize("name", ["cifar10-finetune.toml", "mnist-finetune.toml"])
def test_shipped_studies_load(name):
    spec = load_spec(STUDIES / name)
    assert spec.strategy == "finetune" and spec.train_fraction < 1


def test_cli_runs_one_finetune_trial_on_synthetic_data(resnet18_file, tmp_path, run_cli):
    study = tmp_path / "study.toml"
    study.write_text(f'name = "ft-cli"\ndataset = "synthetic:channels=3,size=12,train=128,test=16"\n'
                     f'strategy = "finetune"\nepochs = 2\nn_trials = 1\npruner = "none"\n'
                     f'[space]\nweights = "{resnet18_file}"\nunfreeze = "fc"\ninput_size = 32\n'
                     f'augmentation = "none"\nbatch_size = 32\nhead_layers = 1\n')
    done = run_cli("run", str(study), "--device", "cpu", "--storage", f"sqlite:///{tmp_path / 'db.sqlite'}")
    assert done.code == 0, done
    (trial,) = optuna.load_study(study_name="ft-cli", storage=f"sqlite:///{tmp_path / 'db.sqlite'}").trials
    assert trial.state == optuna.trial.TrialState.COMPLETE, trial.user_attrs.get("error")
    assert trial.user_attrs["config"]["unfreeze"] == "fc"
    assert trial.user_attrs["trainable_param_count"] == 512 * 4 + 4


def test_unavailable_weights_stop_the_run_after_one_trial_with_one_line(tmp_path, monkeypatch, run_cli):
    def offline(url: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    study = tmp_path / "study.toml"
    study.write_text('name = "ft-offline"\ndataset = "synthetic:channels=3,size=12,train=64,test=8"\n'
                     'strategy = "finetune"\nepochs = 1\nn_trials = 5\n[space]\ninput_size = 32\n')
    result = run_cli("run", str(study))
    assert result.code == 1
    assert result.err.startswith('error: weights "imagenet" for resnet18: ') and result.err.count("\n") == 1
    assert "set weights in [space] to the path of a resnet18 state_dict file" in result.err
    trials = optuna.load_study(study_name="ft-offline", storage="sqlite:///hpsearch.db").trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL]  # not five failures in a row
