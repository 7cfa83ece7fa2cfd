"""What ``hpsearch run`` shows: a live status line while trials train, one line per finished trial, and
the closing summary. Plain lines (no cursor tricks) when the output is not a terminal."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from hpsearch.study import VAL_IMAGES_ATTR, target_status
from hpsearch.trials import (
    ENDINGS,
    STOP_REASONS,
    WAITED_ATTR,
    ending,
    is_rejected,
    late_promotion,
    ranked,
    refused_for_cost,
)

STATE_STYLE = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red", "RUNNING": "cyan", "WAITING": "dim"}


class RunDisplay:
    def __init__(self, console: Console, study: optuna.Study, target: int | None) -> None:
        self.console = console
        self.study = study
        self.target = target
        self.live = Live(Text(""), console=console, transient=True, auto_refresh=False)
        self.seconds: defaultdict[str, float] = defaultdict(float)  # this run's trial seconds by ending

    def __enter__(self) -> RunDisplay:
        if self.console.is_terminal:
            self.live.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.live.stop()

    def epoch(self, trial: int, epoch: int, epochs: int, value: float) -> None:
        if self.console.is_terminal:
            self.live.update(Text(f"trial {trial}  epoch {epoch + 1}/{epochs}  val acc {value:.4f}"), refresh=True)

    def trial_end(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.datetime_start and trial.datetime_complete:
            self.seconds[ending(trial)] += (trial.datetime_complete - trial.datetime_start).total_seconds()
        trials = study.get_trials(deepcopy=False)
        rejected = sum(t.state == TrialState.PRUNED and "rejected" in t.user_attrs for t in trials)
        finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) - rejected
        pruned = sum(t.state == TrialState.PRUNED for t in trials) - rejected
        best = _best_value(study)
        value = "" if trial.value is None else f"{trial.value:.4f}"
        if trial.state == TrialState.PRUNED:
            why = next((trial.user_attrs[k] for k in STOP_REASONS if k in trial.user_attrs), None)
            epochs = len(trial.intermediate_values)
            if why is None and "rung" in trial.user_attrs:  # successive halving on rungs (objective.stages)
                waited = trial.user_attrs.get(WAITED_ATTR)
                why = f"not promoted after rung {trial.user_attrs['rung']}" + (f": {waited}" if waited else "")
            value = f"{why}" if why else f"after {epochs} epoch{'s' * (epochs != 1)}"
        elif trial.state == TrialState.FAIL:
            value = trial.user_attrs.get("error", "")
        if (late := late_promotion(trial)) is not None:
            value += f" (trial {late['trial']} promoted late from rung {late['rung']})"
        total = f"/{self.target}" if self.target else ""
        state = trial.state.name
        line = Text.assemble(
            (f"trial {trial.number:>4} ", "bold"), (f"{state:<8}", STATE_STYLE.get(state, "")), f" {value}",
            (f"   finished {finished}{total}, pruned {pruned}, rejected {rejected}, best {best}", "dim"),
        )
        self.console.print(line, soft_wrap=True)


    def budget_line(self, wall_seconds: float) -> str:
        """How this run's time went: seconds (and share of the run) per way its trials ended."""
        wall = max(wall_seconds, 1e-9)
        parts = [f"{self.seconds[k]:.0f} s {k} ({self.seconds[k] / wall:.0%})" for k in ENDINGS if self.seconds[k]]
        rest = max(0.0, wall_seconds - sum(self.seconds.values()))
        parts.append(f"{rest:.0f} s outside trials ({rest / wall:.0%})")
        return f"time: {wall_seconds:.0f} s in all: " + ", ".join(parts)


class TrainingProgress:
    """Per-epoch progress of the long retrainings of ``evaluate`` and ``reproduce``: a live line on a terminal, one
    plain line per epoch otherwise (logs of Kubernetes, CI), with the time spent and the time left to this training
    (its mean epoch so far times the epochs to go)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live = Live(Text(""), console=console, transient=True, auto_refresh=False)

    def __enter__(self) -> TrainingProgress:
        if self.console.is_terminal:
            self.live.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.live.stop()

    def epoch(self, what: str, epoch: int, epochs: int, elapsed: float) -> None:
        """``what`` (``trial 3 seed 1/3``) finished epoch ``epoch`` (from 0) of ``epochs``, ``elapsed`` s in."""
        left = elapsed / (epoch + 1) * (epochs - epoch - 1)
        line = f"{what}  epoch {epoch + 1}/{epochs}  {clock(elapsed)} elapsed, ~{clock(left)} left"
        if self.console.is_terminal:
            self.live.update(Text(line), refresh=True)
        else:
            self.console.print(line, soft_wrap=True)


def clock(seconds: float) -> str:
    """``1:02:03`` / ``2:03``."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _best_value(study: optuna.Study) -> str:
    try:
        return f"{study.best_value:.4f}"
    except ValueError:  # no complete trial yet
        return "-"


def lead(best: FrozenTrial, runner_up: FrozenTrial, val_images: Any) -> str:
    """How far the best complete trial is ahead of the next, against the noise of a validation accuracy measured on
    ``val_images`` images (one standard error: sqrt(p (1 - p) / n)); a lead under it is a coin toss between the two."""
    margin = (best.value or 0.0) - (runner_up.value or 0.0)
    text = f"{margin:+.4f} over trial {runner_up.number} ({runner_up.value:.4f})"
    if not isinstance(val_images, int) or val_images < 1:  # a study run before hpsearch recorded it
        return text
    p = best.value or 0.0
    error = math.sqrt(p * (1 - p) / val_images)
    if error == 0.0:
        return text
    verdict = "within validation noise: the two may swap" if margin < error else "beyond one standard error"
    return (f"{text}: {margin / error:.1f} standard errors of a validation accuracy ({error:.4f} on {val_images:,} "
            f"images), {verdict}")


def summary_table(study: optuna.Study) -> Table:
    trials = study.get_trials(deepcopy=False)
    counts = {s.name: sum(t.state == s for t in trials) for s in TrialState}
    table = Table(title=f"study {study.study_name}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("trials", ", ".join(f"{n.lower()} {c}" for n, c in counts.items() if c) or "none")
    rejected = [t for t in trials if is_rejected(t)]
    if rejected:  # pruned before training: they cost no epochs and do not count toward n_trials
        over_cap = sum(refused_for_cost(t) for t in rejected)
        copies = sum(not refused_for_cost(t) and late_promotion(t) is not None for t in rejected)
        kinds = [f"{n} {what}" for n, what in ((len(rejected) - over_cap - copies, "architecture shrinks below 1x1"),
                                               (over_cap, "over a cost cap"),
                                               (copies, "a late promotion queued twice")) if n]
        table.add_row("rejected", f"{len(rejected)} of the pruned ({', '.join(kinds)}; not counted)")
    target = target_status(study)
    if target is not None:
        table.add_row("target", target)
    complete = ranked(study)
    if not complete:
        table.add_row("best", "no complete trial yet")
        return table
    best = complete[0]
    table.add_row("best value", f"{best.value:.4f} (trial {best.number}, val accuracy)")
    if len(complete) > 1:
        table.add_row("lead", lead(best, complete[1], study.user_attrs.get(VAL_IMAGES_ATTR)))
    for key, value in best.params.items():
        table.add_row(f"  {key}", str(value))
    return table
