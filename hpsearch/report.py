"""Reports on finished searches: ``DIR/index.html`` (self-contained: plotly.js inlined, opens offline), the same
figures as PNG files (Optuna's matplotlib backend) and ``DIR/summary.md`` embedding them.

Per study: optimisation history, parameter importances (PED-ANOVA, Optuna's default: numpy only), parallel
coordinates, intermediate values of the top trials, slice plots of the most important parameters, the top-10
table. Several studies on one dataset add the strategy-vs-cost view: best validation accuracy so far (and the
test accuracy of that trial where ``hpsearch evaluate`` stored ``test_accuracy_mean``) against cumulative training
seconds, one line per study, and a table per strategy.

Needs no torch: it reads only the storage.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpsearch import results
from hpsearch.study import target_status
from hpsearch.trials import best_first, counts_toward_n_trials, is_rejected, ranked

TOP = 10  # rows of the top-trials table
TOP_CURVES = 10  # trials whose intermediate values are drawn
TOP_PARAMS = 4  # parameters with a slice plot
PARALLEL_PARAMS = 6  # axes of the parallel-coordinates plot: with every parameter (20+) it is unreadable


@dataclass(frozen=True)
class CostPoint:
    seconds: float  # cumulative training seconds after this trial
    best_val: float | None  # best validation accuracy among complete trials so far
    test: float | None  # test accuracy of that best trial, where evaluated


@dataclass(frozen=True)
class StrategyRow:
    study: str
    strategy: str
    dataset: str
    best_val: float | None
    best_test: float | None
    trials: int  # finished trials that count toward n_trials: complete + pruned after training
    pruned_share: float  # of those, the share pruned
    compute_seconds: float


@dataclass
class Report:
    out: Path
    figures: list[str] = field(default_factory=list)  # ids of the HTML figures
    pngs: list[Path] = field(default_factory=list)
    rows: list[StrategyRow] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # "figure: why it is absent"


def training_seconds(t: FrozenTrial) -> float:
    """Seconds a trial trained: its epochs times its mean epoch time; else its wall time (rejected trials: 0)."""
    spe = t.user_attrs.get("seconds_per_epoch")
    if isinstance(spe, int | float):
        return float(spe) * len(t.intermediate_values)
    if t.datetime_start and t.datetime_complete:
        return (t.datetime_complete - t.datetime_start).total_seconds()
    return 0.0


def test_means(study: optuna.Study) -> dict[int, float]:
    """Mean test accuracy of the trials ``hpsearch evaluate`` measured, by trial number."""
    return {n: float(r["mean"]) for n, r in results.stored(study).items() if r.get("runs")}


def cost_curve(study: optuna.Study) -> list[CostPoint]:
    """Best-so-far accuracy against cumulative training seconds, in the order trials finished."""
    tested = test_means(study)
    finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished() and t.datetime_complete]
    finished.sort(key=lambda t: (t.datetime_complete, t.number))
    points: list[CostPoint] = []
    total, best, best_value = 0.0, None, float("-inf")
    for t in finished:
        total += training_seconds(t)
        if t.state == TrialState.COMPLETE and t.value is not None and t.value > best_value:
            best, best_value = t, t.value
        points.append(CostPoint(seconds=total, best_val=None if best is None else best_value,
                                test=None if best is None else tested.get(best.number)))
    return points


def strategy_row(study: optuna.Study) -> StrategyRow:
    """The study's line of the strategy table. Trials refused before training (``hpsearch.trials.is_rejected``)
    are neither finished nor pruned here, as in the budget line: they never trained."""
    every = study.get_trials(deepcopy=False)
    best = best_first(every)
    pruned = sum(t.state == TrialState.PRUNED and not is_rejected(t) for t in every)
    finished = sum(counts_toward_n_trials(t) for t in every)
    tested = test_means(study)
    tests = [tested[t.number] for t in best if t.number in tested]
    return StrategyRow(
        study=study.study_name, strategy=str(study.user_attrs.get("strategy", "-")),
        dataset=str(study.user_attrs.get("dataset", "-")), best_val=best[0].value if best else None,
        best_test=max(tests) if tests else None, trials=finished,
        pruned_share=pruned / finished if finished else 0.0,
        compute_seconds=sum(training_seconds(t) for t in every if t.state.is_finished()))


def top_trials(study: optuna.Study, k: int) -> list[FrozenTrial]:
    return ranked(study)[:k]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "study"


def _top_study(study: optuna.Study, k: int) -> optuna.Study:
    """An in-memory study holding only the top ``k`` trials, for Optuna's plots that draw every trial."""
    sub = optuna.create_study(direction="maximize")
    sub.add_trials(top_trials(study, k))
    return sub


def _important_params(study: optuna.Study, k: int) -> list[str]:
    importances = optuna.importance.get_param_importances(study)
    return list(importances)[:k]


# One figure: (id, title, plotly builder, matplotlib builder); a builder raising means "not available here".
Builder = Callable[[], Any]


def _figures(study: optuna.Study) -> list[tuple[str, str, Builder, Builder]]:
    from optuna import visualization as vis
    from optuna.visualization import matplotlib as vm

    slug = _slug(study.study_name)

    def slice_params() -> list[str]:
        return _important_params(study, TOP_PARAMS)

    def parallel_params() -> list[str]:
        return _important_params(study, PARALLEL_PARAMS)

    return [
        (f"{slug}-history", "optimisation history",
         lambda: vis.plot_optimization_history(study), lambda: vm.plot_optimization_history(study)),
        (f"{slug}-importances", "parameter importances (PED-ANOVA)",
         lambda: vis.plot_param_importances(study), lambda: vm.plot_param_importances(study)),
        (f"{slug}-parallel", f"parallel coordinates of the {PARALLEL_PARAMS} most important parameters",
         lambda: vis.plot_parallel_coordinate(study, params=parallel_params()),
         lambda: vm.plot_parallel_coordinate(study, params=parallel_params())),
        (f"{slug}-intermediate", f"validation accuracy per epoch, top {TOP_CURVES} trials",
         lambda: vis.plot_intermediate_values(_top_study(study, TOP_CURVES)),
         lambda: vm.plot_intermediate_values(_top_study(study, TOP_CURVES))),
        (f"{slug}-slice", f"slice plots of the {TOP_PARAMS} most important parameters",
         lambda: vis.plot_slice(study, params=slice_params()), lambda: vm.plot_slice(study, params=slice_params())),
    ]


def _cost_plotly(curves: dict[str, list[CostPoint]], dataset: str) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, points in curves.items():
        fig.add_trace(go.Scatter(x=[p.seconds for p in points], y=[p.best_val for p in points], mode="lines+markers",
                                 name=f"{name} (val)", line={"shape": "hv"}))
        if any(p.test is not None for p in points):
            fig.add_trace(go.Scatter(x=[p.seconds for p in points], y=[p.test for p in points], mode="lines+markers",
                                     name=f"{name} (test)", line={"shape": "hv", "dash": "dash"}))
    fig.update_layout(title=f"Strategy vs cost on {dataset}: best accuracy so far",
                      xaxis_title="cumulative training seconds", yaxis_title="accuracy")
    values = [v for ps in curves.values() for p in ps for v in (p.best_val, p.test) if v is not None]
    if values:  # plotly would centre a flat line in 0..2; accuracies live in 0..1
        fig.update_yaxes(range=[max(0.0, min(values) - 0.05), min(1.0, max(values)) + 0.02])
    return fig


def _cost_matplotlib(curves: dict[str, list[CostPoint]], dataset: str) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.add_subplot()
    for name, points in curves.items():
        xs = [p.seconds for p in points]
        line = ax.step(xs, [float("nan") if p.best_val is None else p.best_val for p in points], where="post",
                       marker="o", markersize=3, label=f"{name} (val)")[0]
        if any(p.test is not None for p in points):
            ax.step(xs, [float("nan") if p.test is None else p.test for p in points], where="post", linestyle="--",
                    color=line.get_color(), label=f"{name} (test)")
    ax.set_xlabel("cumulative training seconds")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Strategy vs cost on {dataset}: best accuracy so far")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _save_png(obj: Any, path: Path) -> None:
    """Optuna's matplotlib plots return an Axes (or an array of them); ours return a Figure."""
    import numpy as np
    from matplotlib import pyplot as plt
    from matplotlib.figure import Figure

    if isinstance(obj, Figure):
        fig = obj
    else:
        if isinstance(obj, np.ndarray):  # slice plots: Optuna sized the grid and placed its colour bar
            fig = obj.flat[0].get_figure()
        else:
            fig = obj.get_figure()
            fig.set_size_inches(max(fig.get_size_inches()[0], 8), max(fig.get_size_inches()[1], 4.5))
            fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    if not isinstance(obj, Figure):
        plt.close(fig)  # pyplot keeps every figure it made alive until closed


def _fmt(v: float | None, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _trial_table(study: optuna.Study) -> tuple[list[str], list[list[str]]]:
    head = ["rank", "trial", "val acc", "test acc", "epochs", "s/epoch", "params"]
    tested = test_means(study)
    rows = []
    for i, t in enumerate(top_trials(study, TOP), 1):
        spe = t.user_attrs.get("seconds_per_epoch")
        rows.append([str(i), str(t.number), _fmt(t.value), _fmt(tested.get(t.number)),
                     str(len(t.intermediate_values)), _fmt(spe, 2) if isinstance(spe, int | float) else "-",
                     f"{t.user_attrs.get('param_count', '-')}"])
    return head, rows


def strategy_table(rows: list[StrategyRow]) -> tuple[list[str], list[list[str]]]:
    head = ["study", "strategy", "dataset", "best val", "best test", "trials", "pruned", "compute (s)"]
    return head, [[r.study, r.strategy, r.dataset, _fmt(r.best_val), _fmt(r.best_test), str(r.trials),
                   f"{r.pruned_share:.0%}", f"{r.compute_seconds:.1f}"] for r in rows]


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


_STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}.missing{color:#a33}h2{border-bottom:1px solid #ddd;margin-top:2em}"""


def write_report(studies: list[optuna.Study], out: Path) -> Report:
    """Writes the report of ``studies`` into ``out`` (created; files of an earlier report are replaced).

    Built in a sibling temporary folder and moved in at the end: a failure leaves no half-written report."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; Optuna's matplotlib plots go through pyplot
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the in-memory top-trials studies would log creation
    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        report = _build(studies, tmp)
        out.mkdir(parents=True, exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report.out = out
    report.pngs = [out / p.name for p in report.pngs]
    return report


def _build(studies: list[optuna.Study], out: Path) -> Report:
    page = _Page(Report(out=out))
    page.report.rows = [strategy_row(s) for s in studies]
    by_dataset: dict[str, list[optuna.Study]] = {}
    for s in studies:
        by_dataset.setdefault(str(s.user_attrs.get("dataset", "-")), []).append(s)
    # Cross-study view first: it answers the question the project was born from.
    for dataset, group in by_dataset.items():
        if len(group) >= 2:
            _strategy_section(page, dataset, group)
    for s in studies:
        _study_section(page, s, next(r for r in page.report.rows if r.study == s.study_name))
    page.write(", ".join(s.study_name for s in studies))
    return page.report


class _Page:
    """The report being written into ``report.out``: the HTML sections and Markdown lines so far, and each figure
    added as an HTML div (plotly.js, 3.5 MB, inlined once, with the first) and a PNG."""

    def __init__(self, report: Report) -> None:
        self.report = report
        self.sections: list[str] = []
        self.md: list[str] = ["# hpsearch report", ""]
        self.first_plot = True

    def figure(self, fig_id: str, title: str, plotly_fig: Builder, mpl_fig: Builder) -> tuple[str, str]:
        """(HTML, Markdown) of one figure, or of a line saying why it is not available."""
        with warnings.catch_warnings():
            # Optuna's matplotlib backend is "experimental"; plots warn about trials they leave out.
            warnings.simplefilter("ignore")
            try:
                fig = plotly_fig()
            except Exception as e:
                self.report.missing.append(f"{fig_id}: {type(e).__name__}: {e}")
                return (f'<p class="missing">{html.escape(title)}: not available ({html.escape(str(e))})</p>',
                        f"*{title}: not available ({e})*")
            div = fig.to_html(full_html=False, include_plotlyjs=self.first_plot, div_id=f"fig-{fig_id}",
                              default_height="480px")
            self.first_plot = False
            self.report.figures.append(fig_id)
            md_img = self._png(fig_id, title, mpl_fig)
        return f'<h3>{html.escape(title)}</h3><div class="figure" data-figure="{fig_id}">{div}</div>', md_img

    def _png(self, fig_id: str, title: str, mpl_fig: Builder) -> str:
        """Saves the figure's PNG; returns its Markdown image, or the line saying why there is none."""
        png = self.report.out / f"{fig_id}.png"
        try:
            _save_png(mpl_fig(), png)
        except Exception as e:
            self.report.missing.append(f"{fig_id}.png: {type(e).__name__}: {e}")
            return f"*{title}: no PNG ({e})*"
        self.report.pngs.append(png)
        return f"![{title}]({png.name})"

    def write(self, names: str) -> None:
        """Writes ``index.html`` and ``summary.md``."""
        doc = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>hpsearch report: '
               f"{html.escape(names)}</title><style>{_STYLE}</style></head><body><h1>hpsearch report</h1>"
               f"<p>Studies: {html.escape(names)}</p>{''.join(self.sections)}"
               f'<script type="application/json" id="report-meta">{json.dumps({"figures": self.report.figures})}'
               "</script></body></html>")
        (self.report.out / "index.html").write_text(doc, encoding="utf-8")
        (self.report.out / "summary.md").write_text("\n".join(self.md) + "\n", encoding="utf-8")


def _strategy_section(page: _Page, dataset: str, group: list[optuna.Study]) -> None:
    """Several studies on one dataset: their best accuracy against training seconds, and the strategy table."""
    curves = {s.study_name: cost_curve(s) for s in group}
    fig_id = f"strategy-vs-cost-{_slug(dataset)}"
    h, m = page.figure(fig_id, f"strategy vs cost on {dataset}", partial(_cost_plotly, curves, dataset),
                       partial(_cost_matplotlib, curves, dataset))
    head, rows = strategy_table([r for r in page.report.rows if r.dataset == dataset])
    page.sections.append(f"<h2>Strategy vs cost: {html.escape(dataset)}</h2>{h}{_html_table(head, rows)}")
    page.md += [f"## Strategy vs cost: {dataset}", "", m, "", _md_table(head, rows), ""]


def _study_section(page: _Page, s: optuna.Study, row: StrategyRow) -> None:
    """One study: its summary line, target, top-trials table and Optuna's figures."""
    summary = (f"{row.strategy} on {row.dataset}: {row.trials} finished trials ({row.pruned_share:.0%} pruned), "
               f"best val accuracy {_fmt(row.best_val)}, {row.compute_seconds:.1f} s of training")
    parts = [f"<h2>Study {html.escape(s.study_name)}</h2>", f"<p>{html.escape(summary)}</p>"]
    page.md += [f"## Study {s.study_name}", "", summary, ""]
    target = target_status(s)
    if target is not None:
        parts.append(f"<p>target: {html.escape(target)}</p>")
        page.md += [f"target: {target}", ""]
    head, rows = _trial_table(s)
    parts.append(f"<h3>top {TOP} trials</h3>" + _html_table(head, rows))
    page.md += [f"### Top {TOP} trials", "", _md_table(head, rows), ""]
    for fig_id, title, pf, mf in _figures(s):
        if not top_trials(s, 1):  # Optuna would draw empty axes, with a logged warning each
            page.report.missing.append(f"{fig_id}: no complete trials")
            h = f'<p class="missing">{html.escape(title)}: no complete trials</p>'
            m = f"*{title}: no complete trials*"
        else:
            h, m = page.figure(fig_id, title, pf, mf)
        parts.append(h)
        page.md += [f"### {title}", "", m, ""]
    page.sections.append("".join(parts))
