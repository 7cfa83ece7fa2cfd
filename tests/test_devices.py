"""The CUDA/MPS decisions, checked on a CPU-only machine by standing in for torch's device probes."""

from __future__ import annotations

import pytest
import torch

from hpsearch._errors import SpecError
from hpsearch.devices import autocast_dtype, configure_threads, resolve_device
from hpsearch.preprocess import channels_last
from hpsearch.train import BatchPrep
from hpsearch.train_types import Built


def test_autocast_is_off_on_cpu_and_mps() -> None:
    assert autocast_dtype(torch.device("cpu")) is None
    assert autocast_dtype(torch.device("mps")) is None


@pytest.mark.parametrize(("bf16", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_autocast_on_cuda_is_bf16_where_supported_else_fp16(monkeypatch: pytest.MonkeyPatch, bf16: bool,
                                                            expected: torch.dtype) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert autocast_dtype(torch.device("cuda")) == expected
    assert autocast_dtype(torch.device("cuda:1")) == expected


def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("cuda:1") == torch.device("cuda:1")


def test_a_device_that_is_not_there_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SpecError, match=r"^--device: 'cuda:0' was asked for, but PyTorch sees no CUDA device here$"):
        resolve_device("cuda:0")
    with pytest.raises(SpecError, match=r"^--device: 'tpu' is not a device; allowed: auto, cpu, cuda, mps, cuda:N$"):
        resolve_device("tpu")


def test_configure_threads_sets_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_batch_prep_normalises_uint8_in_one_step_into_channels_last_on_cpu() -> None:
    from hpsearch.data import Data, DataInfo, Split

    info = DataInfo(name="t", channels=3, height=8, width=8, num_classes=2, mean=(0.5, 0.25, 0.0),
                    std=(0.5, 0.25, 1.0), flip=True, classes=("a", "b"))
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    data = Data(train=Split(x, torch.zeros(4, dtype=torch.int64)), val=Split(x, torch.zeros(4, dtype=torch.int64)),
                info=info)
    built = Built(model=torch.nn.Identity(), param_groups=[])
    out = BatchPrep(data, built, torch.device("cpu"))(x)
    mean = torch.tensor(info.mean).view(1, 3, 1, 1)
    std = torch.tensor(info.std).view(1, 3, 1, 1)
    assert out.dtype == torch.float32
    assert torch.allclose(out, (x.float() / 255 - mean) / std, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)  # measured faster on CPU too (preprocess.channels_last)
    assert not channels_last(torch.device("mps"))


def test_optimizers_on_cpu_keep_torch_defaults_fused_only_on_cuda() -> None:
    from hpsearch.schedules import make_optimizer
    from hpsearch.train_types import TrainConfig

    params = [torch.nn.Parameter(torch.zeros(3))]
    for name in ("sgd", "adam", "adamw"):
        config = TrainConfig(epochs=1, batch_size=2, optimizer=name, lr=0.1, weight_decay=0.0, momentum=0.9)
        optimizer = make_optimizer(config, [{"params": params}])
        assert not optimizer.param_groups[0]["fused"]  # the CUDA-only fused path is not taken on CPU


@pytest.mark.load_aware
def test_threads_make_way_for_other_processes_and_come_back(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LoadAwareThreads: while other processes keep this process's cores busy (their time in /proc/stat, beyond this
    process's own), training runs on the cores they leave; when they stop, on all the configured threads again.
    Threads fixed by --threads stay fixed."""
    import os

    from hpsearch import devices

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(devices, "available_cpus", lambda: 2)
    stat = tmp_path / "stat"

    def write(busy_ticks: int, steal_ticks: int = 0) -> None:  # per core: user nice system idle iowait irq sirq steal
        stat.write_text("cpu  0 0 0 0 0 0 0 0\n" + "".join(f"cpu{c} {busy_ticks} 0 0 100 0 0 0 {steal_ticks} 0 0\n"
                                                          for c in (0, 1)))

    before = torch.get_num_threads()
    try:
        configure_threads(2)  # --threads 2
        write(0)
        governor = devices.LoadAwareThreads(interval=0.0, stat=stat)
        for busy in (10**9, 2 * 10**9):
            write(busy)
            governor.poll()
        assert torch.get_num_threads() == 2
        configure_threads(None)  # the default: the cores this process may use
        write(0)
        governor = devices.LoadAwareThreads(interval=0.0, stat=stat)
        write(10**9)  # the two cores were busy all along, and not with this process: one look is not enough
        governor.poll()
        assert torch.get_num_threads() == 2
        write(2 * 10**9)  # a second look says the same
        governor.poll()
        assert torch.get_num_threads() == 1
        governor.poll()  # nothing more on the cores: the others stopped, back up at once
        assert torch.get_num_threads() == 2
        write(3 * 10**9)  # a blip: one busy look, then quiet
        governor.poll()
        governor.poll()
        assert torch.get_num_threads() == 2
        for steal in (10**9, 2 * 10**9):  # the hypervisor's steal is no process on this machine
            write(3 * 10**9, steal_ticks=steal)
            governor.poll()
        assert torch.get_num_threads() == 2
        for busy in (4 * 10**9, 5 * 10**9):
            write(busy)
            governor.poll()
        assert torch.get_num_threads() == 1
        governor.restore()
        assert torch.get_num_threads() == 2
        # Before a training starts, one look over a short wait decides: this process computes nothing then.
        sleeps: list[float] = []
        monkeypatch.setattr(devices.time, "sleep", lambda s: (sleeps.append(s), write(6 * 10**9)))
        devices.LoadAwareThreads(stat=stat, first_look=0.25)
        assert sleeps == [0.25] and torch.get_num_threads() == 1
        monkeypatch.setattr(devices.time, "sleep", lambda s: None)  # the cores quiet during the look
        devices.LoadAwareThreads(stat=stat, first_look=0.25)
        assert torch.get_num_threads() == 2
    finally:
        configure_threads(before)
