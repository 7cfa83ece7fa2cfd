"""The report as studies (studies/report/): every file loads, rows build the report's exact networks, the
"enqueued" sampler replays rows and refuses to sample, the space's additions are validated, and `reproduce`
prints the side-by-side table."""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import pytest
import torch
import torch.nn as nn

from hpsearch import SpecError, load_spec
from hpsearch.data import DataInfo
from hpsearch.samplers import EnqueuedOnly
from hpsearch.schedules import make_scheduler
from hpsearch.spec import split_row
from hpsearch.strategies import STRATEGIES
from hpsearch.train_types import TrainConfig

REPORT = Path(__file__).resolve().parent.parent / "studies" / "report"
FILES = sorted(REPORT.glob("*.toml"))
MNIST = DataInfo("mnist", 1, 28, 28, 10, (0.13,), (0.31,), False, tuple("0123456789"))
CIFAR = DataInfo("cifar10", 3, 32, 32, 10, (0.5,) * 3, (0.25,) * 3, True, tuple(f"c{i}" for i in range(10)))


def test_every_report_table_is_a_file():
    assert [f.name for f in FILES] == [
        "cifar10-table1-10ep.toml", "cifar10-table1-50ep.toml", "cifar10-table2-10ep.toml", "cifar10-table2-50ep.toml",
        "cifar10-table3.toml", "cifar10-table4.toml", "cifar10-table5-scratch.toml", "cifar10-table5-zoo.toml",
        "cifar10-table6.toml", "cifar10-table7.toml", "mnist.toml"]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_report_file_loads_and_only_replays_its_rows(path: Path):
    spec = load_spec(path)
    assert spec.sampler == {"type": "enqueued"} and spec.pruner == {"type": "none"}
    assert spec.n_trials == len(spec.enqueue) > 0
    labels = [row["label"] for row in spec.enqueue]
    assert len(set(labels)) == len(labels)
    assert all(0 <= row["paper_accuracy"] <= 1 for row in spec.enqueue)
    params = [split_row(row)[0] for row in spec.enqueue]
    assert len({tuple(sorted(p.items())) for p in params}) == len(params)  # no row would be skipped as a duplicate


def _row_config(path: Path, label: str, info: DataInfo):
    """The config a row's trial gets: the real path (enqueued trial, sampler that samples nothing)."""
    spec = load_spec(path)
    row = next(r for r in spec.enqueue if r["label"] == label)
    study = optuna.create_study(sampler=EnqueuedOnly())
    params, meta = split_row(row)
    study.enqueue_trial(params, user_attrs=meta)
    trial = study.ask()
    assert trial.user_attrs == meta
    strategy = STRATEGIES[spec.strategy]
    config = strategy.suggest(trial, spec.space, spec.epochs, info)
    return config, strategy.build(config, info).model


def _shapes(model: nn.Module) -> list[tuple]:
    out = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            out.append(("conv", m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0]))
        elif isinstance(m, nn.MaxPool2d):
            out.append(("pool", m.kernel_size))
        elif isinstance(m, nn.Linear):
            out.append(("fc", m.in_features, m.out_features))
    return out


def test_mnist_net_is_the_reports():
    config, model = _row_config(REPORT / "mnist.toml", "SGD lr 0.01 momentum 0.9", MNIST)
    assert _shapes(model) == [("conv", 1, 32, 3, 1, 0), ("conv", 32, 64, 3, 1, 0), ("pool", 2), ("fc", 9216, 128),
                              ("fc", 128, 10)]
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    t = config.train
    assert (t.epochs, t.optimizer, t.lr, t.momentum, t.weight_decay, t.batch_size) == (5, "sgd", 0.01, 0.9, 0.0, 64)


def test_mnist_fc_only_rows():
    _, model = _row_config(REPORT / "mnist.toml", "FC-only 32-64-128", MNIST)
    assert _shapes(model) == [("fc", 784, 32), ("fc", 32, 64), ("fc", 64, 128), ("fc", 128, 10)]
    _, model = _row_config(REPORT / "mnist.toml", "FC-only 32 x 9", MNIST)
    assert _shapes(model) == [("fc", 784, 32)] + [("fc", 32, 32)] * 8 + [("fc", 32, 10)]


def test_mnist_stride_3_and_padding_rows():
    _, model = _row_config(REPORT / "mnist.toml", "stride 3", MNIST)
    assert _shapes(model) == [("conv", 1, 32, 3, 3, 0), ("conv", 32, 64, 3, 3, 0), ("pool", 2), ("fc", 64, 128),
                              ("fc", 128, 10)]
    _, model = _row_config(REPORT / "mnist.toml", "kernel 5 padding 2", MNIST)
    assert _shapes(model)[:3] == [("conv", 1, 32, 5, 1, 2), ("conv", 32, 64, 5, 1, 2), ("pool", 2)]
    assert _shapes(model)[3] == ("fc", 64 * 14 * 14, 128)


def test_cifar_base_cnn_is_the_reports():
    config, model = _row_config(REPORT / "cifar10-table3.toml", "base (kernel 5)", CIFAR)
    assert _shapes(model) == [("conv", 3, 6, 5, 1, 0), ("pool", 2), ("conv", 6, 16, 5, 1, 0), ("pool", 2),
                              ("fc", 400, 120), ("fc", 120, 84), ("fc", 84, 10)]
    t = config.train
    assert (t.epochs, t.optimizer, t.lr, t.momentum, t.scheduler, t.augmentation) == (10, "sgd", 0.001, 0.9, "none",
                                                                                       "none")


def test_table1_multistep_rows_use_the_reports_milestones():
    config, _ = _row_config(REPORT / "cifar10-table1-10ep.toml", "10 ep, MultiStepLR [1,7] lr 0.01", CIFAR)
    assert (config.train.scheduler, config.train.milestones, config.train.lr, config.train.lr_gamma) == (
        "multistep", "1,7", 0.01, 0.1)
    config, _ = _row_config(REPORT / "cifar10-table1-10ep.toml",
                            "10 ep, 'Plateau' lr 0.1 (the code ran MultiStepLR [1,5])", CIFAR)
    assert (config.train.milestones, config.train.lr) == ("1,5", 0.1)
    config, _ = _row_config(REPORT / "cifar10-table1-50ep.toml",
                            "50 ep, Plateau lr 0.1 (the code: factor 0.5, patience 1)", CIFAR)
    assert (config.train.scheduler, config.train.plateau_factor, config.train.plateau_patience) == ("plateau", 0.5, 1)


def test_explicit_milestones_reach_the_scheduler():
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = make_scheduler(TrainConfig(epochs=10, batch_size=8, optimizer="sgd", lr=0.1, weight_decay=0.0,
                                       scheduler="multistep", milestones="1,7", lr_gamma=0.1), opt)
    lrs = []
    for _ in range(9):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1] + [0.01] * 6 + [0.001] * 2)


@pytest.mark.parametrize("value, rule", [
    ('"7,1"', "must list strictly increasing epoch numbers >= 1"),
    ('"0,3"', "must list strictly increasing epoch numbers >= 1"),
    ('"1;7"', 'must be "auto" or epoch numbers separated by commas, such as "1,7"'),
    ("3", 'must be str'),
])
def test_bad_milestones_are_refused(write_study, value, rule):
    path = write_study(space=f'[space]\nscheduler = "multistep"\nmilestones = {value}\n')
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert str(e.value) == f"{path}: space.milestones: {value} {rule}"


@pytest.mark.parametrize("row, message", [
    ('label = ""', 'enqueue[0].label = "" must be a non-empty string (the row\'s name in reports)'),
    ("paper_accuracy = 1.5", "enqueue[0].paper_accuracy = 1.5 must be a number with 0 <= paper_accuracy <= 1 "
                             "(the accuracy a report gave)"),
])
def test_bad_row_metadata_is_refused(write_study, row, message):
    path = write_study(space=f"[space]\nconv_layers = [1, 2]\n\n[[enqueue]]\nconv_layers = 1\n{row}\n")
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert str(e.value) == f"{path}: {message}"


def test_enqueued_sampler_needs_enough_rows(write_study):
    path = write_study(n_trials=2, extra='sampler = "enqueued"', space="[space]\n\n[[enqueue]]\nconv_layers = 1\n")
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert str(e.value) == (f'{path}: n_trials = 2 must be given and <= the 1 [[enqueue]] rows with sampler '
                            '"enqueued" (it never samples)')


def test_enqueued_sampler_refuses_to_guess_a_missing_parameter(run_cli, write_study):
    path = write_study(n_trials=1, extra='sampler = "enqueued"',
                       space="[space]\nconv_layers = [1, 2]\n\n[[enqueue]]\nconv_layers = 1\nlabel = \"one\"\n")
    result = run_cli("run", str(path))
    assert result.code == 1
    assert result.err.strip() == ("error: sampler \"enqueued\": trial 0 needs 'channels_0', which no [[enqueue]] row "
                                  "gives it (every row is used once; a row must name each parameter it uses)")


def test_reproduce_prints_the_side_by_side_table(run_cli, tmp_path: Path):
    result = run_cli("reproduce", str(REPORT / "cifar10-table1-10ep.toml"), "--epochs-scale", "0.1", "--seeds", "2",
                     "--dataset", "synthetic:classes=10,size=32,train=80,test=20", "--out", "t1.md")
    assert result.code == 0, result
    study = optuna.load_study(storage="sqlite:///hpsearch.db",
                              study_name="report-cifar10-table1-10ep@epochs=1,dataset=synthetic:classes=10,size=32,"
                                         "train=80,test=20")
    assert [t.user_attrs["label"] for t in study.trials] == [
        "10 ep, lr 0.001", "10 ep, MultiStepLR [1,7] lr 0.01",
        "10 ep, 'Plateau' lr 0.1 (the code ran MultiStepLR [1,5])"]
    text = (tmp_path / "t1.md").read_text()
    assert "| row | report | ours (test, mean ± std) | difference | cost (s per run) |" in text
    assert "**Scaled run, not the report's budget:** 1 epochs instead of 10." in text
    assert "**Dataset replaced:**" in text
    for t, paper in zip(study.trials, (0.57, 0.59, 0.50), strict=True):
        record = study.user_attrs[f"evaluate:{t.number}"]
        assert record["mode"] == "max" and record["epochs"] == 1 and len(record["runs"]) == 2
        ours = f"{record['mean']:.4f} ± {record['std']:.4f}"
        line = f"| {t.user_attrs['label']} | {paper:.4f} | {ours} | {record['mean'] - paper:+.4f} | "
        assert line in text
        assert re.search(re.escape(f"{t.user_attrs['label']}") + r".*" + re.escape(ours), result.out)


@pytest.mark.parametrize("args, message", [
    (("--epochs-scale", "0"), "error: --epochs-scale 0: must be a number with 0 < F <= 10"),
    (("--train-fraction", "2"), "error: --train-fraction 2: must be a number with 0 < F <= 1"),
    (("--weights", "w.pth"), "error: --weights/--backbone: only for fine-tuning tables; 'report-mnist' is a scratch "
                             "study"),
])
def test_reproduce_bad_options(run_cli, args, message):
    result = run_cli("reproduce", str(REPORT / "mnist.toml"), *args)
    assert (result.code, result.err.strip()) == (2, message)


def test_reproduce_refuses_a_search_study(run_cli, write_study):
    result = run_cli("reproduce", str(write_study()))
    assert (result.code, result.err.strip()) == (
        2, "error: 'tiny': reproduce runs report tables (sampler \"enqueued\", studies/report/*.toml)")


def test_zoo_rows_get_ten_class_heads():
    _, model = _row_config(REPORT / "cifar10-table5-zoo.toml", "AlexNet", CIFAR)
    assert _shapes(model)[-1] == ("fc", 4096, 10)
    config, model = _row_config(REPORT / "cifar10-table5-zoo.toml", "VGG16", CIFAR)
    assert _shapes(model)[-1][-1] == 10 and config.input_size == 32


def test_finetune_tables_take_substitute_weights(tmp_path: Path):
    from hpsearch.reproduce import Changes, prepare

    weights = tmp_path / "resnet50.pth"
    weights.write_bytes(b"")
    spec = prepare(load_spec(REPORT / "cifar10-table7.toml"), Changes(weights=str(weights), backbone="resnet50"))
    assert spec.name == "report-cifar10-table7@weights=resnet50.pth,backbone=resnet50"
    assert (spec.space_overrides["weights"], spec.space_overrides["backbone"]) == (str(weights), "resnet50")
    assert len(spec.enqueue) == 6
