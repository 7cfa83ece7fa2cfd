"""The airbench-class scratch space and training: the network it builds, whitening from training images only, the
per-step warm-up + linear-decay schedule, weight averaging (and its resume), alternating flips, reflect-padded
translation and test-time augmentation."""

from __future__ import annotations

import itertools
from dataclasses import replace

import optuna
import pytest
import torch
import torch.nn.functional as F

from hpsearch import augment as aug
from hpsearch import train
from hpsearch.accuracy import tta_logits
from hpsearch.data import Data, DataInfo, Split, load
from hpsearch.explain import summarize
from hpsearch.saved_model import replay
from hpsearch.schedules import WeightAverage, linear_schedule
from hpsearch.space import resolve_space
from hpsearch.strategies.scratch import PARAMS, Residual, build, feature_size, init_whitening, suggest
from hpsearch.train import fit
from tests.conftest import study_text

CPU = torch.device("cpu")
CIFAR = DataInfo(name="cifar10", channels=3, height=32, width=32, num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3,
                 flip=True, classes=tuple("abcdefghij"))
OPEN = {  # a [space] that admits airbench94's point
    "scheduler": ["linear", "cosine"], "channels": {"low": 8, "high": 512, "log": True},
    "batch_size": [32, 64, 1024], "augmentation": ["translate", "base", "none"], "optimizer": ["sgd", "adam"],
    "label_smoothing": [0.0, 0.2], "block_convs": [1, 2, 3], "block_layout": ["classic", "airbench"],
    "activation": ["relu", "gelu"], "whiten": [True, False], "dirac_init": [True, False], "residual": [True, False],
    "global_pool": ["none", "max", "avg"], "bn_momentum": [0.1, 0.4], "bn_scale": [True, False],
    "norm_lr_scale": [1.0, 64.0], "logit_scale": [1.0, 0.125], "averaging": ["none", "ema", "lookahead"],
    "flip_mode": ["random", "alternating"],
}
AIRBENCH = {
    "conv_layers": 3, "channels_0": 64, "channels_1": 256, "channels_2": 256, "kernel_size": 3, "padding": "same",
    "stride": 1, "pool": "max", "pool_kernel": 2, "batch_norm": True, "fc_layers": 1, "block_convs": 2,
    "block_layout": "airbench", "activation": "gelu", "whiten": True, "dirac_init": True, "global_pool": "max",
    "residual": False,
    "bn_momentum": 0.4, "bn_scale": False, "norm_lr_scale": 64.0, "logit_scale": 0.125, "optimizer": "sgd",
    "lr": 1.5, "momentum": 0.85, "nesterov": True, "weight_decay": 0.0013, "scheduler": "linear",
    "batch_size": 1024, "label_smoothing": 0.2, "augmentation": "translate", "averaging": "lookahead",
    "flip_mode": "alternating",
}


def _config(params: dict, info: DataInfo = CIFAR, epochs: int = 10):
    space = resolve_space(PARAMS, OPEN, where="test")
    return suggest(replay(params, space), space, epochs, info)


def test_airbench94s_network_is_a_point_of_the_space() -> None:
    built = build(_config(AIRBENCH), CIFAR)
    kinds = [type(m).__name__ for m in built.model]
    block = ["Conv2d", "MaxPool2d", "BatchNorm2d", "GELU", "Conv2d", "BatchNorm2d", "GELU"]
    assert kinds == ["Conv2d", "GELU", *block * 3, "AdaptiveMaxPool2d", "Flatten", "Linear", "Scale"]
    whiten = built.model[0]
    assert whiten.out_channels == 24 and whiten.kernel_size == (2, 2) and not whiten.weight.requires_grad
    # airbench94's own figure: about 118 M MACs per 32x32 image (plus the 10 outputs of the linear layer)
    assert summarize(built.model, channels=3, size=(32, 32)).macs == 118_147_360
    # BatchNorm parameters in their own group at 64x the lr, their weight decay divided by 64
    plain, norms = built.param_groups
    assert norms["lr"] == pytest.approx(1.5 * 64) and norms["weight_decay"] == pytest.approx(0.0013 / 64)
    assert all(not m.weight.requires_grad for m in built.model if isinstance(m, torch.nn.BatchNorm2d))


def test_the_new_keys_leave_the_plain_cnn_as_it_was() -> None:
    """Defaults are today's model, layer for layer: models saved before load into it (same state_dict keys)."""
    params = {"conv_layers": 2, "channels_0": 6, "channels_1": 16, "kernel_size": 5, "padding": 0, "stride": 1,
              "pool": "max", "pool_kernel": 2, "batch_norm": True, "fc_layers": 2, "fc_width_0": 32, "dropout": 0.1,
              "optimizer": "adam", "lr": 0.001, "weight_decay": 1e-4, "scheduler": "none", "batch_size": 64,
              "label_smoothing": 0.0, "augmentation": "base"}
    space = resolve_space(PARAMS, {}, where="test")
    model = build(suggest(replay(params, space), space, 3, CIFAR), CIFAR).model
    assert [type(m).__name__ for m in model] == [
        "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Flatten",
        "Dropout", "Linear", "ReLU", "Linear"]
    assert list(model.state_dict())[:3] == ["0.weight", "1.weight", "1.bias"]


@pytest.mark.parametrize(("layout", "convs", "pool", "stride", "whiten", "residual"),
                         list(itertools.product(["classic", "airbench"], [1, 2, 3], ["max", "none"], [1, 2],
                                                [True, False], [True, False])))
def test_feature_size_is_what_the_network_outputs(layout, convs, pool, stride, whiten, residual) -> None:
    params = {**AIRBENCH, "block_layout": layout, "block_convs": convs, "pool": pool, "whiten": whiten,
              "residual": residual, "global_pool": "none", "channels_0": 8, "channels_1": 8, "channels_2": 8,
              "stride": stride}
    try:
        config = _config(params)
    except Exception as e:  # shrinks below 1x1: rejected, and then the network is never built
        assert type(e).__name__ == "Rejected"
        return
    model = build(config, CIFAR).model
    flatten = next(i for i, m in enumerate(model) if isinstance(m, torch.nn.Flatten))
    out = model[:flatten](torch.zeros(1, 3, 32, 32))
    assert tuple(out.shape[-2:]) == feature_size(config, CIFAR)
    assert any(isinstance(m, Residual) for m in model) == (residual and convs > 1)


def test_residual_blocks_add_the_first_convs_output() -> None:
    config = _config({**AIRBENCH, "residual": True, "dirac_init": False})
    model = build(config, CIFAR).model
    [first, *_] = [m for m in model if isinstance(m, Residual)]
    x = torch.randn(2, 64, 8, 8)
    first.eval()
    assert torch.allclose(first(x), x + first.body(x))


def test_dirac_init_starts_convs_as_the_identity() -> None:
    config = _config({**AIRBENCH, "whiten": False, "channels_0": 64})
    conv = next(m for m in build(config, CIFAR).model if isinstance(m, torch.nn.Conv2d) and m.in_channels == 64)
    x = torch.randn(1, 64, 6, 6)
    assert torch.allclose(F.conv2d(x, conv.weight, padding=1)[:, :64], x, atol=1e-6)


def _data(train_x: torch.Tensor, val_x: torch.Tensor) -> Data:
    y = torch.zeros(len(train_x), dtype=torch.int64)
    return Data(train=Split(train_x, y), val=Split(val_x, torch.zeros(len(val_x), dtype=torch.int64)), info=CIFAR)


def test_whitening_comes_from_the_training_images_alone() -> None:
    """The whitening conv is set from the (normalised, unaugmented) training images, never the validation images:
    changing val leaves it as it was, changing train does not; on the training patches it decorrelates."""
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 256, (64, 3, 1, 1), generator=g, dtype=torch.uint8)
    train_x = (base.expand(64, 3, 12, 12) // 2 + torch.randint(0, 128, (64, 3, 12, 12), generator=g,
                                                                 dtype=torch.uint8)).contiguous()
    val_a = torch.randint(0, 256, (16, 3, 12, 12), generator=g, dtype=torch.uint8)
    val_b = torch.zeros(16, 3, 12, 12, dtype=torch.uint8)
    config = replace(_config({**AIRBENCH, "channels_0": 8, "channels_1": 8, "channels_2": 8}),
                     train=replace(_config(AIRBENCH).train, epochs=1, batch_size=32))
    weights = []
    for train_images, val in ((train_x, val_a), (train_x, val_b), (train_x.flip(0).roll(1, dims=-1), val_a)):
        torch.manual_seed(0)
        built = build(config, CIFAR)
        seen: list[torch.Tensor] = []
        init = built.init_from_data
        assert init is not None

        def recording(images: torch.Tensor, init=init, seen=seen) -> None:
            seen.append(images)
            init(images)

        built.init_from_data = recording
        fit(built, _data(train_images, val), config.train, device=CPU, seed=0)
        assert len(seen) == 1 and seen[0].shape[0] == len(train_images)  # every training image, no val image
        weights.append(built.model[0].weight.detach().clone())
    assert torch.equal(weights[0], weights[1])  # val images changed: the whitening did not
    assert not torch.allclose(weights[0], weights[2])  # training images changed: it did


def test_whitened_training_patches_have_unit_covariance() -> None:
    images = torch.randn(200, 3, 8, 8) @ torch.randn(8, 8) + 0.5  # correlated pixels
    conv = torch.nn.Conv2d(3, 24, 2)
    init_whitening(conv, images, eps=0.0)
    out = F.conv2d(images, conv.weight[:12]).permute(0, 2, 3, 1).reshape(-1, 12).double()
    cov = out.T @ out / len(out)
    assert torch.allclose(cov, torch.eye(12, dtype=torch.float64), atol=1e-3)


def test_the_linear_schedule_warms_up_then_decays_over_the_whole_training() -> None:
    for steps in (10, 1000):  # a shorter training runs the whole shape: a complete schedule
        f = linear_schedule(steps, 0.2, 0.07)
        top = round(0.2 * steps)
        assert f(0) == pytest.approx(0.2) and f(top) == pytest.approx(1.0) and f(steps) == pytest.approx(0.07)
        assert f(top // 2) == pytest.approx(0.6, abs=0.1)


def _tiny(tmp_path, **overrides):
    data = load("synthetic:classes=3,size=12,train=192,test=32", data_dir=tmp_path, cache_dir=tmp_path, device=CPU,
                val_fraction=0.25)
    params = {**AIRBENCH, "channels_0": 8, "channels_1": 8, "channels_2": 8, "batch_size": 32, "lr": 0.2,
              "whiten": False, **overrides}
    config = _config(params, data.info, epochs=3)
    torch.manual_seed(0)
    return build(config, data.info), data, config


def test_fit_steps_the_linear_schedule_per_batch(tmp_path, monkeypatch) -> None:
    built, data, config = _tiny(tmp_path, averaging="none")
    made = []
    real = train.make_scheduler
    monkeypatch.setattr(train, "make_scheduler", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    fit(built, data, config.train, device=CPU, seed=0)
    [scheduler] = made
    steps = len(data.train) // 32
    assert scheduler.last_epoch == 3 * steps  # stepped after every batch of the 3 epochs
    assert scheduler.optimizer.param_groups[0]["lr"] == pytest.approx(0.2 * 0.07)  # and ended at final_lr


@pytest.mark.parametrize("kind", ["ema", "lookahead"])
def test_weight_averaging_leaves_the_average_in_the_model_and_resumes_exactly(tmp_path, kind) -> None:
    built, data, config = _tiny(tmp_path, averaging=kind)
    states: list[dict] = []
    full = fit(built, data, config.train, device=CPU, seed=0,
               on_checkpoint=lambda s: states.append(torch.utils._pytree.tree_map(
                   lambda t: t.clone() if isinstance(t, torch.Tensor) else t, s)))
    final = {k: v.clone() for k, v in built.model.state_dict().items()}
    # resumed after epoch 1 in a fresh model: the same weights and curves at the end
    resumed_built, _, _ = _tiny(tmp_path, averaging=kind)
    again = fit(resumed_built, data, config.train, device=CPU, seed=0, resume=states[0])
    assert again.val_accuracy == full.val_accuracy
    assert all(torch.allclose(v, final[k]) for k, v in resumed_built.model.state_dict().items())
    if kind == "ema":
        average = states[-1]["average"]["average"]
        live = [t for t in final.values() if t.is_floating_point()]
        assert all(torch.equal(a, t) for a, t in zip(average, live, strict=True))  # the model ends as the average


def test_lookahead_follows_airbench94() -> None:
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    average = WeightAverage("lookahead", model, total_steps=100, decay=0.0)
    average.update(25)  # before 30% of the steps: nothing
    assert average.average is None
    average.update(30)  # starts: the average is the weights
    with torch.no_grad():
        model.weight.fill_(1.0)
    average.update(35)
    rho = 0.95**5 * 0.35**3
    assert model.weight.item() == pytest.approx(1 - rho)  # moved towards the weights, copied back into them


def test_translate_shifts_with_reflection_and_flips_by_mask() -> None:
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.uint8).view(2, 1, 6, 6)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    mask = torch.tensor([True, False])
    out = aug.random_translate(x, 2, flip=True, generator=g1, flip_mask=mask)
    dy = torch.randint(-2, 3, (2, 1), generator=g2)
    dx = torch.randint(-2, 3, (2, 1), generator=g2)
    padded = F.pad(x.float(), (2, 2, 2, 2), mode="reflect")
    for i in range(2):
        source = x[i : i + 1].flip(-1).float() if mask[i] else x[i : i + 1].float()
        padded_i = F.pad(source, (2, 2, 2, 2), mode="reflect")
        want = padded_i[0, :, 2 + int(dy[i]) : 8 + int(dy[i]), 2 + int(dx[i]) : 8 + int(dx[i])]
        assert torch.equal(out[i].float(), want), i
    assert padded.shape == (2, 1, 10, 10)


def test_alternating_flips_mirror_every_image_every_other_epoch(tmp_path, monkeypatch) -> None:
    """Each image starts in a random orientation and is mirrored every other epoch (airbench94's alternating flip):
    the masks fit hands the augmentation for one image in epochs 1 and 2 are opposite."""
    n = 64
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 6, 6).contiguous()  # image i is all i
    data = Data(train=Split(x, torch.zeros(n, dtype=torch.int64)), val=Split(x[:8], torch.zeros(8, dtype=torch.int64)),
                info=replace(CIFAR, height=6, width=6))
    config = _config({**AIRBENCH, "channels_0": 4, "channels_1": 4, "channels_2": 4, "pool": "none",
                      "whiten": False, "averaging": "none"}, data.info, 2)
    built = build(config, data.info)
    seen: list[dict[int, bool]] = []
    real = train.augment

    def recording(images, level, *, flip, generator=None, translate=2, flip_mask=None):
        if level != "none":
            assert flip_mask is not None
            seen.append({int(img[0, 0, 0]): bool(m) for img, m in zip(images, flip_mask, strict=True)})
        return real(images, level, flip=flip, generator=generator, translate=translate, flip_mask=flip_mask)

    monkeypatch.setattr(train, "augment", recording)
    fit(built, data, replace(config.train, epochs=2, batch_size=n), device=CPU, seed=0)
    first, second = seen
    assert first.keys() == second.keys() == set(range(n))
    assert all(first[i] != second[i] for i in range(n))
    assert 0 < sum(first.values()) < n  # the first orientation is random per image


def test_tta_averages_the_views_and_keeps_digits_unmirrored() -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    x = torch.randn(3, 1, 4, 4)
    assert torch.allclose(tta_logits(model, x, "flip", flip=True), 0.5 * (model(x) + model(x.flip(-1))))
    assert torch.allclose(tta_logits(model, x, "flip", flip=False), model(x))
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    views = [x, padded[:, :, 0:4, 0:4], padded[:, :, 2:6, 2:6]]
    want = 0.5 * model(views[0]) + 0.25 * (model(views[1]) + model(views[2]))
    assert torch.allclose(tta_logits(model, x, "flip-translate", flip=False), want, atol=1e-6)


def test_tta_is_a_study_setting_not_a_sampled_parameter(run_cli, write_study, monkeypatch) -> None:
    """The same test-time augmentation for every trial (never chosen per trial, never on the test set): a study
    key, refused in [space]; a complete trial's value is its final model's validation accuracy with it."""
    bad = write_study(text=study_text() + 'tta = "flip"\n')  # under [space]
    result = run_cli("run", str(bad))
    assert result.code == 2 and "space.tta: unknown key" in result.err, result
    calls: list[tuple[str, float]] = []
    real = train.accuracy_on

    def recording(*args, tta="none", **kwargs):
        value = real(*args, tta=tta, **kwargs)
        calls.append((tta, value))
        return value

    monkeypatch.setattr(train, "accuracy_on", recording)
    good = write_study(text=study_text(n_trials=2, epochs=2, extra='tta = "flip"\npruner = "none"'))
    assert run_cli("run", str(good)).code == 0
    study = optuna.load_study(study_name="tiny", storage="sqlite:///hpsearch.db")
    with_tta = [value for tta, value in calls if tta != "none"]
    assert [tta for tta, _ in calls if tta != "none"] == ["flip", "flip"]  # once per trial, after its last epoch
    assert [t.value for t in study.trials] == with_tta


def test_ema_warms_up_so_a_short_training_is_not_averaged_into_its_initial_weights() -> None:
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    average = WeightAverage("ema", model, total_steps=100, decay=0.999)
    with torch.no_grad():
        model.weight.fill_(1.0)
    average.update(1)  # decay min(0.999, 2/11): the average moves most of the way at once
    assert average.average is not None and average.average[0].item() == pytest.approx(1 - 2 / 11)
    for step in range(2, 5000):
        average.update(step)
    assert average.average[0].item() == pytest.approx(1.0, abs=1e-3)


def test_a_copy_of_a_per_layer_key_takes_its_own_distribution_from_the_space() -> None:
    fixed = {k: AIRBENCH[k] for k in ("kernel_size", "padding", "stride", "pool", "pool_kernel", "batch_norm")}
    space = resolve_space(PARAMS, {**fixed, "conv_layers": 3, "channels": [4, 8], "channels_1": 32,
                                   "channels_2": {"low": 64, "high": 128}}, where="test")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = [suggest(study.ask(), space, 2, CIFAR).channels for _ in range(20)]
    assert {c[0] for c in seen} == {4, 8}  # the base name's choices
    assert {c[1] for c in seen} == {32}  # its own fixed value
    assert all(64 <= c[2] <= 128 for c in seen) and len({c[2] for c in seen}) > 5  # its own range


def test_width_scale_multiplies_every_blocks_channels_and_keeps_the_rest() -> None:
    space = resolve_space(PARAMS, {**OPEN, "width_scale": {"low": 0.5, "high": 2.0}}, where="test")
    base = suggest(replay({**AIRBENCH, "width_scale": 1.0}, space), space, 10, CIFAR)
    wide = suggest(replay({**AIRBENCH, "width_scale": 1.5}, space), space, 10, CIFAR)
    assert (base.channels, wide.channels) == ((64, 256, 256), (96, 384, 384))
    assert replace(wide, channels=base.channels) == base  # nothing else changes
    convs = [m.out_channels for m in build(wide, CIFAR).model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs == [24, 96, 96, 384, 384, 384, 384]  # whitening (2x2 patches x 3 channels x 2 signs), then blocks
    assert suggest(replay({**AIRBENCH, "width_scale": 0.01}, space), space, 10, CIFAR).channels == (1, 3, 3)
    # A trial stored before the key existed (no width_scale parameter) rebuilds at scale 1 (the key's default).
    assert suggest(replay(AIRBENCH, resolve_space(PARAMS, OPEN, where="test")), space, 10, CIFAR).channels == (
        64, 256, 256)
