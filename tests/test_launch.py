"""``--workers K``: the device/core plan (CUDA round robin checked without a GPU), the process launcher with
real processes, and one CLI run with two workers on a tiny study."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import optuna
import pytest
import torch

from hpsearch._errors import SpecError
from hpsearch.launch import Slot, plan, start_and_wait, worker_command
from hpsearch.storage import open_storage
from tests.conftest import Result


def test_plain_cuda_deals_gpus_round_robin_and_splits_the_cores() -> None:
    slots = plan(5, torch.device("cuda"), gpus=2, cpus=range(16))
    assert [s.device for s in slots] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert all(s.threads == 3 for s in slots)
    pinned = [set(s.cpus or ()) for s in slots]
    assert all(len(p) == 3 for p in pinned)
    assert set().union(*pinned) == set(range(15)) and sum(map(len, pinned)) == 15  # disjoint


def test_an_explicit_gpu_or_mps_keeps_every_worker_on_it() -> None:
    assert {s.device for s in plan(3, torch.device("cuda:1"), gpus=4, cpus=range(4))} == {"cuda:1"}
    assert {s.device for s in plan(2, torch.device("mps"), gpus=0, cpus=None)} == {"mps"}


def test_cpu_workers_get_cores_divided_by_k_threads_each() -> None:
    slots = plan(2, torch.device("cpu"), gpus=0, cpus=[0, 1])
    assert slots == [Slot("cpu", 1, (0,)), Slot("cpu", 1, (1,))]
    four = plan(2, torch.device("cpu"), gpus=0, cpus=[0, 1, 2, 3, 4])
    assert [s.cpus for s in four] == [(0, 1), (2, 3)] and four[0].threads == 2


def test_more_cpu_workers_than_cores_are_refused_gpu_workers_share_cores() -> None:
    """Two trainings on one core slowed each other 5-20x on the 2-core machine: CPU workers never oversubscribe."""
    with pytest.raises(SpecError, match=r"^--workers: the value is 3, but this process may use 2 CPU cores and CPU "
                                        r"workers do not share one; allowed: 1\.\.2$"):
        plan(3, torch.device("cpu"), gpus=0, cpus=[4, 5])
    slots = plan(3, torch.device("cuda"), gpus=3, cpus=[4, 5])  # the GPUs do the work; the cores feed them
    assert [s.cpus for s in slots] == [(4,), (5,), (4,)]
    assert all(s.threads == 1 for s in slots)


def test_local_plan_keeps_to_the_cgroup_cpu_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    """A container limited to 1 CPU on a bigger host: one CPU worker, one thread (not one per visible core)."""
    from hpsearch import launch

    monkeypatch.setattr(launch, "available_cpus", lambda: 1)
    [slot] = launch.local_plan(1, torch.device("cpu"))
    assert slot.threads == 1
    with pytest.raises(SpecError, match=r"^--workers: the value is 2, but this process may use 1 CPU core and"):
        launch.local_plan(2, torch.device("cpu"))


def test_without_affinity_support_nothing_is_pinned() -> None:
    slots = plan(2, torch.device("cpu"), gpus=0, cpus=None)
    assert all(s.cpus is None and s.threads >= 1 for s in slots)


def test_bad_worker_counts_and_missing_gpus_are_refused_with_the_rule() -> None:
    with pytest.raises(SpecError, match=r"^--workers: the value is 0, but must be --workers >= 1$"):
        plan(0, torch.device("cpu"), gpus=0, cpus=[0])
    with pytest.raises(SpecError, match=r"^--device: 'cuda' was asked for, but PyTorch sees no CUDA device here$"):
        plan(2, torch.device("cuda"), gpus=0, cpus=[0, 1])


def test_worker_command_passes_the_slot_and_the_run_options() -> None:
    cmd = worker_command("s1", Slot("cuda:1", 4, (0, 1, 2, 3)), n_trials=20, timeout=None,
                         data_dir=None, cache_dir=None, compile=True)
    assert cmd[:4] == [sys.executable, "-m", "hpsearch", "worker"]
    assert cmd[4:] == ["s1", "--no-summary", "--device", "cuda:1", "--threads", "4", "--n-trials", "20", "--compile"]


class Sink:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, text: str) -> None:
        self.lines.append(text)

    def flush(self) -> None:
        pass


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="CPU pinning is Linux-only")
def test_start_and_wait_pins_each_process_prefixes_its_lines_and_returns_the_failing_code() -> None:
    cores = sorted(os.sched_getaffinity(0))
    slots = [Slot("cpu", 1, (cores[0],)), Slot("cpu", 1, (cores[-1],))]
    show = "import os, sys; print(sorted(os.sched_getaffinity(0))); sys.exit({})"
    commands = [[sys.executable, "-c", show.format(0)], [sys.executable, "-c", show.format(3)]]
    sink = Sink()
    assert start_and_wait(commands, slots, out=sink) == 3  # type: ignore[arg-type]
    assert sorted(sink.lines) == sorted([f"[w0 cpu] [{cores[0]}]\n", f"[w1 cpu] [{cores[-1]}]\n"])


def test_start_and_wait_returns_zero_when_all_succeed() -> None:
    slots = [Slot("cpu", 1, None), Slot("cpu", 1, None)]
    commands = [[sys.executable, "-c", "pass"]] * 2
    assert start_and_wait(commands, slots, out=Sink()) == 0  # type: ignore[arg-type]


@pytest.mark.slow  # two extra Python processes importing torch: about 10 s
def test_run_with_two_workers_shares_one_study(run_cli: Callable[..., Result],
                                               write_study: Callable[..., object]) -> None:
    write_study(n_trials=4, epochs=1)
    result = run_cli("run", "study.toml", "--workers", "2", "--device", "cpu")
    assert result.code == 0, result
    assert "[w0 cpu]" in result.out and "[w1 cpu]" in result.out
    study = optuna.load_study(storage=open_storage(None), study_name="tiny")
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state.is_finished() and t.state != optuna.trial.TrialState.FAIL]
    assert len(finished) >= 4  # each worker stops at the total; one may have had a trial in flight
    assert {t.user_attrs.get("device") for t in finished} == {"cpu"}
