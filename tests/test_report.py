"""``hpsearch report``: a self-contained HTML file with every figure, PNGs, summary.md, the strategy-vs-cost view."""

from __future__ import annotations

import datetime as dt
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial
from PIL import Image

from hpsearch.report import cost_curve, strategy_row
from hpsearch.results import attr_key

STORAGE = "sqlite:///report.db"
FIGURES = ("history", "importances", "parallel", "intermediate", "slice")
T0 = dt.datetime(2026, 1, 1)


def make_study(name: str, strategy: str, *, dataset: str = "mnist", n: int = 8, test: bool = False,
               speed: float = 1.0) -> optuna.Study:
    """A finished study as hpsearch leaves one (curves, seconds per epoch, strategy/dataset), without training."""
    study = optuna.create_study(study_name=name, storage=STORAGE, direction="maximize")
    study.set_user_attr("strategy", strategy)
    study.set_user_attr("dataset", dataset)
    dists = {"lr": FloatDistribution(1e-4, 1e-1, log=True), "layers": IntDistribution(1, 4),
             "opt": CategoricalDistribution(["sgd", "adam"])}
    for i in range(n):
        pruned = i % 4 == 3
        curve = [0.5 + 0.04 * i * (e + 1) / 3 for e in range(1 if pruned else 3)]
        attrs: dict[str, Any] = {"seconds_per_epoch": 2.0 * speed, "param_count": 1000 + i}
        if test and not pruned:  # as `hpsearch evaluate` stores it: on the study, by trial number
            acc = curve[-1] - 0.01
            study.set_user_attr(attr_key(i), {"epochs": 3, "runs": [{"test_accuracy": acc}], "mean": acc, "std": 0.0})
        study.add_trial(create_trial(
            state=TrialState.PRUNED if pruned else TrialState.COMPLETE, value=None if pruned else max(curve),
            params={"lr": 10 ** (-3 + (i % 3)), "layers": 1 + i % 4, "opt": ["sgd", "adam"][i % 2]},
            distributions=dists, intermediate_values=dict(enumerate(curve)), user_attrs=attrs))
    return study


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.figures: list[str] = []
        self.script_srcs = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]
        if tag == "script" and "src" in a:
            self.script_srcs += 1
        if "data-figure" in a and a["data-figure"]:
            self.figures.append(a["data-figure"])


def _parse(path: Path) -> _Refs:
    p = _Refs()
    p.feed(path.read_text(encoding="utf-8"))
    p.close()
    return p


def test_report_of_two_studies_is_self_contained_with_every_figure(run_cli: Any, tmp_path: Path) -> None:
    make_study("scratch-a", "scratch", test=True)
    make_study("zoo-b", "zoo", speed=5.0)
    r = run_cli("report", "scratch-a", "zoo-b", "--storage", STORAGE, "--out", "rep")
    assert r.code == 0, r
    out = tmp_path / "rep"
    expected = ["strategy-vs-cost-mnist"] + [f"{s}-{f}" for s in ("scratch-a", "zoo-b") for f in FIGURES]

    html = out / "index.html"
    refs = _parse(html)
    assert refs.figures == expected
    assert not [u for u in refs.refs if u.startswith(("http://", "https://", "//"))]
    assert refs.script_srcs == 0  # plotly.js inlined, not loaded
    text = html.read_text(encoding="utf-8")
    for fig in expected:
        assert f'id="fig-{fig}"' in text
    assert text.count("plotly.js v") == 1  # the library once, not once per figure

    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(f"{f}.png" for f in expected)
    for name in pngs:
        with Image.open(out / name) as im:
            im.verify()
        with Image.open(out / name) as im:
            assert im.format == "PNG" and 600 <= im.width <= 2000 and 300 <= im.height <= 1500, (name, im.size)

    md = (out / "summary.md").read_text(encoding="utf-8")
    for name in pngs:
        assert f"]({name})" in md
    assert "| scratch-a | scratch | mnist | 0.7400 | 0.7300 | 8 | 25% | 40.0 |" in md
    assert "| zoo-b | zoo | mnist | 0.7400 | - | 8 | 25% | 200.0 |" in md
    assert not list(tmp_path.glob(".rep.tmp*"))  # built aside, moved in
    # The terminal's summary table.
    assert "scratch-a" in r.out and "zoo-b" in r.out and "40.0" in r.out and "200.0" in r.out
    assert r.out.rstrip().endswith("wrote rep/index.html, rep/summary.md and 11 PNG figures")


def test_one_study_has_no_strategy_vs_cost_figure(run_cli: Any, tmp_path: Path) -> None:
    make_study("solo", "scratch")
    make_study("other", "zoo", dataset="cifar10")  # another dataset: not compared with "solo"
    r = run_cli("report", "solo", "other", "--storage", STORAGE, "--out", "rep")
    assert r.code == 0, r
    assert _parse(tmp_path / "rep" / "index.html").figures == [f"{s}-{f}" for s in ("solo", "other") for f in FIGURES]


def test_cost_curve_and_strategy_row() -> None:
    study = make_study("c", "scratch", n=5, test=True)
    points = cost_curve(study)
    # Trials 0..4; trial 3 pruned after one epoch (2 s), the others 3 epochs (6 s).
    assert [p.seconds for p in points] == [6.0, 12.0, 18.0, 20.0, 26.0]
    assert [p.best_val for p in points] == pytest.approx([0.50, 0.54, 0.58, 0.58, 0.66])
    assert [p.test for p in points] == pytest.approx([0.49, 0.53, 0.57, 0.57, 0.65])
    row = strategy_row(study)
    assert (row.trials, row.pruned_share, row.compute_seconds) == (5, 0.2, 26.0)
    assert row.best_val == pytest.approx(0.66) and row.best_test == pytest.approx(0.65)


def test_report_with_no_complete_trial_says_what_is_missing(run_cli: Any, tmp_path: Path) -> None:
    optuna.create_study(study_name="empty", storage=STORAGE)
    r = run_cli("report", "empty", "--storage", STORAGE, "--out", "rep")
    assert r.code == 0, r
    assert [line for line in r.out.splitlines() if line.startswith("not drawn")] == [
        f"not drawn: empty-{f}: no complete trials" for f in FIGURES]
    assert (tmp_path / "rep" / "index.html").is_file()


@pytest.mark.parametrize(("args", "message"), [
    (["nope"], "error: study 'nope' does not exist in this storage; studies: a"),
    (["a", "a"], "error: NAME: 'a' is given twice; name each study once"),
    (["a", "--out", "file.txt"], "error: --out: 'file.txt' is a file; give a folder (created when missing)"),
])
def test_report_bad_input(run_cli: Any, tmp_path: Path, args: list[str], message: str) -> None:
    make_study("a", "scratch", n=2)
    (tmp_path / "file.txt").write_text("x")
    full = ["report", *args, "--storage", STORAGE] + ([] if "--out" in args else ["--out", "rep"])
    r = run_cli(*full)
    assert (r.code, r.err.strip()) == (2, message)
    assert not (tmp_path / "rep").exists()

