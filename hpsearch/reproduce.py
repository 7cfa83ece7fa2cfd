"""``hpsearch reproduce``: a report table (studies/report/*.toml) run, every row tested, and printed next to the
report's numbers.

The study replays its [[enqueue]] rows (sampler "enqueued", no pruning) through the run session; each complete row
is then retrained on train+val for its full budget and tested by ``hpsearch.evaluate`` (``--epochs max``: the report
trained fixed budgets), as ``run_and_test`` does. A run with a changed budget or dataset is a different study (its
name says what changed) and its table says it was scaled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from hpsearch._display import TrainingProgress
from hpsearch._errors import HpsearchError, SpecError
from hpsearch._paths import default_cache_dir, default_data_dir
from hpsearch.session import Consoles, RunOptions, epoch_line, run_study
from hpsearch.spec import StudySpec, spec_from_dict
from hpsearch.storage import open_storage
from hpsearch.study import load_existing

# What substitutes for torchvision's ImageNet ResNet18 where it cannot be downloaded (see ../shared/tools).
SUBSTITUTE_HINT = ("ImageNet ResNet18 weights cannot be had offline: pass --weights FILE --backbone resnet50 "
                   "(a ResNet50 state_dict, e.g. made by ../shared/tools/imagenet_resnet50.py)")


@dataclass(frozen=True)
class Changes:
    """What a reproduce run changes in the report's study (all None: the report's own budget)."""

    epochs_scale: float | None = None
    train_fraction: float | None = None
    dataset: str | None = None
    weights: str | None = None
    backbone: str | None = None

    def scaled(self) -> bool:
        return self.epochs_scale not in (None, 1.0) or self.train_fraction is not None


def check(changes: Changes, spec: StudySpec) -> None:
    scale = changes.epochs_scale
    if scale is not None and not (math.isfinite(scale) and 0 < scale <= 10):
        raise SpecError(f"--epochs-scale {changes.epochs_scale:g}: must be a number with 0 < F <= 10")
    if changes.train_fraction is not None and not 0 < changes.train_fraction <= 1:
        raise SpecError(f"--train-fraction {changes.train_fraction:g}: must be a number with 0 < F <= 1")
    if (changes.weights or changes.backbone) and spec.strategy != "finetune":
        raise SpecError(f"--weights/--backbone: only for fine-tuning tables; {spec.name!r} is a {spec.strategy} study")
    if spec.sampler.get("type") != "enqueued":
        raise SpecError(f"{spec.name!r}: reproduce runs report tables (sampler \"enqueued\", studies/report/*.toml)")


def prepare(spec: StudySpec, changes: Changes) -> StudySpec:
    """The report's study with ``changes`` applied, renamed when anything changed (a separate study)."""
    check(changes, spec)
    data = spec.to_dict()
    tags = []
    if changes.epochs_scale not in (None, 1.0):
        assert changes.epochs_scale is not None
        data["epochs"] = max(1, round(spec.epochs * changes.epochs_scale))
        tags.append(f"epochs={data['epochs']}")
    if changes.train_fraction is not None:
        data["train_fraction"] = changes.train_fraction
        tags.append(f"train={changes.train_fraction:g}")
    if changes.dataset is not None:
        data["dataset"] = changes.dataset
        tags.append(f"dataset={changes.dataset}")
    for key, value in (("weights", changes.weights), ("backbone", changes.backbone)):
        if value is not None:
            data["space"][key] = value
            for row in data["enqueue"]:
                if key in row:
                    row[key] = value
            tags.append(f"{key}={Path(value).name}")
    if tags:
        data["name"] = f"{spec.name}@{','.join(tags)}"
    return spec_from_dict(data, where=f"{spec.name} ({', '.join(tags)})" if tags else spec.name)


def run_and_test(spec: StudySpec, options: RunOptions, *, seeds: int, weights_given: bool,
                 say: Consoles) -> tuple[optuna.Study, list[Any]]:
    """Runs the table's study (``run_study``), then tests every complete row: ``seeds`` retrainings on train+val for
    its full budget. Returns the study and ``hpsearch.evaluate``'s rows."""
    from hpsearch import evaluate as final
    from hpsearch.devices import resolve_device

    try:
        run_study(spec, options, say)
    except HpsearchError as e:
        if spec.strategy == "finetune" and not weights_given and "weights" in str(e).lower():
            raise HpsearchError(f"{e}; {SUBSTITUTE_HINT}") from None
        raise
    study = load_existing(open_storage(options.storage, create=False), spec.name)
    dev = resolve_device(options.device)

    def progress(trial: int, index: int, total: int, accuracy: float) -> None:
        say.out.print(f"trial {trial:>4} test run {index + 1}/{total}  test acc {accuracy:.4f}")

    with TrainingProgress(say.out) as display:
        rows = final.evaluate_study(study, spec, top=len(spec.enqueue), seeds=seeds, epochs="max",
                                    data_dir=options.data_dir or default_data_dir(),
                                    cache_dir=options.cache_dir or default_cache_dir(), device=dev,
                                    progress=progress, epoch_progress=epoch_line(display, "test run"))
    return study, rows


@dataclass(frozen=True)
class Line:
    label: str
    paper: float | None
    ours: float | None  # mean test accuracy
    std: float | None
    seeds: int
    seconds: float | None  # training seconds of one run (one seed)
    note: str  # why there is no number, or what went wrong in training


def compare(study: optuna.Study, rows: list[Any]) -> list[Line]:
    """One line per [[enqueue]] row, in the file's order; ``rows``: ``hpsearch.evaluate`` results."""
    tested = {r.number: r for r in rows}
    lines = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        label = t.user_attrs.get("label", f"trial {t.number}")
        paper = t.user_attrs.get("paper_accuracy")
        r = tested.get(t.number)
        if r is None:
            why = t.user_attrs.get("diverged") or t.user_attrs.get("rejected") or t.user_attrs.get("error")
            note = {TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}.get(t.state, t.state.name.lower())
            lines.append(Line(label, paper, None, None, 0, None, f"{note}: {why}" if why else note))
            continue
        note = f"{r.diverged} of {len(r.accuracies)} runs diverged" if r.diverged else ""
        lines.append(Line(label, paper, r.mean, r.std, len(r.accuracies), r.seconds_per_epoch * r.epochs, note))
    return lines


def cells(line: Line) -> list[str]:
    """label, report, ours, difference, cost: as printed and written."""
    ours = "-" if line.ours is None else f"{line.ours:.4f} ± {line.std:.4f}"
    diff = "-" if line.ours is None or line.paper is None else f"{line.ours - line.paper:+.4f}"
    cost = "-" if line.seconds is None else f"{line.seconds:.1f} s"
    paper = "-" if line.paper is None else f"{line.paper:.4f}"
    return [line.label, paper, ours + (f" ({line.note})" if line.note else ""), diff, cost]


HEADER = ["row", "report", "ours (test, mean ± std)", "difference", "cost (s per run)"]


def notes(spec: StudySpec, original: StudySpec, changes: Changes, seeds: int, source: str) -> list[str]:
    out = [f"Study `{spec.name}` ({spec.strategy}) on `{spec.dataset}` (read from {source}), {spec.epochs} epochs "
           f"per row, train fraction {spec.train_fraction:g}."]
    if spec.dataset.startswith("cifar10") and "jpeg" in source.lower():
        out.append("Dataset: CIFAR-10 (JPEG copy): close to, not the same as, CIFAR-10.")
    out.append(f"Ours: test accuracy after retraining each row on train+val for its full budget, mean ± std over "
               f"{seeds} seed{'s' * (seeds != 1)} (`hpsearch evaluate --epochs max`). Cost: training seconds of one "
               "run on this machine.")
    if changes.scaled():
        what = [f"{spec.epochs} epochs instead of {original.epochs}"] if spec.epochs != original.epochs else []
        if spec.train_fraction != original.train_fraction:
            what.append(f"train fraction {spec.train_fraction:g} instead of {original.train_fraction:g}")
        out.append(f"**Scaled run, not the report's budget:** {', '.join(what) or 'rounding left it unchanged'}.")
    if changes.dataset is not None:
        out.append(f"**Dataset replaced:** `{spec.dataset}` instead of `{original.dataset}`: the report's numbers "
                   "do not apply.")
    if changes.weights is not None or changes.backbone is not None:
        out.append(f"**Substitute weights:** backbone {spec.space_overrides.get('backbone', 'resnet18')}, weights "
                   f"{Path(changes.weights or 'imagenet').name}, instead of the report's ImageNet ResNet18 "
                   "(not available offline).")
    return out


def markdown(title: str, note_lines: list[str], lines: list[Line]) -> str:
    out = [f"# {title}", "", *(f"{n}  " for n in note_lines), "", "| " + " | ".join(HEADER) + " |",
           "|" + "---|" * len(HEADER)]
    for line in lines:
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells(line)) + " |")
    return "\n".join(out) + "\n"
