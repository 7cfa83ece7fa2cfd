"""Trials explained in optuna-dashboard: the per-trial PNGs and notes a real ``hpsearch run`` uploads, served by
``hpsearch dashboard`` over HTTP and rendered by a real headless Chromium."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import sqlite3
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import torch.nn as nn

from hpsearch import cli
from hpsearch.accuracy import accuracy_on
from hpsearch.artifacts import ARTIFACTS_ATTR
from hpsearch.dashboard import PLACEHOLDER_WIDTH, StudiesArtifactStore
from hpsearch.explain import TrialExplainer, compute_line, summarize, training_seconds_by_device
from hpsearch.launch import Slot, worker_command
from tests.conftest import spawn_cli, study_text

NOTE_HEADER = "| layer | type | output shape | params | trainable |"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _main(*args: str) -> int:
    try:
        cli.main()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


@dataclass
class Served:
    url: str  # http://127.0.0.1:PORT
    root: Path
    study_id: int
    name: str
    stdout_head: list[str]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        return bytes(r.read())


def _json(url: str) -> Any:
    return json.loads(_get(url))


def _attrs(study_or_trial: dict[str, Any]) -> dict[str, Any]:
    """The API lists user attrs as [{"key", "value"}], values as strings."""
    return {a["key"]: a["value"] for a in study_or_trial["user_attrs"]}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One real ``hpsearch run`` (in this process: torch is already imported), then ``hpsearch dashboard`` as a
    real process on a free loopback port."""
    root = tmp_path_factory.mktemp("served")
    # pruner "none": on 192 images a trial may still be at chance after its first epoch, and be pruned as dead
    (root / "study.toml").write_text(study_text("tiny-dash", n_trials=3, extra='pruner = "none"'))
    storage = f"sqlite:///{root / 'db.sqlite'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("HPSEARCH_CACHE", str(root / "cache"))
        mp.setenv("HPSEARCH_DATA", str(root / "data"))
        mp.delenv("HPSEARCH_STORAGE", raising=False)
        mp.setattr(sys, "argv", ["hpsearch", "run", "study.toml", "--storage", storage, "--device", "cpu"])
        assert _main() == 0
    with _dashboard(storage, cwd=root, cache=root / "cache") as (url, head):
        summaries = _json(url + "/api/studies")["study_summaries"]
        study_id = next(s["study_id"] for s in summaries if s["study_name"] == "tiny-dash")
        yield Served(url=url, root=root, study_id=study_id, name="tiny-dash", stdout_head=head)


@contextmanager
def _dashboard(storage: str, *, cwd: Path, cache: Path) -> Iterator[tuple[str, list[str]]]:
    """``hpsearch dashboard`` as a real process on a free loopback port: its URL and first two stdout lines."""
    port = _free_port()
    proc = spawn_cli("dashboard", "--storage", storage, "--port", str(port), cwd=cwd,
                     env={"HPSEARCH_CACHE": str(cache)})
    try:
        head = [proc.stdout.readline().rstrip("\n") for _ in range(2)] if proc.stdout else []
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                _get(url + "/api/meta")
                break
            except OSError as e:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"dashboard did not start: {head} {proc.stderr and proc.stderr.read()}") from e
                time.sleep(0.2)
        yield url, head
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_dashboard_prints_url_and_binds_loopback(served: Served) -> None:
    port = served.url.rsplit(":", 1)[1]
    assert served.stdout_head == [
        f"artifacts from {served.root / 'cache' / 'artifacts'}",
        f"optuna-dashboard on http://127.0.0.1:{port}/dashboard  (Ctrl-C stops it)",
    ]
    # Bound to 127.0.0.1 only: another local address of this machine is refused.
    other = socket.gethostbyname(socket.gethostname())
    if not other.startswith("127."):
        with pytest.raises(OSError), socket.create_connection((other, int(port)), timeout=2):
            pass


def test_http_api_lists_notes_and_artifacts_that_download_byte_equal(served: Served) -> None:
    assert _json(served.url + "/api/meta")["artifact_is_available"] is True
    study = _json(f"{served.url}/api/studies/{served.study_id}")
    assert "- strategy: **scratch**" in study["note"]["body"]
    assert "- dataset: **synthetic:classes=3,size=12,train=192,test=32**" in study["note"]["body"]
    assert '"name": "tiny-dash"' in study["note"]["body"]  # the study file
    # No --artifacts: the store is this machine's default (<cache>/artifacts), which is not recorded on the study.
    assert ARTIFACTS_ATTR not in _attrs(study)
    trials = study["trials"]
    assert len(trials) == 3
    store = served.root / "cache" / "artifacts"
    for t in trials:
        n, tid = t["number"], t["trial_id"]
        names = sorted(a["filename"] for a in t["artifacts"])
        if t["state"] == "Complete":
            assert names == [f"trial-{n}-confusion.png", f"trial-{n}-learning-curve.png"]
        else:  # pruned after >= 1 epoch: the curve, no confusion matrix
            assert t["state"] == "Pruned" and names == [f"trial-{n}-learning-curve.png"]
        body = t["note"]["body"]
        assert body.startswith(f"## Trial {n} (")
        assert NOTE_HEADER in body
        assert f"- parameters: {int(_attrs(t)['param_count']):,} (" in body
        assert "- MACs per image: " in body and " on `cpu`" in body
        assert _images_line(store) in body
        for a in t["artifacts"]:
            link = f"/artifacts/{served.study_id}/{tid}/{a['artifact_id']}"
            assert f"]({link})" in body  # embedded in the note, as the dashboard's own image button writes it
            assert a["mimetype"] == "image/png"
            data = _get(served.url + link)
            assert data[:8] == b"\x89PNG\r\n\x1a\n"
            assert data == (store / a["artifact_id"]).read_bytes()


def _images_line(store: Path) -> str:
    return (f"- images: kept in `{store}` (host `{socket.gethostname()}`); where they do not show, start "
            "`hpsearch dashboard --artifacts <that store or a copy of it>`")


def test_study_note_counts_training_seconds_by_device(run_cli: Any, write_study: Any) -> None:
    from optuna_dashboard import get_note

    write_study(name="busy", n_trials=2)
    r = run_cli("run", "study.toml", "--device", "cpu")
    assert r.code == 0, r
    study = optuna.load_study(study_name="busy", storage="sqlite:///hpsearch.db")
    seconds = training_seconds_by_device(study.trials)
    assert list(seconds) == ["cpu"] and seconds["cpu"] > 0  # both trials trained on the CPU
    line = next(x for x in get_note(study).splitlines() if x.startswith("- compute: "))
    # as of the run's end (the note written when it started had no finished trial)
    assert line == compute_line(seconds) == f"- compute: {seconds['cpu']:,.1f} s of training in all (cpu: " \
        f"{seconds['cpu']:,.1f} s)"


def test_no_artifacts_uploads_nothing(run_cli: Any, write_study: Any, tmp_path: Path) -> None:
    write_study(name="plain", n_trials=1)
    r = run_cli("run", "study.toml", "--no-artifacts", "--device", "cpu")
    assert r.code == 0, r
    study = optuna.load_study(study_name="plain", storage="sqlite:///hpsearch.db")
    (trial,) = study.trials
    assert not [k for k in trial.system_attrs if k.startswith("artifacts:")]
    assert ARTIFACTS_ATTR not in study.user_attrs
    assert not (tmp_path / "cache" / "artifacts").exists() or not any((tmp_path / "cache" / "artifacts").iterdir())


def test_workers_pass_no_artifacts_on() -> None:
    slot = Slot(device="cpu", threads=1, cpus=None)
    cmd = worker_command("s", slot, n_trials=None, timeout=None, data_dir=None, cache_dir=None, compile=False,
                         explain=False)
    assert cmd[-1] == "--no-artifacts"
    assert "--no-artifacts" not in worker_command("s", slot, n_trials=None, timeout=None, data_dir=None,
                                                  cache_dir=None, compile=False)


def test_summarize_counts_params_macs_and_frozen_layers() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 10))
    model[0].requires_grad_(False)
    s = summarize(model, channels=1, size=8)
    assert [(r.name, r.kind, r.output_shape, r.params, r.trainable) for r in s.layers] == [
        ("0", "Conv2d", (4, 8, 8), 40, False),
        ("1", "ReLU", (4, 8, 8), 0, False),
        ("2", "MaxPool2d", (4, 4, 4), 0, False),
        ("3", "Flatten", (64,), 0, False),
        ("4", "Linear", (10,), 650, True),
    ]
    assert s.macs == 4 * 8 * 8 * 9 + 64 * 10
    assert (s.total_params, s.trainable_params) == (690, 650)
    assert model.training  # left as found


class _NoBatchOfOne(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) == 1:
            raise RuntimeError("needs a batch")
        return x.flatten(1)


def test_explainer_survives_a_model_it_cannot_summarize(tmp_path: Path) -> None:
    from optuna_dashboard import get_note

    from hpsearch.artifacts import open_artifact_store
    from hpsearch.data import DataInfo
    from hpsearch.train_types import Built, FitResult

    info = DataInfo(name="x", channels=1, height=2, width=2, num_classes=4, mean=(0.5,), std=(0.5,), flip=False,
                    classes=("a", "b", "c", "d"))
    store = open_artifact_store(str(tmp_path / "store"))
    explainer = TrialExplainer(store, Built(model=_NoBatchOfOne(), param_groups=[]), info, device=torch.device("cpu"))
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'db.sqlite'}", direction="maximize")
    trial = study.ask()
    explainer.observe(FitResult(best_val_accuracy=0.5, best_epoch=0, train_loss=[1.0], val_accuracy=[0.5],
                                seconds_per_epoch=[0.1], confusion=[[1, 0, 0, 0]] * 4))
    explainer.finish(trial, complete=True)
    note = get_note(trial)
    assert "- no layer table: RuntimeError: needs a batch" in note
    assert _images_line(tmp_path / "store") in note
    assert NOTE_HEADER not in note
    assert len(os.listdir(tmp_path / "store")) == 2  # the curve and the confusion matrix


def test_evaluate_fills_the_confusion_counts() -> None:
    from hpsearch.data import Split

    y = torch.tensor([0, 0, 1, 2, 2, 2])
    pred = torch.tensor([0, 1, 1, 2, 0, 2])
    split = Split(x=torch.nn.functional.one_hot(pred, 3).float().view(6, 3, 1, 1), y=y)
    confusion = torch.full((9,), 7, dtype=torch.int64)  # stale counts are cleared
    acc = accuracy_on(nn.Flatten(), split, lambda x: x, torch.device("cpu"), confusion=confusion)
    assert acc == 4 / 6
    assert confusion.view(3, 3).tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_studies_artifact_store_reads_each_location(tmp_path: Path) -> None:
    from optuna.artifacts import FileSystemArtifactStore

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (b / "id-b").write_bytes(b"bee")
    store = StudiesArtifactStore([FileSystemArtifactStore(a), FileSystemArtifactStore(b)], [str(a), str(b)])
    with store.open_reader("id-b") as f:
        assert f.read() == b"bee"
    for bad in ("../id-b", str(b / "id-b"), ""):  # malformed ids still raise, as in the file-system store
        with pytest.raises(ValueError, match="Invalid artifact_id"):
            store.open_reader(bad)


def test_an_image_in_no_store_is_a_placeholder_png(tmp_path: Path) -> None:
    from optuna.artifacts import FileSystemArtifactStore
    from PIL import Image

    from hpsearch.dashboard import placeholder_lines

    a = tmp_path / "a"
    a.mkdir()
    (a / "id-a").write_bytes(b"real bytes")
    store = StudiesArtifactStore([FileSystemArtifactStore(a)], [str(a)])
    with store.open_reader("id-a") as f:
        assert f.read() == b"real bytes"
    with store.open_reader("id-none") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG" and image.width == PLACEHOLDER_WIDTH
    assert placeholder_lines([str(a)]) == ["image not in the artifact stores this dashboard reads:", f"  {a}",
                                           "see the note's 'images' line; start",
                                           "hpsearch dashboard --artifacts DIR|s3://..."]
    long = "s3://bucket/" + "p" * 200
    assert all(len(x) <= 80 for x in placeholder_lines([long] * 6))
    # No store could be opened: still a placeholder, and an upload says why it cannot be kept.
    empty = StudiesArtifactStore([], [])
    assert empty.open_reader("id-a").read()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(OSError, match="no artifact store could be opened"):
        empty.write("x", io.BytesIO(b""))


def _chromium_skip_reason() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is missing (apt-get install chromium chromium-driver; .ci/run does it)"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    reason = _chromium_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_browser_renders_study_trial_note_and_artifact_images(served: Served, browser: Any, tmp_path: Path) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 90)
    browser.get(f"{served.url}/dashboard/studies/{served.study_id}")
    wait.until(lambda d: f"{served.name} (id={served.study_id})" in d.find_element(By.TAG_NAME, "body").text)

    study = _json(f"{served.url}/api/studies/{served.study_id}")
    trial = next(t for t in study["trials"] if t["state"] == "Complete")
    browser.get(f"{served.url}/dashboard/studies/{served.study_id}/trials?numbers={trial['number']}")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "table th"))
    body = browser.find_element(By.TAG_NAME, "body").text
    assert f"{len(study['trials'])} Trials" in body
    assert f"Trial {trial['number']} (trial_id={trial['trial_id']})" in body

    # The note's layer table, rendered from Markdown (read again if a re-render made the handles stale).
    def note_tables(d: Any) -> list[list[list[str]]]:
        return [[[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
                 for tr in t.find_elements(By.CSS_SELECTOR, "tbody tr")]
                for t in d.find_elements(By.TAG_NAME, "table")
                if [th.text for th in t.find_elements(By.TAG_NAME, "th")] ==
                ["layer", "type", "output shape", "params", "trainable"]]

    tables = WebDriverWait(browser, 90, ignored_exceptions=(StaleElementReferenceException,)).until(note_tables)
    assert len(tables) == 1
    [rows] = tables
    assert rows[0][1] == "Conv2d" and rows[0][4] == "trainable"
    assert rows[-1][1:3] == ["Linear", "3"]  # the classifier: 3 classes

    # The note's images are the trial's artifacts, and they loaded. Checked in the page in one script, retried: the
    # dashboard re-renders as it polls, which makes element handles held across calls stale.
    expected = {f"{served.url}/artifacts/{served.study_id}/{trial['trial_id']}/{a['artifact_id']}"
                for a in trial["artifacts"]}
    loaded = """const want = new Set(arguments[0]);
                const mine = [...document.images].filter(i => want.has(i.src));
                return new Set(mine.map(i => i.src)).size === want.size
                    && mine.every(i => i.complete && i.naturalWidth >= 300);"""
    wait.until(lambda d: d.execute_script(loaded, sorted(expected)),
               message=f"the note's images {sorted(expected)} did not all load at >= 300 px wide")
    shot = tmp_path / "trial.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("HPSEARCH_SCREENSHOTS"):  # docs/: HPSEARCH_SCREENSHOTS=docs pytest -k browser
        shutil.copy(shot, Path(os.environ["HPSEARCH_SCREENSHOTS"]) / "dashboard-trial.png")


def _dump(db: Path) -> list[str]:
    """Every row of the SQLite database as SQL (its WAL file included)."""
    con = sqlite3.connect(db)
    try:
        return list(con.iterdump())
    finally:
        con.close()


def test_browser_explains_images_missing_from_the_store(served: Served, browser: Any, tmp_path: Path) -> None:
    """The database copied to another machine without its artifact store: each note image is a placeholder that
    says so, the note says where the images were kept, and the dashboard leaves the database as it was."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    db = tmp_path / "copied.sqlite"
    with sqlite3.connect(served.root / "db.sqlite") as src, sqlite3.connect(db) as dst:
        src.backup(dst)  # WAL mode: the file alone may not hold the latest writes yet
    before = _dump(db)
    kept = served.root / "cache" / "artifacts"  # where the run kept them; this dashboard's cache has none
    with _dashboard(f"sqlite:///{db}", cwd=tmp_path, cache=tmp_path / "cache") as (url, head):
        assert head[0] == f"artifacts from {tmp_path / 'cache' / 'artifacts'}"
        study = _json(f"{url}/api/studies/{served.study_id}")
        trial = next(t for t in study["trials"] if t["state"] == "Complete")
        links = [f"/artifacts/{served.study_id}/{trial['trial_id']}/{a['artifact_id']}" for a in trial["artifacts"]]
        assert len(links) == 2 and not any((tmp_path / "cache" / "artifacts" / a["artifact_id"]).exists()
                                           for a in trial["artifacts"])
        assert _get(url + links[0])[:8] == b"\x89PNG\r\n\x1a\n"

        wait = WebDriverWait(browser, 90)
        browser.get(f"{url}/dashboard/studies/{served.study_id}/trials?numbers={trial['number']}")
        loaded = """const want = new Set(arguments[0]);
                    const mine = [...document.images].filter(i => want.has(i.src));
                    return new Set(mine.map(i => i.src)).size === want.size
                        && mine.every(i => i.complete && i.naturalWidth > 0) && mine.map(i => i.naturalWidth);"""
        widths = wait.until(lambda d: d.execute_script(loaded, sorted(url + link for link in links)),
                            message="the note's images did not load (broken images)")
        assert set(widths) == {PLACEHOLDER_WIDTH}  # the placeholder (in the note and the artifact list)
        line = f"images: kept in {kept} (host {socket.gethostname()}); where they do not show, start " \
               "hpsearch dashboard --artifacts <that store or a copy of it>"
        wait.until(lambda d: line in d.find_element(By.TAG_NAME, "body").text,
                   message=f"the note does not show {line!r}")
    assert _dump(db) == before  # read-only: the dashboard wrote nothing to the database
