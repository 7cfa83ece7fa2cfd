"""Shared test helpers: study files written into tmp_path, the CLI run in-process or as a real process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from hpsearch import cli

TINY = 'dataset = "synthetic:classes=3,size=12,train=192,test=32"'
# A space small enough that a trial takes well under a second on a CPU.
TINY_SPACE = """
[space]
padding = "same"
stride = 1
conv_layers = [1, 2]
channels = [4, 8]
fc_layers = [1, 2]
fc_width = [16, 32]
batch_size = [32, 64]
optimizer = ["adam", "sgd"]
"""

# One configuration, a few tens of milliseconds per epoch: tests of the run's machinery (signals, checkpoints,
# stores), not of the search.
ONE_CONFIG_SPACE = """
[space]
conv_layers = 1
channels = 4
padding = "same"
stride = 1
fc_layers = 1
batch_size = 32
optimizer = "adam"
"""


def study_text(name: str = "tiny", *, epochs: int = 2, n_trials: int = 3, extra: str = "", space: str = TINY_SPACE,
               dataset: str = TINY) -> str:
    return textwrap.dedent(f"""\
        name = "{name}"
        {dataset}
        strategy = "scratch"
        epochs = {epochs}
        n_trials = {n_trials}
        {extra}
        """) + space


def fake_probe(seconds_per_epoch: float | Callable[..., float]) -> Callable[..., object]:
    """A stand-in for ``hpsearch.train.probe_steps`` whose epoch estimate is ``seconds_per_epoch`` (or a function of
    the Built model) in every precision: the cost-cap tests do not hang on this machine's speed."""
    from hpsearch.train import Probe

    def probe(built, data, config, device, dtypes, **_: object) -> Probe:
        steps = len(data.train) // min(config.batch_size, len(data.train))
        epoch = seconds_per_epoch(built) if callable(seconds_per_epoch) else seconds_per_epoch
        return Probe(cost={d: epoch / steps for d in dtypes}, wall={d: epoch / steps for d in dtypes},
                     steps_per_epoch=steps, timed_steps=3)

    return probe


@pytest.fixture
def write_study(tmp_path: Path) -> Callable[..., Path]:
    def write(filename: str = "study.toml", text: str | None = None, **kwargs: object) -> Path:
        path = tmp_path / filename
        path.write_text(text if text is not None else study_text(**kwargs))  # type: ignore[arg-type]
        return path

    return write


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own directory with its own data/cache dirs and no inherited storage URL."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HPSEARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HPSEARCH_DATA", str(tmp_path / "data"))
    monkeypatch.delenv("HPSEARCH_STORAGE", raising=False)
    # fp32, not auto: on a CPU with native bf16, auto times both precisions per architecture, and under a varying load
    # two runs of one configuration could then train in different precisions (tests that compare runs exactly would
    # flake). Tests of the choice itself pass --precision auto. Subprocesses inherit it.
    monkeypatch.setenv("HPSEARCH_PRECISION", "fp32")


@pytest.fixture(autouse=True)
def _fixed_threads(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Trainings in this process keep their threads whatever else the machine runs (as with --threads): tests that
    compare two runs' numbers exactly would otherwise depend on the load (a float sum's order follows the threads).
    LoadAwareThreads is tested by itself (marked ``load_aware``) and in subprocesses (test_shared_cpu.py)."""
    if "load_aware" not in request.keywords:
        from hpsearch import devices

        monkeypatch.setattr(devices.LoadAwareThreads, "poll", lambda self: None)
        monkeypatch.setattr(devices.LoadAwareThreads, "_first_look", lambda self, seconds: None)


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def __repr__(self) -> str:
        return f"Result(code={self.code}, out={self.out[-2000:]!r}, err={self.err[-2000:]!r})"


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Callable[..., Result]:
    """``hpsearch ARGS`` in this process (fast); returns exit code, stdout and stderr."""

    def run(*args: str) -> Result:
        monkeypatch.setattr(sys, "argv", ["hpsearch", *args])
        # rich decides the width at import; a wide console keeps every message on one line.
        monkeypatch.setattr(cli.console, "width", 200)
        monkeypatch.setattr(cli.err_console, "width", 200)
        code = 0
        try:
            cli.main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def spawn_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """``python -m hpsearch ARGS`` as a real process, with Ctrl-C (SIGINT) working as in a terminal: a test run
    started in the background or under nohup ignores SIGINT, and children inherit that (Python then installs no
    KeyboardInterrupt handler), so a test's SIGINT would do nothing."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "hpsearch", *args], cwd=cwd, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
