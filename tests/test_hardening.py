"""Broken files, read-only places, bad environment values and secrets: one line, the documented exit code,
and nothing written that should not be (issue #10)."""

from __future__ import annotations

import gzip
import io
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest

DB = "hpsearch.db"


@contextmanager
def read_only(path: Path) -> Iterator[None]:
    """``path`` made read-only. Root ignores permission bits, so as root the file is also made immutable
    (``chattr +i``), which refuses root too; where that is not possible the test is skipped."""
    mode = path.stat().st_mode
    path.chmod(0o555 if path.is_dir() else 0o444)
    immutable = False
    try:
        if os.geteuid() == 0:
            done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
            if done.returncode != 0:
                pytest.skip(f"running as root and `chattr +i` is refused here ({done.stderr.strip()}): "
                            "root ignores permission bits, so nothing would be read-only")
            immutable = True
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(mode)


def _optuna_db(path: Path) -> str:
    url = f"sqlite:///{path}"
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    return url


def _journal_mode(path: Path) -> str:
    with sqlite3.connect(path) as con:
        return con.execute("PRAGMA journal_mode").fetchone()[0]


def _tables(path: Path) -> list[str]:
    with sqlite3.connect(path) as con:
        return sorted(r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))


READ_COMMANDS = [("studies",), ("show", "s"), ("show", "s", "--json"), ("export", "s", "--out", "e.json"),
                 ("delete", "s", "--yes"), ("dashboard",)]


# ---------------------------------------------------------------- databases the read-only commands must not change

@pytest.mark.parametrize("args", READ_COMMANDS)
def test_read_commands_refuse_another_applications_database_and_leave_it_as_it_was(run_cli, tmp_path: Path, args):
    other = tmp_path / "notes.db"
    with sqlite3.connect(other) as con:
        con.execute("CREATE TABLE notes (body TEXT)")
    con.close()
    result = run_cli(*args, "--storage", f"sqlite:///{other}")
    assert (result.code, result.err) == (
        2, f"error: --storage sqlite:///{other}: not an Optuna database (no 'studies' table); run a study first, "
           "or check the URL\n")
    assert _tables(other) == ["notes"]
    assert _journal_mode(other) == "delete"


@pytest.mark.parametrize("args", READ_COMMANDS[:4])
def test_read_commands_do_not_switch_an_optuna_database_to_wal(run_cli, tmp_path: Path, args):
    url = _optuna_db(tmp_path / "x.db")
    assert _journal_mode(tmp_path / "x.db") == "delete"
    result = run_cli(*args, "--storage", url)
    assert result.code == 0, result
    assert _journal_mode(tmp_path / "x.db") == "delete"


def test_read_commands_refuse_a_file_that_is_not_sqlite(run_cli, tmp_path: Path):
    (tmp_path / "x.db").write_text("hello, not a database\n" * 100)
    result = run_cli("show", "s", "--storage", "sqlite:///x.db")
    assert (result.code, result.err) == (
        2, "error: --storage: 'x.db' is not an SQLite database, or it is damaged (file is not a database)\n")


# ---------------------------------------------------------------- what a run writes, checked before its first trial

def test_run_refuses_a_read_only_sqlite_file_in_one_line(run_cli, write_study, tmp_path: Path):
    _optuna_db(tmp_path / DB)
    with read_only(tmp_path / DB):
        result = run_cli("run", str(write_study()))
    assert result.code == 2, result
    assert result.err.startswith(f"error: --storage: cannot write to the SQLite file '{DB}' (")
    assert result.err.endswith("); make it writable or choose another\n") and result.err.count("\n") == 1


def test_run_refuses_a_database_in_a_read_only_directory(run_cli, write_study, tmp_path: Path):
    study = write_study()
    locked = tmp_path / "locked"
    locked.mkdir()
    with read_only(locked):
        result = run_cli("run", str(study), "--storage", f"sqlite:///{locked}/x.db")
    assert result.code == 2, result
    assert result.err.startswith(f"error: --storage: cannot write to the directory '{locked}' (")
    assert not (locked / "x.db").exists()


def test_read_only_cache_dir_is_found_before_any_trial(run_cli, write_study, tmp_path: Path):
    cache = tmp_path / "ro-cache"
    cache.mkdir()
    with read_only(cache):
        result = run_cli("run", str(write_study()), "--cache-dir", str(cache))
    assert result.code == 2, result
    assert result.err.startswith(f"error: --cache-dir: cannot write to the directory '{cache}' (")
    assert result.err.count("\n") == 1 and result.out == ""
    assert not (tmp_path / DB).exists()  # no trial ran, nothing was created


def test_read_only_checkpoint_dir_is_found_before_any_trial(run_cli, write_study, tmp_path: Path):
    checkpoints = tmp_path / "cache" / "artifacts"  # the default artifact store, where checkpoints go
    checkpoints.mkdir(parents=True)
    with read_only(checkpoints):
        result = run_cli("run", str(write_study()))
    assert result.code == 2, result
    assert result.err.startswith(f"error: --artifacts: cannot write to the directory '{checkpoints}' (")
    assert not (tmp_path / DB).exists()


def test_write_checks_leave_no_folders_behind(run_cli, write_study, tmp_path: Path):
    result = run_cli("run", str(write_study(dataset='dataset = "folder:nowhere"')))
    assert result.code == 2, result
    assert not (tmp_path / "cache").exists()


# ---------------------------------------------------------------- environment values

@pytest.mark.parametrize("variable", ["HPSEARCH_HEARTBEAT_SECONDS", "HPSEARCH_GRACE_SECONDS"])
@pytest.mark.parametrize("command", [("run", "study.toml"), ("show", "s"), ("worker", "s")])
def test_bad_environment_value_is_bad_input_naming_the_variable(run_cli, write_study, tmp_path: Path,
                                                               monkeypatch, variable, command):
    write_study()
    url = _optuna_db(tmp_path / DB)
    monkeypatch.setenv(variable, "abc")
    result = run_cli(*command, "--storage", url)
    assert (result.code, result.err) == (2, f"error: {variable}: 'abc' must be a whole number of seconds >= 1\n")


# ---------------------------------------------------------------- broken data files

def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _mnist(directory: Path) -> None:
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, shape in (("train-images-idx3-ubyte", (40, 28, 28)), ("train-labels-idx1-ubyte", (40,)),
                        ("t10k-images-idx3-ubyte", (8, 28, 28)), ("t10k-labels-idx1-ubyte", (8,))):
        (directory / f"{name}.gz").write_bytes(gzip.compress(_idx(rng.integers(0, 10, shape))))


@pytest.mark.parametrize(("damage", "problem"), [
    (lambda b: b[: len(b) // 2], "truncated gzip file (it ends before its compressed data does)"),
    (lambda b: b"this is not gzip at all" * 10, "not a valid gzip file (Not a gzipped file (b'th'))"),
])
def test_broken_gzip_is_one_line_naming_the_file(run_cli, write_study, tmp_path: Path, damage, problem):
    _mnist(tmp_path / "data" / "mnist")
    broken = tmp_path / "data" / "mnist" / "train-images-idx3-ubyte.gz"
    broken.write_bytes(damage(broken.read_bytes()))
    result = run_cli("run", str(write_study(dataset='dataset = "mnist"')))
    assert (result.code, result.err) == (2, f"error: {broken}: {problem}\n")
    assert not (tmp_path / DB).exists()  # a run that fails on its data leaves no empty database


def test_broken_cifar_batch_is_one_line_naming_the_file(run_cli, write_study, tmp_path: Path):
    root = tmp_path / "data" / "cifar10" / "cifar-10-batches-py"
    root.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (root / name).write_bytes(b"\x80\x04garbage")
    result = run_cli("run", str(write_study(dataset='dataset = "cifar10"')))
    assert result.code == 2, result
    assert result.err.startswith(f"error: {root / 'data_batch_1'}: not a CIFAR-10 batch (")
    assert result.err.count("\n") == 1


def test_file_that_is_not_an_image_in_an_image_folder(run_cli, write_study, tmp_path: Path):
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / "pics" / "train" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "pics" / "train" / cls / f"{i}.png")
    fake = tmp_path / "pics" / "train" / "dog" / "notes.png"
    fake.write_text("shopping list\n")
    result = run_cli("run", str(write_study(dataset=f'dataset = "folder:{tmp_path / "pics"}"')))
    assert result.code == 2, result
    assert result.err.startswith(f"error: {fake}: not a readable image (cannot identify image file")
    assert result.err.count("\n") == 1
    assert not (tmp_path / DB).exists()


def test_truncated_image_in_an_image_folder(run_cli, write_study, tmp_path: Path):
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / "pics" / "train" / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8)).save(tmp_path / "pics" / "train" / cls / f"{i}.png")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(buf, format="JPEG")
    cut = tmp_path / "pics" / "train" / "cat" / "cut.jpg"
    cut.write_bytes(buf.getvalue()[:200])
    result = run_cli("run", str(write_study(dataset=f'dataset = "folder:{tmp_path / "pics"}"')))
    assert result.code == 2, result
    assert result.err.startswith(f"error: {cut}: not a readable image (")
    assert result.err.count("\n") == 1


# ---------------------------------------------------------------- requests beyond memory

def test_synthetic_request_beyond_memory_says_how_much_it_needs(run_cli, write_study, tmp_path: Path):
    path = write_study(dataset='dataset = "synthetic:train=1000000000000"')
    result = run_cli("run", str(path))
    assert result.code == 2, result
    assert result.err.startswith(f"error: {path}: dataset 'synthetic:train=1000000000000': generating "
                                 "1000000000128 images of 1x16x16 needs about 3,337,860.1 GiB of memory; "
                                 "this machine has ")
    assert result.err.endswith(" GiB\n") and result.err.count("\n") == 1


# ---------------------------------------------------------------- export

def test_export_to_a_directory_leaves_no_tmp_file(run_cli, tmp_path: Path):
    url = _optuna_db(tmp_path / DB)
    (tmp_path / "out.json").mkdir()
    result = run_cli("export", "s", "--out", "out.json", "--storage", url)
    assert (result.code, result.err) == (
        2, "error: --out: 'out.json' is a directory; give a file name ending in .csv or .json\n")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == ["out.json"]


def test_export_that_cannot_be_moved_into_place_leaves_no_tmp_file(run_cli, tmp_path: Path, monkeypatch):
    url = _optuna_db(tmp_path / DB)

    def refuse(self: Path, target: Any) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "replace", refuse)
    result = run_cli("export", "s", "--out", "e.csv", "--storage", url)
    assert (result.code, result.err) == (1, "error: --out: cannot write 'e.csv' (Permission denied)\n")
    assert [p.name for p in tmp_path.iterdir() if "e.csv" in p.name] == []  # neither the file nor its temporary


# ---------------------------------------------------------------- secrets

def test_workers_get_the_storage_url_from_the_environment_not_argv(monkeypatch):
    import torch

    from hpsearch import launch as launch_module

    url = "postgresql+psycopg://alice:s3cret-pw@db.example:5432/hp"
    started: list[tuple[list[str], dict[str, str]]] = []

    class FakeProcess:
        def __init__(self, cmd: list[str], **kwargs: Any) -> None:
            started.append((cmd, kwargs["env"]))
            self.stdout = io.StringIO("")

        def wait(self) -> int:
            return 0

    monkeypatch.setattr(launch_module.subprocess, "Popen", FakeProcess)
    code = launch_module.launch_workers("s", 2, torch.device("cpu"), storage=url, n_trials=5, timeout=None,
                                        data_dir=None, cache_dir=None, compile=False, out=io.StringIO())
    assert code == 0 and len(started) == 2
    for cmd, env in started:
        assert not any("s3cret" in arg or "db.example" in arg for arg in cmd), cmd
        assert "--storage" not in cmd
        assert env["HPSEARCH_STORAGE"] == url


def test_a_worker_reads_the_storage_from_the_environment(tmp_path: Path):
    url = _optuna_db(tmp_path / "elsewhere.db")
    env = {**os.environ, "HPSEARCH_STORAGE": url, "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-m", "hpsearch", "show", "s", "--json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert '"study": "s"' in done.stdout


def test_workers_starting_together_all_pass_the_cache_dir_check(tmp_path):
    # Each check makes the missing folders and removes them again; a worker starting beside another used to find
    # them gone between its mkdir and its probe ("cannot write ... (No such file or directory)").
    import threading

    from hpsearch._preflight import check_writable_dir

    errors: list[Exception] = []
    for round_ in range(20):
        target = tmp_path / f"round{round_}" / "cache"

        def check() -> None:
            try:
                check_writable_dir(target, option="--cache-dir")  # noqa: B023 (joined before the next round)
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=check) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
