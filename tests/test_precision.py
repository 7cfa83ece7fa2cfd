"""Precision chosen by measurement: which precisions a trial may train in (--precision), the choice from timed steps,
the one-line refusals, and that bf16 training matches fp32 while weights, checkpoints and saved models stay fp32."""

from __future__ import annotations

import optuna
import pytest
import torch

from hpsearch import devices, objective, train
from hpsearch._errors import SpecError
from hpsearch.data import load
from hpsearch.devices import check_precision, choose_precision, precision_candidates
from hpsearch.saved_model import load_model, replay
from hpsearch.space import resolve_space
from hpsearch.strategies.scratch import PARAMS, build, suggest
from hpsearch.train import Probe, fit, probe_precisions
from hpsearch.train_types import TrainConfig
from tests.conftest import ONE_CONFIG_SPACE, study_text

CPU = torch.device("cpu")
BF16 = torch.bfloat16
# bf16 computes the same where oneDNN emulates it (any AVX-512 CPU), only slower: the accuracy and fp32-weights tests
# run there too, standing in for the native check where the CLI would refuse --precision bf16.
needs_bf16 = pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                                reason="oneDNN runs no bf16 on this CPU (needs AVX-512 or newer)")


def test_candidates_follow_the_option_and_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "cpu_bf16_native", lambda: True)
    assert precision_candidates("auto", CPU) == (None, BF16)  # measured per trial
    assert precision_candidates("fp32", CPU) == (None,)
    assert precision_candidates("bf16", CPU) == (BF16,)
    monkeypatch.setattr(devices, "cpu_bf16_native", lambda: False)
    assert precision_candidates("auto", CPU) == (None,)  # no probe where bf16 would be emulated: nothing slower
    assert precision_candidates("auto", torch.device("mps")) == (None,)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert precision_candidates("auto", torch.device("cuda")) == (torch.float16,)  # CUDA keeps its AMP path


@pytest.mark.parametrize(("line", "native"), [
    ("flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni", False),  # Ice Lake: AVX-512, bf16 only emulated
    ("flags\t\t: fpu avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile", True),  # Sapphire Rapids
    ("flags\t\t: fpu avx2 avx512f avx512_bf16", True),  # AMD Zen 4
    ("Features\t: fp asimd sve bf16 i8mm", True),  # ARM (Graviton 3)
])
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, line, native) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\n{line}\n\nprocessor\t: 1\n{line}\n")
    assert devices.cpu_bf16_native(cpuinfo) is native


def test_the_faster_precision_wins_only_by_a_margin() -> None:
    assert choose_precision({None: 1.0, BF16: 0.5}) == BF16
    assert choose_precision({None: 1.0, BF16: 0.95}) is None  # inside the probe's noise: fp32
    assert choose_precision({None: 0.3, BF16: 0.9}) is None  # small convolutions can lose in bf16
    assert choose_precision({BF16: 2.0}) == BF16  # one candidate: no choice


@pytest.mark.parametrize(("speedups", "batch", "looks", "chosen"), [
    ({64: 1.12, 256: 1.45}, 1024, [64, 256], BF16),  # too close at 64 images: the training's batch (capped) decides
    ({64: 1.05, 128: 0.96}, 128, [64, 128], None),  # ... either way
    ({64: 2.2}, 1024, [64], BF16),  # clear at 64: one small probe, as before
    ({64: 0.6}, 512, [64], None),
    ({64: 1.12}, 64, [64], BF16),  # a batch of 64 has nothing bigger to look at
])
def test_a_close_call_is_probed_again_at_the_trainings_own_batch(monkeypatch, speedups, batch, looks, chosen):
    """A mid-size network's bf16 gain can sit at the threshold with 64 images per step and well above it at its own
    batch (the 3-block 32-64-128 CNN on an AMD EPYC Zen 5: 1.05-1.15x at 64, 1.29-1.51x trained at 128)."""
    seen: list[int] = []

    def timed_steps(built, data, config, device, dtypes, *, batch, **_):
        seen.append(batch)
        cost = {None: 1.0, BF16: 1.0 / speedups[batch]}
        return Probe(cost=cost, wall=cost, steps_per_epoch=1, timed_steps=3)

    monkeypatch.setattr(train, "probe_steps", timed_steps)
    config = TrainConfig(epochs=1, batch_size=batch, optimizer="sgd", lr=0.1, weight_decay=0.0)
    probe = probe_precisions(None, None, config, CPU, (None, BF16))  # type: ignore[arg-type]
    assert seen == looks
    assert choose_precision(probe.cost) == chosen


def test_only_a_speedup_near_the_threshold_is_too_close_to_call() -> None:
    assert devices.too_close_to_call({None: 1.0, BF16: 1 / 1.1})
    assert devices.too_close_to_call({None: 1.0, BF16: 1 / 0.95})
    assert not devices.too_close_to_call({None: 1.0, BF16: 0.5})  # 2x: bf16, clearly
    assert not devices.too_close_to_call({None: 1.0, BF16: 1 / 0.7})  # 0.7x: fp32, clearly
    assert devices.too_close_to_call({None: 1.0, BF16: 1 / 1.3})  # bf16 1.3x faster: near enough to look again
    assert not devices.too_close_to_call({None: 1.0, BF16: 1 / 0.8})  # bf16 slower (0.8x): fp32
    assert not devices.too_close_to_call({BF16: 1.0})  # one candidate: nothing to call


def test_precisions_a_device_cannot_run_are_refused_with_what_is_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SpecError, match=r"^--precision: 'half' is not a precision; allowed: auto, fp32, bf16, fp16$"):
        check_precision("half", CPU)
    with pytest.raises(SpecError, match=r"^--precision: 'fp16' trains on CUDA only \(with a gradient scaler\); "
                                        r"allowed on cpu: auto, fp32, bf16$"):
        check_precision("fp16", CPU)
    monkeypatch.setattr(devices, "cpu_bf16_native", lambda: False)
    with pytest.raises(SpecError, match=r"^--precision: 'bf16' was asked for, but this CPU has no bf16 instructions "
                                        r"\(AVX512-BF16 or AMX\) and would emulate it, slower than fp32; allowed "
                                        r"here: auto, fp32$"):
        check_precision("bf16", CPU)
    check_precision("fp32", CPU)
    check_precision("auto", CPU)


def test_a_bad_precision_fails_the_command_before_any_work(run_cli, write_study, tmp_path) -> None:
    result = run_cli("run", str(write_study()), "--precision", "fp16")
    assert result.code == 2
    assert result.err == ("error: --precision: 'fp16' trains on CUDA only (with a gradient scaler); allowed on cpu: "
                          "auto, fp32, bf16\n")
    assert not (tmp_path / "hpsearch.db").exists()


@pytest.mark.parametrize(("costs", "chosen"), [((1.0, 0.4), "bf16"), ((1.0, 0.97), "fp32")])
def test_each_trial_trains_in_the_precision_its_timed_steps_chose(run_cli, write_study, monkeypatch, costs, chosen):
    """The objective probes both precisions (here a stand-in with known step costs) and trains in the winner; the
    precision and the step costs are stored on the trial."""
    monkeypatch.setattr(devices, "cpu_bf16_native", lambda: True)
    used: list[object] = []

    def probe(built, data, config, device, dtypes, **_):
        assert dtypes == (None, BF16)
        return Probe(cost=dict(zip(dtypes, costs, strict=True)), wall=dict(zip(dtypes, costs, strict=True)),
                     steps_per_epoch=1, timed_steps=3)

    def recording_fit(*args, amp, **kwargs):
        used.append(amp)
        return fit(*args, amp=amp, **kwargs)

    monkeypatch.setattr(objective, "probe_precisions", probe)
    monkeypatch.setattr(objective, "fit", recording_fit)
    result = run_cli("run", str(write_study(text=study_text(n_trials=1, epochs=1, space=ONE_CONFIG_SPACE))),
                     "--precision", "auto")
    assert result.code == 0, result
    [trial] = optuna.load_study(study_name="tiny", storage="sqlite:///hpsearch.db").trials
    assert trial.user_attrs["precision"] == chosen
    assert trial.user_attrs["step_seconds"] == {"fp32": costs[0], "bf16": costs[1]}
    assert used == [BF16 if chosen == "bf16" else None]


def test_an_explicit_precision_trains_in_it_without_probing(run_cli, write_study, monkeypatch) -> None:
    monkeypatch.setattr(objective, "probe_steps", lambda *a, **k: pytest.fail("probed with a fixed precision"))
    monkeypatch.setattr(objective, "probe_precisions", lambda *a, **k: pytest.fail("probed with a fixed precision"))
    result = run_cli("run", str(write_study(text=study_text(n_trials=1, epochs=1, space=ONE_CONFIG_SPACE))),
                     "--precision", "fp32")
    assert result.code == 0, result
    [trial] = optuna.load_study(study_name="tiny", storage="sqlite:///hpsearch.db").trials
    assert trial.user_attrs["precision"] == "fp32" and "step_seconds" not in trial.user_attrs


def _trained(tmp_path, amp: torch.dtype | None):
    """A small BatchNorm CNN trained 3 epochs on an easy synthetic problem with a fixed seed, in ``amp``."""
    data = load("synthetic:classes=4,size=16,train=1024,test=64", data_dir=tmp_path, cache_dir=tmp_path,
                device=CPU, val_fraction=0.25)
    space = resolve_space(PARAMS, {}, where="test")
    params = {"conv_layers": 2, "channels_0": 16, "channels_1": 32, "kernel_size": 3, "padding": "same",
              "stride": 1, "pool": "max", "pool_kernel": 2, "batch_norm": True, "fc_layers": 1,
              "optimizer": "adam", "lr": 0.003, "weight_decay": 1e-5, "scheduler": "cosine", "batch_size": 64,
              "label_smoothing": 0.0, "augmentation": "none"}
    config = suggest(replay(params, space), space, 3, data.info)
    torch.manual_seed(0)
    built = build(config, data.info)
    result = fit(built, data, config.train, device=CPU, seed=0, amp=amp)
    return built, result


@needs_bf16
def test_bf16_training_reaches_fp32_accuracy_and_keeps_fp32_weights(tmp_path) -> None:
    fp32_built, fp32 = _trained(tmp_path, None)
    bf16_built, bf16 = _trained(tmp_path, BF16)
    assert fp32.best_val_accuracy > 0.9  # the problem is learnable in 3 epochs: a real comparison
    assert abs(bf16.best_val_accuracy - fp32.best_val_accuracy) <= 0.03
    # autocast computes in bf16 but the parameters, buffers and so the checkpoints and saved models stay fp32
    assert {t.dtype for t in bf16_built.model.state_dict().values() if t.is_floating_point()} == {torch.float32}


@needs_bf16
def test_a_model_trained_in_bf16_saves_and_loads_in_fp32(run_cli, write_study, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(devices, "cpu_bf16_native", lambda: True)
    # 4,000 test images of a barely trained model: many close calls, so bf16 inference would move some of them.
    dataset = 'dataset = "synthetic:classes=3,size=12,train=192,test=4000"'
    path = write_study(text=study_text(n_trials=1, epochs=1, space=ONE_CONFIG_SPACE, dataset=dataset))
    assert run_cli("run", str(path), "--precision", "bf16").code == 0
    result = run_cli("evaluate", "tiny", "--seeds", "1", "--save", str(tmp_path / "models"), "--precision", "bf16")
    assert result.code == 0, result
    study = optuna.load_study(study_name="tiny", storage="sqlite:///hpsearch.db")
    assert study.user_attrs["evaluate:0"]["runs"][0]["precision"] == "bf16"
    [weights] = (tmp_path / "models").glob("*.pt")
    assert {t.dtype for t in torch.load(weights, weights_only=True).values() if t.is_floating_point()} == {
        torch.float32}
    model = load_model(weights)
    logits = model(torch.randint(0, 256, (2, 1, 12, 12), dtype=torch.uint8))  # synthetic: grey 12x12
    assert logits.dtype == torch.float32 and logits.shape == (2, 3)
    # The stored test accuracy is the saved model's own (measured in fp32, as it is loaded and exported).
    from hpsearch.data import read_raw

    test_x, test_y = read_raw("synthetic:classes=3,size=12,train=192,test=4000", tmp_path, tmp_path).sealed_test
    with torch.no_grad():
        accuracy = (model(test_x).argmax(1) == test_y).sum().item() / len(test_y)
    assert study.user_attrs["evaluate:0"]["runs"][0]["test_accuracy"] == pytest.approx(accuracy, abs=1e-9)


@pytest.mark.parametrize(("step_seconds", "timed"), [
    (0.5, 3),  # slow steps: three are enough (0.2 s of them and more)
    (0.01, 20),  # fast steps: timed until 0.2 s of each precision (20 steps), not decided by three
    (0.001, train.PROBE_MAX_STEPS),  # very fast: capped
])
def test_a_probe_times_short_steps_until_it_has_enough_of_them(tmp_path, monkeypatch, step_seconds, timed) -> None:
    """Each step reads the wall clock at its start and end: a clock that advances ``step_seconds`` per read."""
    data = load("synthetic:classes=4,size=16,train=256,test=64", data_dir=tmp_path, cache_dir=tmp_path,
                device=CPU, val_fraction=0.25)
    space = resolve_space(PARAMS, {}, where="test")
    params = {"conv_layers": 1, "channels_0": 8, "kernel_size": 3, "padding": "same", "stride": 1, "pool": "max",
              "pool_kernel": 2, "batch_norm": False, "fc_layers": 1, "optimizer": "adam", "lr": 0.003,
              "weight_decay": 1e-5, "scheduler": "cosine", "batch_size": 64, "label_smoothing": 0.0,
              "augmentation": "none"}
    config = suggest(replay(params, space), space, 1, data.info)
    ticks = iter(range(10**6))
    monkeypatch.setattr(train.time, "perf_counter", lambda: next(ticks) * step_seconds)
    probe = train.probe_steps(build(config, data.info), data, config.train, CPU, (None,))
    assert probe.timed_steps == timed
    assert probe.wall[None] == pytest.approx(step_seconds)
