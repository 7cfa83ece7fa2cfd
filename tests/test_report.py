"""``hpsearch report``: a self-contained HTML file with every figure, PNGs, summary.md, the strategy-vs-cost view."""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import re
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
               speed: float = 1.0, offset: float = 0.0, shift: int = 0) -> optuna.Study:
    """A finished study as hpsearch leaves one (curves, seconds per epoch, strategy/dataset), without training.
    ``offset`` moves every accuracy, ``shift`` which trial gets which parameters: two studies with different ones
    share no value, and their figures differ."""
    study = optuna.create_study(study_name=name, storage=STORAGE, direction="maximize")
    study.set_user_attr("strategy", strategy)
    study.set_user_attr("dataset", dataset)
    dists = {"lr": FloatDistribution(1e-4, 1e-1, log=True), "layers": IntDistribution(1, 4),
             "opt": CategoricalDistribution(["sgd", "adam"])}
    for i in range(n):
        pruned = i % 4 == 3
        curve = [0.5 + offset + 0.04 * i * (e + 1) / 3 for e in range(1 if pruned else 3)]
        attrs: dict[str, Any] = {"seconds_per_epoch": 2.0 * speed, "param_count": 1000 + i}
        if test and not pruned:  # as `hpsearch evaluate` stores it: on the study, by trial number
            acc = curve[-1] - 0.01
            study.set_user_attr(attr_key(i), {"epochs": 3, "runs": [{"test_accuracy": acc}], "mean": acc, "std": 0.0})
        study.add_trial(create_trial(
            state=TrialState.PRUNED if pruned else TrialState.COMPLETE, value=None if pruned else max(curve),
            params={"lr": 10 ** (-3 + ((i + shift) % 3)), "layers": 1 + (i + 2 * shift) % 4,
                    "opt": ["sgd", "adam"][(i + shift) % 2]},
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


def _decoded(value: Any) -> Any:
    """Plotly's JSON with its typed arrays (``{"dtype": "f8", "bdata": BASE64}``, for numpy arrays) as lists."""
    if isinstance(value, dict):
        if "bdata" in value and "dtype" in value:
            import numpy as np

            return np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"])).tolist()
        return {k: _decoded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decoded(v) for v in value]
    return value


def _traces(text: str, fig_id: str) -> list[dict[str, Any]]:
    """The traces the report's HTML draws in figure ``fig_id``: the data of its ``Plotly.newPlot`` call."""
    call = re.search(r'Plotly\.newPlot\(\s*"fig-' + re.escape(fig_id) + r'",\s*', text)
    assert call is not None, f"no Plotly.newPlot call for {fig_id}"
    data, _ = json.JSONDecoder().raw_decode(text, call.end())
    return _decoded(data)


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in _leaves(v)]
    if isinstance(value, list):
        return [x for v in value for x in _leaves(v)]
    return [value]


def _numbers(traces: list[dict[str, Any]]) -> set[float]:
    """Every number the traces hold, as data or as text (the parallel-coordinates lines carry theirs as hover text)."""
    found = set()
    for v in _leaves(traces):
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                continue
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            found.add(round(float(v), 6))
    return found


def _values(study: optuna.Study) -> set[float]:
    return {round(t.value, 6) for t in study.get_trials(states=(TrialState.COMPLETE,)) if t.value is not None}


def _curves(study: optuna.Study) -> set[float]:
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    return {round(v, 6) for t in complete for v in t.intermediate_values.values()}


def _check_figures_show_their_study(text: str, study: optuna.Study, other: optuna.Study) -> None:
    """Each of ``study``'s figures draws ``study``'s trials, and nothing of ``other`` (the two share no value)."""
    name = study.study_name
    drawn = {f: _numbers(_traces(text, f"{name}-{f}")) for f in FIGURES}
    # (Parallel coordinates and slices also hold 0..1 coordinates and colour-scale stops, which may meet the other
    # study's values: only their own values are looked for.)
    for fig, own, theirs in [("history", _values(study), _values(other)),
                             ("intermediate", _curves(study), _curves(other)),
                             ("parallel", _values(study), set()),
                             ("slice", _values(study), set())]:
        assert own <= drawn[fig], f"{name}-{fig} lacks its study's values {sorted(own - drawn[fig])}"
        assert not theirs & drawn[fig], f"{name}-{fig} draws {other.study_name}'s values {sorted(theirs & drawn[fig])}"
    importances = optuna.importance.get_param_importances(study)
    bars = _traces(text, f"{name}-importances")
    assert {"lr", "layers", "opt"} <= set(_leaves(bars)), f"{name}-importances names no parameter"
    assert {round(v, 6) for v in importances.values()} <= drawn["importances"], \
        f"{name}-importances does not draw its study's importances {importances}"


def _check_summary_tables(md: str, study: optuna.Study, tested: dict[int, float]) -> None:
    """summary.md's top-trials table of ``study``: its complete trials, best first, with their own numbers."""
    ranked = sorted(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: (-(t.value or 0.0), t.number))
    rows = [f"| {rank} | {t.number} | {t.value:.4f} | "
            + (f"{tested[t.number]:.4f}" if t.number in tested else "-")
            + f" | {len(t.intermediate_values)} | {t.user_attrs['seconds_per_epoch']:.2f} | "
              f"{t.user_attrs['param_count']} |" for rank, t in enumerate(ranked, 1)]
    section = md.split(f"## Study {study.study_name}\n", 1)[1].split("\n## ", 1)[0]
    lines = section.splitlines()
    start = lines.index(rows[0]) if rows[0] in lines else -1
    assert lines[start:start + len(rows)] == rows, f"{study.study_name}: top trials in summary.md:\n{section}"


def test_report_of_two_studies_is_self_contained_with_every_figure(run_cli: Any, tmp_path: Path) -> None:
    a = make_study("scratch-a", "scratch", test=True)
    b = make_study("zoo-b", "zoo", speed=5.0, offset=0.005, shift=1)  # no value, and no figure, in common with a's
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
    # What the figures draw: each study's own trials; the cost view, each study's best-so-far line.
    _check_figures_show_their_study(text, a, b)
    _check_figures_show_their_study(text, b, a)
    lines = {t.get("name"): t for t in _traces(text, "strategy-vs-cost-mnist")}
    assert sorted(lines) == ["scratch-a (test)", "scratch-a (val)", "zoo-b (val)"]
    for study in (a, b):
        line = lines[f"{study.study_name} (val)"]
        points = cost_curve(study)
        assert line["x"] == pytest.approx([p.seconds for p in points])
        assert line["y"] == pytest.approx([p.best_val for p in points])
    assert lines["scratch-a (test)"]["y"] == pytest.approx([p.test for p in cost_curve(a)])

    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(f"{f}.png" for f in expected)
    for name in pngs:
        with Image.open(out / name) as im:
            im.verify()
        with Image.open(out / name) as im:
            assert im.format == "PNG" and 600 <= im.width <= 2000 and 300 <= im.height <= 1500, (name, im.size)
    # The two studies' PNGs differ (an empty plot, or one study's drawn twice, would give the same picture).
    for fig in FIGURES:
        with Image.open(out / f"scratch-a-{fig}.png") as one, Image.open(out / f"zoo-b-{fig}.png") as two:
            assert one.convert("RGB").tobytes() != two.convert("RGB").tobytes(), f"{fig}: the same picture twice"

    md = (out / "summary.md").read_text(encoding="utf-8")
    for name in pngs:
        assert f"]({name})" in md
    assert "| scratch-a | scratch | mnist | 0.7400 | 0.7300 | 8 | 25% | 40.0 |" in md
    assert "| zoo-b | zoo | mnist | 0.7450 | - | 8 | 25% | 200.0 |" in md
    assert f"{a.best_value:.4f}" == "0.7400" and f"{b.best_value:.4f}" == "0.7450"  # the studies' own best
    _check_summary_tables(md, a, {t.number: t.value - 0.01 for t in a.get_trials(states=(TrialState.COMPLETE,))
                                  if t.value is not None})
    _check_summary_tables(md, b, {})
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

