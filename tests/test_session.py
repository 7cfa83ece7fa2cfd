"""The run session's options: what ``run``/``worker`` parse becomes one RunOptions, and every option a --workers
child needs reaches it on its command line (the storage URL alone through its environment)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import pytest
import typer

from hpsearch import cli
from hpsearch.cli._options import run_options
from hpsearch.launch import OPTION_ENV, Slot, worker_command, worker_env
from hpsearch.session import RunOptions
from tests.conftest import Result


def _parsed(*argv: str) -> Any:
    group = typer.main.get_command(cli.app)
    parent = group.make_context("hpsearch", list(argv))
    command = group.get_command(parent, argv[0])  # type: ignore[attr-defined]
    return command.make_context(argv[0], list(argv[1:]), parent=parent)


def test_run_and_worker_options_become_one_run_options(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("HPSEARCH_")]:
        monkeypatch.delenv(key)
    options = run_options(_parsed("run", "s.toml", "--no-artifacts", "--keep-checkpoints", "2", "--force",
                                  "--n-trials", "4", "--workers", "3"))
    assert options == RunOptions(explain=False, keep_checkpoints=2, force=True, n_trials=4, workers=3)
    assert run_options(_parsed("worker", "s", "--no-summary")) == RunOptions(summary=False)


def test_worker_command_carries_keep_checkpoints_and_the_artifact_store() -> None:
    slot = Slot("cpu", 1, None)
    cmd = worker_command("s", slot, n_trials=None, timeout=None, data_dir=None, cache_dir=None, compile=False,
                         keep_checkpoints=2, artifacts="s3://bucket/runs")
    assert cmd[4:] == ["s", "--no-summary", "--device", "cpu", "--threads", "1", "--artifacts", "s3://bucket/runs",
                       "--keep-checkpoints", "2"]
    plain = worker_command("s", slot, n_trials=None, timeout=None, data_dir=None, cache_dir=None, compile=False)
    assert "--keep-checkpoints" not in plain and "--artifacts" not in plain


def test_worker_env_holds_the_storage_and_none_of_the_options_on_the_command_line(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for key in OPTION_ENV:
        monkeypatch.setenv(key, "7")
    env = worker_env("sqlite:///x.db")
    assert env["HPSEARCH_STORAGE"] == "sqlite:///x.db"
    assert not set(OPTION_ENV) & set(env)
    assert env["HPSEARCH_CACHE"] == os.environ["HPSEARCH_CACHE"]  # not an option a worker gets on its command line


def test_workers_get_keep_checkpoints_on_their_command_line(run_cli: Callable[..., Result],
                                                            write_study: Callable[..., object],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from hpsearch import launch

    started: list[tuple[list[str], dict[str, str]]] = []

    def start_and_wait(commands: list[list[str]], slots: list[Slot], *, out: Any = None,
                       env: dict[str, str] | None = None) -> int:
        started.extend((cmd, env or {}) for cmd in commands)
        return 0

    monkeypatch.setattr(launch, "local_plan", lambda workers, device: [Slot("cpu", 1, None)] * workers)
    monkeypatch.setattr(launch, "start_and_wait", start_and_wait)
    monkeypatch.setenv("HPSEARCH_KEEP_CHECKPOINTS", "5")  # the flag below wins, for the children too
    write_study(n_trials=2, epochs=1)
    result = run_cli("run", "study.toml", "--workers", "2", "--device", "cpu", "--keep-checkpoints", "1")
    assert result.code == 0, result
    assert len(started) == 2
    for cmd, env in started:
        assert cmd[:4] == [sys.executable, "-m", "hpsearch", "worker"]
        assert cmd[cmd.index("--keep-checkpoints") + 1] == "1"
        assert cmd[cmd.index("--precision") + 1] == "fp32"  # conftest's HPSEARCH_PRECISION, read by the parent
        assert "HPSEARCH_KEEP_CHECKPOINTS" not in env and "HPSEARCH_PRECISION" not in env
    assert os.environ["HPSEARCH_KEEP_CHECKPOINTS"] == "5"  # the launching process's own environment is left alone
