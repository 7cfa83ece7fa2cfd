"""The ``hpsearch`` command line: each command parses, delegates, and turns errors into one line and an exit code.

Exit codes: 0 ok, 2 bad input (study file, option values, unknown study), 1 any other failure, 130 interrupted.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import optuna
import typer
from optuna.trial import TrialState
from rich.console import Console
from rich.table import Table

from hpsearch import results, signals
from hpsearch._display import RunDisplay, TrainingProgress, summary_table
from hpsearch._errors import HpsearchError, SpecError, first_line
from hpsearch._paths import default_cache_dir, default_data_dir
from hpsearch._preflight import check_run_writes, new_sqlite_file
from hpsearch._secrets import redact_url, scrub, scrub_log_records
from hpsearch.proxy import DEFAULT_HOST, DEFAULT_PORT, is_proxy_url
from hpsearch.storage import MAX_RETRY, heartbeat_settings, open_storage, storage_url
from hpsearch.study import (
    SPEC_ATTR,
    database_error,
    dead_trial_rule,
    fail_stale,
    finished_if_exists,
    load_existing,
    load_spec_from_study,
    open_study,
    run_trials,
)
from hpsearch.trials import count_finished, stop_note

if TYPE_CHECKING:
    from hpsearch.spec import StudySpec

# Modules that import torch (data, devices, launch, objective, spec, strategies, train) are imported inside the
# commands that train: torch takes seconds to import, and `--help`, `studies`, `show`, `export`, `delete` and
# `dashboard` never need it.

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Optuna hyperparameter search for image-classification CNNs.")
# markup off: messages carry user text such as "[space]" that rich would otherwise take for a style tag.
console = Console(highlight=False, markup=False)
err_console = Console(stderr=True, highlight=False, markup=False)

# ---------------------------------------------------------------- options shared by several commands
StorageOpt = typer.Option(None, "--storage", envvar="HPSEARCH_STORAGE", show_default="sqlite:///hpsearch.db",
                          help="SQLAlchemy URL of the study database, or grpc://host:port of `hpsearch proxy`.")
DataDirOpt = typer.Option(None, "--data-dir", envvar="HPSEARCH_DATA", show_default="~/.cache/hpsearch/data",
                          help="Where datasets are looked for (may be read-only).")
CacheDirOpt = typer.Option(None, "--cache-dir", envvar="HPSEARCH_CACHE", show_default="~/.cache/hpsearch/cache",
                           help="Decoded datasets, downloads and trial checkpoints.")
DeviceOpt = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N | mps (auto: CUDA, then MPS, then CPU).")
NTrialsOpt = typer.Option(None, "--n-trials", min=1, help="Run until the study holds this many finished trials.")
TimeoutOpt = typer.Option(None, "--timeout", min=1, help="Stop starting trials after this many seconds.")
ThreadsOpt = typer.Option(None, "--threads", min=1, help="CPU threads for training (default: available cores).")
WorkersOpt = typer.Option(1, "--workers", min=1,
                          help="Worker processes here: GPUs dealt round robin, CPU cores split between them.")
CompileOpt = typer.Option(False, "--compile", help="torch.compile each trial's model (see benchmarks/README.md).")
ArtifactsOpt = typer.Option(None, "--artifacts", envvar="HPSEARCH_ARTIFACTS", show_default="<cache dir>/artifacts",
                            help="Artifact store for checkpoints: a directory (shared by the workers) or "
                                 "s3://bucket/prefix (pip install 'hpsearch[s3]'). Recorded on the study.")
KeepCheckpointsOpt = typer.Option(0, "--keep-checkpoints", min=0, envvar="HPSEARCH_KEEP_CHECKPOINTS",
                                  help="Keep the checkpoints of the K best complete trials (0: delete each once "
                                       "its trial has finished).")
PrecisionOpt = typer.Option("auto", "--precision", envvar="HPSEARCH_PRECISION",
                            help="auto | fp32 | bf16 | fp16 (auto: CUDA's mixed precision; on a CPU with native "
                                 "bf16, whichever of fp32 and bf16 a few timed steps of each trial find faster).")
NoArtifactsOpt = typer.Option(False, "--no-artifacts",
                              help="No per-trial PNGs and notes for optuna-dashboard (see benchmarks/README.md).")


def main() -> None:
    # Before torch is imported (the commands import it lazily): OpenMP reads this when it loads. Where --threads fixes
    # the threads, those waiting for each other sleep instead of spinning, so a busy neighbour process does not make a
    # training burn its own cores. By default OpenMP's own policy (spin briefly, then sleep) stays: it is 10-40%
    # faster alone for small networks, and devices.LoadAwareThreads makes way for a neighbour instead
    # (benchmarks/README.md, "A shared CPU"). A user's own OMP_WAIT_POLICY wins; --workers' children inherit it.
    if any(arg == "--threads" or arg.startswith("--threads=") for arg in sys.argv[1:]):
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Heartbeats, the retry callback and metric names are "experimental" in Optuna 5; hpsearch pins Optuna < 6.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    scrub_log_records()  # a storage URL's password never reaches a log line, whichever library writes it
    try:
        # standalone_mode=False: Click's usage errors reach us instead of being drawn as a multi-line box.
        code = app(standalone_mode=False)
    except SpecError as e:
        _fail(str(e), 2)
    except HpsearchError as e:
        _fail(str(e), 1)
    except _USAGE_ERRORS as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `hpsearch`: the help text is the message
            err_console.print(str(e), soft_wrap=True)
            sys.exit(2)
        _fail(usage_message(e), getattr(e, "exit_code", 2))
    except typer.Abort:  # "no" at a confirmation prompt, or end of input there
        _fail("aborted", 1)
    except KeyboardInterrupt:  # outside a trial (the run loop handles its own): nothing was half done
        _fail("interrupted", 130)
    if isinstance(code, int) and code:  # typer.Exit(N) in non-standalone mode comes back as a return value
        if code == 130:  # Click turned a Ctrl-C outside a trial into Exit(130)
            err_console.print("interrupted")
        sys.exit(code)


# Typer >= 0.2x vendors Click, whose exceptions then derive from typer.TyperException; older Typer uses Click.
_USAGE_ERRORS: tuple[type[Exception], ...] = (typer.TyperException,)
try:
    import click

    _USAGE_ERRORS += (click.ClickException,)
except ImportError:
    pass

_INVALID_VALUE = re.compile(r"^Invalid value for (.+?): (.*)$", re.DOTALL)


def usage_message(e: Exception, argv: list[str] | None = None) -> str:
    """Click's message on one line, shaped like hpsearch's own and naming the value given:
    ``--n-trials 0: input should be greater than or equal to 1``."""
    format_message = getattr(e, "format_message", None)
    text = format_message() if callable(format_message) else str(e)
    match = _INVALID_VALUE.match(text)
    if match:
        hint = " / ".join(h.strip("'\"") for h in match.group(1).split(" / "))
        rule = match.group(2)
        value = _given(hint, sys.argv[1:] if argv is None else argv)
        text = f"{hint}{'' if value is None else ' ' + repr(value)}: {rule[:1].lower()}{rule[1:]}"
    return " ".join(text.split()).removesuffix(".")


def _given(hint: str, argv: list[str]) -> str | None:
    """The value the command line gave option ``hint`` (the last one wins, as in Click), if it is there."""
    value = None
    for i, arg in enumerate(argv):
        for name in hint.split(" / "):
            if name.startswith("-") and arg == name and i + 1 < len(argv):
                value = argv[i + 1]
            elif name.startswith("--") and arg.startswith(name + "="):
                value = arg[len(name) + 1 :]
    return value


def _fail(message: str, code: int) -> NoReturn:
    err_console.print(f"error: {scrub(message)}", soft_wrap=True)
    sys.exit(code)


@app.command()
def run(
    study_file: Path = typer.Argument(..., help="A study file (studies/*.toml)."),
    storage: str | None = StorageOpt,
    n_trials: int | None = NTrialsOpt,
    timeout: float | None = TimeoutOpt,
    data_dir: Path | None = DataDirOpt,
    cache_dir: Path | None = CacheDirOpt,
    device: str = DeviceOpt,
    threads: int | None = ThreadsOpt,
    workers: int = WorkersOpt,
    compile: bool = CompileOpt,
    precision: str = PrecisionOpt,
    no_artifacts: bool = NoArtifactsOpt,
    force: bool = typer.Option(False, "--force", help="Run even if the stored study was made from a different file."),
    artifacts_location: str | None = ArtifactsOpt,
    keep_checkpoints: int = KeepCheckpointsOpt,
) -> None:
    """Create or resume the study of STUDY_FILE and run trials until it holds n_trials finished trials."""
    from hpsearch.spec import load_spec

    spec = load_spec(study_file)
    with signals.sigterm_ends_trial(_say_terminated):
        _run(spec, storage, n_trials, timeout, data_dir, cache_dir, device, threads, force=force, workers=workers,
             compile=compile, artifacts_location=artifacts_location, keep_checkpoints=keep_checkpoints,
             no_artifacts=no_artifacts, precision=precision)


@app.command()
def worker(
    name: str = typer.Argument(..., help="Name of a study created by `hpsearch run`."),
    storage: str | None = StorageOpt,
    n_trials: int | None = NTrialsOpt,
    timeout: float | None = TimeoutOpt,
    data_dir: Path | None = DataDirOpt,
    cache_dir: Path | None = CacheDirOpt,
    device: str = DeviceOpt,
    threads: int | None = ThreadsOpt,
    workers: int = WorkersOpt,
    compile: bool = CompileOpt,
    precision: str = PrecisionOpt,
    no_artifacts: bool = NoArtifactsOpt,
    summary: bool = typer.Option(True, "--summary/--no-summary", hidden=True,
                                 help="End with the study's summary table (--workers' children do not)."),
    artifacts_location: str | None = ArtifactsOpt,
    keep_checkpoints: int = KeepCheckpointsOpt,
) -> None:
    """Join an existing study by name (its study file is stored in the database) and run trials."""
    spec = load_spec_from_study(open_storage(storage, create=False), name)
    with signals.sigterm_ends_trial(_say_terminated):
        _run(spec, storage, n_trials, timeout, data_dir, cache_dir, device, threads, force=False, workers=workers,
             compile=compile, summary=summary, artifacts_location=artifacts_location,
             keep_checkpoints=keep_checkpoints, no_artifacts=no_artifacts, precision=precision)


def _say_terminated(text: str) -> None:
    err_console.print(text, soft_wrap=True)


def _run(spec: StudySpec, storage: str | None, n_trials: int | None, timeout: float | None, data_dir: Path | None,
         cache_dir: Path | None, device_name: str, threads: int | None, *, force: bool, workers: int = 1,
         compile: bool = False, summary: bool = True, artifacts_location: str | None = None,
         keep_checkpoints: int = 0, no_artifacts: bool = False, precision: str = "auto") -> None:
    from hpsearch import artifacts
    from hpsearch import data as datasets
    from hpsearch.devices import check_precision, configure_threads, resolve_device
    from hpsearch.launch import launch
    from hpsearch.objective import chance_accuracy, make_objective

    if artifacts_location is not None:
        artifacts.normalize_location(artifacts_location)  # a bad value fails before any work (exit 2)
    device = resolve_device(device_name)
    check_precision(precision, device)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    heartbeat_settings()  # a bad HPSEARCH_*_SECONDS is bad input, reported before anything is read or written
    cache = cache_dir or default_cache_dir()
    check_run_writes(storage=storage_url(storage), cache=cache,
                     artifacts=artifacts_location or artifacts.default_location(cache))
    # A new SQLite file is made only once the data has been read: a run that fails on its data leaves none behind.
    rdb = None if new_sqlite_file(storage_url(storage)) else open_storage(storage)
    target = n_trials or spec.n_trials
    finished = None if rdb is None else finished_if_exists(rdb, spec.name)
    if rdb is not None and target is not None and finished is not None and finished >= target:
        study = open_study(spec, rdb, force=force)  # still refuses a changed study file
        fail_stale(study)
        console.print(f"study {spec.name!r} already holds {finished} finished trials (target {target}); "
                      "nothing to run. Raise --n-trials to run more.")
        if summary:
            console.print(summary_table(study))
        return
    if workers > 1:
        # Read once here: a bad dataset fails before the study exists, and a folder's decoded cache is written
        # once instead of raced by K workers. Each worker then loads it onto its own device.
        datasets.read_raw(spec.dataset, data_dir or default_data_dir(), cache)
        study = open_study(spec, rdb or open_storage(storage), force=force)
        # recorded on the study now, so the workers find it (also checks it before K processes start)
        artifacts.open_artifact_store(artifacts.resolve_location(study, artifacts_location,
                                                                 artifacts.default_location(cache)))
        os.environ["HPSEARCH_KEEP_CHECKPOINTS"] = str(keep_checkpoints)  # the workers inherit it
        from hpsearch.study import study_gone, study_identity

        identity = study_identity(study)
        code = launch(spec.name, workers, device, storage=storage_url(storage), n_trials=target, timeout=timeout,
                      data_dir=data_dir, cache_dir=cache_dir, compile=compile, out=console.file,
                      no_artifacts=no_artifacts, precision=precision)
        gone = study_gone(study, identity)  # deleted while the workers trained it: no summary to show
        if gone is not None:
            raise HpsearchError(gone)
        console.print(summary_table(study))
        if code:
            raise SystemExit(code)
        return
    if device.type == "cpu":
        configure_threads(threads)
    # Data first: a dataset that cannot be read leaves the database untouched.
    data = datasets.load(spec.dataset, data_dir=data_dir or default_data_dir(), cache_dir=cache,
                         device=device, val_fraction=spec.val_fraction, train_fraction=spec.train_fraction,
                         seed=spec.seed)
    dead = dead_trial_rule(spec, chance_accuracy(data.val))
    study = open_study(spec, rdb or open_storage(storage), force=force, dead=dead)
    store = artifacts.open_artifact_store(artifacts.resolve_location(study, artifacts_location,
                                                                     artifacts.default_location(cache)))
    finished = count_finished(study)
    _save_study_note(study, spec, explain=not no_artifacts)
    console.print(f"study {spec.name!r}: {spec.strategy} on {spec.dataset} "
                  f"({len(data.train)} train / {len(data.val)} val images) on {device}; "
                  f"{finished} finished trials so far" + (f", running to {target}" if target else "")
                  + (f", or until a trial reaches {spec.target:.4f}" if spec.target is not None else ""),
                  soft_wrap=True)
    if finished == 0:
        _say_warm_start(study)
    started = time.monotonic()
    with RunDisplay(console, study, target) as display:
        objective = make_objective(spec, data, device=device, progress=display.epoch, compile=compile, store=store,
                                   dead=dead, explain=not no_artifacts, precision=precision)
        cleanup = artifacts.checkpoints_after_trial(store, keep_best=keep_checkpoints)

        def on_trial_end(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            cleanup(study, trial)  # the trial's final state is stored by now
            display.trial_end(study, trial)

        outcome = run_trials(study, objective, n_trials=target, timeout=timeout or spec.timeout,
                             on_trial_end=on_trial_end, on_storage_error=_storage_error,
                             on_taken_over=_taken_over, target=spec.target)
    term = signals.raised()  # first: from here on a resent SIGTERM is ignored
    try:  # the note's training seconds as of this run's end; best effort: the run's own outcome comes next
        _save_study_note(study, spec, explain=not no_artifacts)
    except Exception as e:
        err_console.print(f"warning: the study's note was not updated ({first_line(e)})", soft_wrap=True)
    if summary:
        console.print(summary_table(study))
        console.print(display.budget_line(time.monotonic() - started), soft_wrap=True)
    if outcome.interrupted and term is not None:
        signals.retry_terminated(study, term, max_retry=MAX_RETRY)
        raise term  # sigterm_ends_trial prints its one line and exits 143
    if outcome.interrupted:
        err_console.print("interrupted: the running trial was marked FAIL; run the same command to resume")
        raise SystemExit(130)
    if outcome.target_met is not None:
        met = outcome.target_met
        console.print(f"target {met['target']:.4f} reached by trial {met['trial']} ({met['value']:.4f}) at "
                      f"{met['at']}: the study ends here (every worker stops after its current trial)", soft_wrap=True)
    if outcome.no_trainable is not None:
        raise SpecError(f"{spec.name}: {outcome.no_trainable}")
    if outcome.fatal is not None:
        raise HpsearchError(outcome.fatal)
    if outcome.error is not None:
        raise HpsearchError(f"every trial of this run failed; last error: {outcome.error}")


def _save_study_note(study: optuna.Study, spec: StudySpec, *, explain: bool) -> None:
    """The study's note for optuna-dashboard: its study file, strategy, dataset, training seconds so far by device
    (and artifact store, if used); written only when it changed."""
    from hpsearch.artifacts import ARTIFACTS_ATTR
    from hpsearch.explain import save_study_note

    save_study_note(study, spec, artifacts=study.user_attrs.get(ARTIFACTS_ATTR) if explain else None)


def _say_warm_start(study: optuna.Study) -> None:
    """What the study file's warm_start enqueued from earlier studies, and what it skipped and why."""
    from hpsearch.study import WARM_START_ATTR

    warm = study.user_attrs.get(WARM_START_ATTR)
    if not warm:
        return
    console.print(f"warm start: {len(warm['enqueued'])} configurations of earlier studies enqueued first"
                  + (f" ({', '.join(warm['enqueued'])})" if warm["enqueued"] else ""), soft_wrap=True)
    for line in warm["skipped"]:
        console.print(f"warm start: skipped {line}", soft_wrap=True)


def _taken_over() -> None:
    err_console.print("warning: this worker's trial was failed as stale while the database was out of reach; its retry "
                      "resumes it from its checkpoint; going on", soft_wrap=True)


def _storage_error(error: BaseException, retry_in: float) -> None:
    cause = database_error(error) or error  # the driver's words, not Optuna's secondary error while handling them
    err_console.print(f"warning: lost the database ({scrub(first_line(cause))}); going on in {retry_in:g} s",
                      soft_wrap=True)


@app.command()
def evaluate(
    name: str = typer.Argument(..., help="Study name."),
    storage: str | None = StorageOpt,
    top: int = typer.Option(1, "--top", help="How many of the best complete trials to evaluate."),
    trial_numbers: list[int] = typer.Option([], "--trial", help="Evaluate this complete trial (repeat for several) "
                                            "instead of the best --top ones."),
    seeds: int = typer.Option(3, "--seeds", help="Retraining runs per trial (seeds derived from the study seed)."),
    epochs: str | None = typer.Option(None, "--epochs", show_default="the study's final.epochs, else best",
                                      help="best: the trial's best epoch count; max: its full budget; N: N epochs "
                                      "with the LR schedule stretched to N (a longer final training)."),
    train_fraction: float | None = typer.Option(None, "--train-fraction",
                                                help="Retrain on this part of the training images, plus val "
                                                "(default: the study's final.train_fraction, else its "
                                                "train_fraction; 1: all of them)."),
    save: Path | None = typer.Option(None, "--save", help="Save each retrained model here (hpsearch.load_model)."),
    data_dir: Path | None = DataDirOpt,
    cache_dir: Path | None = CacheDirOpt,
    device: str = DeviceOpt,
    threads: int | None = ThreadsOpt,
    precision: str = PrecisionOpt,
) -> None:
    """Retrain the best trials on train+val and measure them on the TEST split (the only command that reads it).

    Results are stored on the study (seeds already stored are skipped: a killed evaluate resumes) and shown by
    show and export."""
    from hpsearch import evaluate as final
    from hpsearch.devices import check_precision, configure_threads, resolve_device

    final.check_options(top=top, seeds=seeds, epochs=epochs or "best", train_fraction=train_fraction)
    rdb = open_storage(storage, create=False)
    spec = load_spec_from_study(rdb, name)
    study = load_existing(rdb, name)
    dev = resolve_device(device)
    check_precision(precision, dev)
    if dev.type == "cpu":
        configure_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def progress(trial: int, index: int, total: int, accuracy: float) -> None:
        console.print(f"trial {trial:>4} seed {index + 1}/{total}  test acc {accuracy:.4f}")

    with TrainingProgress(console) as display:
        rows = final.evaluate_study(study, spec, top=top, seeds=seeds, epochs=epochs,
                                    data_dir=data_dir or default_data_dir(),
                                    cache_dir=cache_dir or default_cache_dir(), device=dev,
                                    train_fraction=train_fraction, save_dir=save, progress=progress,
                                    precision=precision, trials=trial_numbers,
                                    epoch_progress=_epoch_line(display, "seed"))
    table = Table("trial", "val acc", "test acc", "seeds", "epochs", "params", "s/epoch",
                  title=f"study {name}: test accuracy (retrained on train+val)", title_justify="left")
    for r in rows:
        note = f" ({r.diverged} diverged)" if r.diverged else ""
        table.add_row(str(r.number), f"{r.val_accuracy:.4f}", f"{r.mean:.4f} ± {r.std:.4f}{note}",
                      str(len(r.accuracies)), str(r.epochs), str(r.param_count), f"{r.seconds_per_epoch:.1f}")
    console.print(table)
    if save is not None:
        console.print(f"saved {sum(len(r.saved) for r in rows)} models in {save} (hpsearch.load_model reads them)",
                      soft_wrap=True)
    fraction = next(f for f in (train_fraction, spec.final_train_fraction, spec.train_fraction) if f is not None)
    if fraction < 1:
        console.print(f"retrained on {fraction:.0%} of the training images plus val, as the search trained "
                      f"(--train-fraction 1: all of them)")


def _epoch_line(display: TrainingProgress, run: str) -> Callable[[int, int, int, int, int, float], None]:
    """evaluate_study's per-epoch callback, shown as ``trial 3 seed 1/3  epoch 4/10  0:42 elapsed, ~1:03 left``."""

    def show(trial: int, index: int, total: int, epoch: int, epochs: int, elapsed: float) -> None:
        display.epoch(f"trial {trial:>4} {run} {index + 1}/{total}", epoch, epochs, elapsed)

    return show


@app.command()
def reproduce(
    study_file: Path = typer.Argument(..., help="A report table: studies/report/*.toml."),
    epochs_scale: float | None = typer.Option(None, "--epochs-scale", help="Multiply every row's epochs (scaled run)."),
    train_fraction: float | None = typer.Option(None, "--train-fraction",
                                                help="Train on this part of the training set (scaled run)."),
    seeds: int = typer.Option(1, "--seeds", help="Test runs per row (retrained on train+val)."),
    weights: str | None = typer.Option(None, "--weights", help="Fine-tuning tables: a state_dict file instead of "
                                       "ImageNet ResNet18 (not available offline)."),
    backbone: str | None = typer.Option(None, "--backbone", help="Fine-tuning tables: resnet18 | resnet50."),
    dataset: str | None = typer.Option(None, "--dataset", help="Run on another dataset (tests; the report's "
                                       "numbers then do not apply)."),
    out: Path | None = typer.Option(None, "--out", help="Markdown file (default: reproduce-<study>.md)."),
    storage: str | None = StorageOpt,
    data_dir: Path | None = DataDirOpt,
    cache_dir: Path | None = CacheDirOpt,
    device: str = DeviceOpt,
    threads: int | None = ThreadsOpt,
) -> None:
    """Run a report table, test every row, and print and write it next to the report's numbers."""
    from hpsearch import data as datasets
    from hpsearch import evaluate as final
    from hpsearch import reproduce as repro
    from hpsearch.devices import resolve_device
    from hpsearch.spec import load_spec

    final.check_options(top=1, seeds=seeds, epochs="max")
    original = load_spec(study_file)
    changes = repro.Changes(epochs_scale=epochs_scale, train_fraction=train_fraction, dataset=dataset,
                            weights=weights, backbone=backbone)
    spec = repro.prepare(original, changes)
    target = out or Path(f"reproduce-{spec.name.replace('/', '_').replace(':', '_')}.md")
    data_dir = data_dir or default_data_dir()
    cache = cache_dir or default_cache_dir()
    try:
        _run(spec, storage, None, None, data_dir, cache, device, threads, force=False)
    except HpsearchError as e:
        if spec.strategy == "finetune" and weights is None and "weights" in str(e).lower():
            raise HpsearchError(f"{e}; {repro.SUBSTITUTE_HINT}") from None
        raise
    study = load_existing(open_storage(storage, create=False), spec.name)
    dev = resolve_device(device)

    def progress(trial: int, index: int, total: int, accuracy: float) -> None:
        console.print(f"trial {trial:>4} test run {index + 1}/{total}  test acc {accuracy:.4f}")

    with TrainingProgress(console) as display:
        rows = final.evaluate_study(study, spec, top=len(spec.enqueue), seeds=seeds, epochs="max", data_dir=data_dir,
                                    cache_dir=cache, device=dev, progress=progress,
                                    epoch_progress=_epoch_line(display, "test run"))
    lines = repro.compare(study, rows)
    source = datasets.read_raw(spec.dataset, data_dir, cache).source
    note_lines = repro.notes(spec, original, changes, seeds, source)
    table = Table(*repro.HEADER, title=f"{spec.name}: the report next to ours", title_justify="left")
    for line in lines:
        table.add_row(*repro.cells(line))
    console.print(table)
    for n in note_lines:
        console.print(n.replace("**", "").replace("`", ""), soft_wrap=True)
    try:
        target.write_text(repro.markdown(f"{spec.name}: the report next to ours", note_lines, lines), encoding="utf-8")
    except OSError as e:
        raise HpsearchError(f"--out: cannot write {str(target)!r} ({e.strerror})") from None
    console.print(f"wrote {target}")


@app.command()
def studies(storage: str | None = StorageOpt) -> None:
    """One row per study: name, strategy, dataset, trials by state, best value."""
    rdb = open_storage(storage, create=False)
    summaries = optuna.get_all_study_summaries(rdb, include_best_trial=True)
    table = Table("name", "strategy", "dataset", "complete", "pruned", "fail", "running", "best")
    for s in summaries:
        trials = optuna.load_study(storage=rdb, study_name=s.study_name).get_trials(deepcopy=False)
        counts = {st: sum(t.state == st for t in trials) for st in TrialState}
        best = "-" if s.best_trial is None or s.best_trial.value is None else f"{s.best_trial.value:.4f}"
        table.add_row(s.study_name, str(s.user_attrs.get("strategy", "-")), str(s.user_attrs.get("dataset", "-")),
                      str(counts[TrialState.COMPLETE]), str(counts[TrialState.PRUNED]), str(counts[TrialState.FAIL]),
                      str(counts[TrialState.RUNNING]), best)
    if not summaries:
        console.print("no studies in this storage")
        return
    console.print(table)


def _trial_row(t: optuna.trial.FrozenTrial, tested: dict[int, Any] | None = None) -> dict[str, Any]:
    duration = None
    if t.datetime_start and t.datetime_complete:
        duration = round((t.datetime_complete - t.datetime_start).total_seconds(), 3)
    return {
        "number": t.number,
        "state": t.state.name,
        "value": t.value,
        "params": t.params,
        "epochs_run": len(t.intermediate_values),
        "best_epoch": t.user_attrs.get("best_epoch"),
        "seconds_per_epoch": t.user_attrs.get("seconds_per_epoch"),
        "param_count": t.user_attrs.get("param_count"),
        "device": t.user_attrs.get("device"),
        "note": stop_note(t),
        "duration_s": duration,
        "datetime_start": t.datetime_start.isoformat() if t.datetime_start else None,
        **results.test_columns((tested or {}).get(t.number)),
    }


@app.command()
def show(
    name: str = typer.Argument(..., help="Study name."),
    storage: str | None = StorageOpt,
    top: int = typer.Option(5, "--top", min=1, help="How many of the best complete trials to list."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """The best trial and the top K complete trials of a study."""
    study = load_existing(open_storage(storage, create=False), name)
    complete = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
                      key=lambda t: (-(t.value or 0.0), t.number))
    tested = results.stored(study)
    ranked = [_trial_row(t, tested) for t in complete[:top]]
    if as_json:
        counts = {s.name: sum(t.state == s for t in study.get_trials(deepcopy=False)) for s in TrialState}
        best = dict(ranked[0], config=complete[0].user_attrs.get("config")) if ranked else None
        spec = json.loads(study.user_attrs.get(SPEC_ATTR, "null"))
        print(json.dumps({"study": name, "spec": spec, "counts": counts, "best": best, "top": ranked}, indent=2))
        return
    console.print(summary_table(study))
    if ranked:
        table = Table("rank", "trial", "val acc", "test acc", "epochs", "s/epoch", "params", title=f"top {len(ranked)}",
                      title_justify="left")
        for i, row in enumerate(ranked, 1):
            spe = row["seconds_per_epoch"]
            test = "-" if row["test_accuracy_mean"] is None else (
                f"{row['test_accuracy_mean']:.4f} ± {row['test_accuracy_std']:.4f} ({len(row['test_accuracies'])})")
            table.add_row(str(i), str(row["number"]), f"{row['value']:.4f}", test, str(row["epochs_run"]),
                          "-" if spe is None else f"{spe:.1f}", str(row["param_count"]))
        console.print(table)


@app.command()
def export(
    name: str = typer.Argument(..., help="Study name."),
    out: Path = typer.Option(..., "--out", help="Output file: .csv or .json."),
    storage: str | None = StorageOpt,
) -> None:
    """Write all trials with their params and values to a .csv or .json file."""
    if out.suffix.lower() not in (".csv", ".json"):
        raise SpecError(f"--out: {str(out)!r} must end in .csv or .json")
    study = load_existing(open_storage(storage, create=False), name)
    tested = results.stored(study)
    rows = [_trial_row(t, tested) for t in study.get_trials(deepcopy=False)]
    if out.suffix.lower() == ".json":
        text = json.dumps(rows, indent=2)
    else:
        params = sorted({k for r in rows for k in r["params"]})
        fields = [k for k in rows[0] if k != "params"] if rows else ["number", "state", "value"]
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(fields + [f"param_{p}" for p in params])
        for r in rows:
            writer.writerow([r[f] for f in fields] + [r["params"].get(p, "") for p in params])
        text = buf.getvalue()
    if out.is_dir():
        raise SpecError(f"--out: {str(out)!r} is a directory; give a file name ending in .csv or .json")
    tmp = out.with_name(out.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out)  # never a half-written export
    except OSError as e:
        raise HpsearchError(f"--out: cannot write {str(out)!r} ({e.strerror})") from None
    finally:
        tmp.unlink(missing_ok=True)  # left only by a failure: after the replace it is gone
    console.print(f"wrote {len(rows)} trials of study {name!r} to {out}")


@app.command()
def report(
    names: list[str] = typer.Argument(..., help="Study names (several on one dataset: strategy-vs-cost view)."),
    out: Path = typer.Option(..., "--out", help="Folder for index.html, summary.md and the PNG figures."),
    storage: str | None = StorageOpt,
) -> None:
    """Write a report: self-contained index.html (plotly), PNG figures and summary.md; print the summary table."""
    from hpsearch.report import strategy_table, write_report

    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SpecError(f"NAME: {duplicates[0]!r} is given twice; name each study once")
    if out.exists() and not out.is_dir():
        raise SpecError(f"--out: {str(out)!r} is a file; give a folder (created when missing)")
    rdb = open_storage(storage, create=False)
    studies = [load_existing(rdb, n) for n in names]
    try:
        written = write_report(studies, out)
    except OSError as e:
        raise HpsearchError(f"--out: cannot write {str(out)!r} ({e.strerror})") from None
    head, rows = strategy_table(written.rows)
    table = Table(*head, title="summary", title_justify="left")
    for r in rows:
        table.add_row(*r)
    console.print(table)
    for line in written.missing:
        console.print(f"not drawn: {line}", soft_wrap=True)
    console.print(f"wrote {out / 'index.html'}, {out / 'summary.md'} and {len(written.pngs)} PNG figures",
                  soft_wrap=True)


@app.command()
def delete(
    name: str = typer.Argument(..., help="Study name."),
    storage: str | None = StorageOpt,
    cache_dir: Path | None = CacheDirOpt,
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Delete a study, its trials and its checkpoints."""
    from hpsearch import artifacts  # here: optuna.artifacts imports boto3 where installed (0.1 s)

    rdb = open_storage(storage, create=False)
    study = load_existing(rdb, name)
    n = len(study.get_trials(deepcopy=False))
    if not yes:
        if not sys.stdin.isatty():
            raise SpecError(f"delete {name!r}: confirmation needed; pass --yes to delete without asking")
        typer.confirm(f"Delete study {name!r} and its {n} trials?", abort=True)
    store = artifacts.study_artifact_store(study, artifacts.default_location(cache_dir or default_cache_dir()))
    checkpoints = {t.user_attrs[artifacts.CHECKPOINT_ATTR] for t in study.get_trials(deepcopy=False)
                   if artifacts.CHECKPOINT_ATTR in t.user_attrs}
    optuna.delete_study(study_name=name, storage=rdb)
    for checkpoint in checkpoints:
        artifacts.remove_checkpoint(store, checkpoint)
    console.print(f"deleted study {name!r} ({n} trials)")


@app.command()
def dashboard(
    storage: str | None = StorageOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8080, "--port", min=1, max=65535, help="Port to listen on."),
    cache_dir: Path | None = CacheDirOpt,
    artifacts_location: str | None = ArtifactsOpt,
) -> None:
    """Browse the studies in optuna-dashboard, with each trial's curves, confusion matrix and note (blocks; Ctrl-C
    stops it)."""
    import optuna_dashboard

    from hpsearch.dashboard import dashboard_artifact_store
    from hpsearch.proxy import check_listen

    rdb = open_storage(storage, create=False)
    check_listen(host, port, reuse_address=True)  # a taken port fails here, before the lines that say it serves
    store, locations, unreachable = dashboard_artifact_store(
        rdb, given=artifacts_location, default_location=(cache_dir or default_cache_dir()) / "artifacts")
    for warning in unreachable:  # their trials show without images; the dashboard still serves every study
        err_console.print(scrub(warning), soft_wrap=True)
    console.print(f"artifacts from {', '.join(locations) or 'nowhere (no store could be opened)'}", soft_wrap=True)
    console.print(f"optuna-dashboard on http://{host}:{port}/dashboard  (Ctrl-C stops it)", soft_wrap=True)
    try:
        optuna_dashboard.run_server(rdb, host=host, port=port, artifact_store=store)
    except OSError as e:
        raise HpsearchError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror})") from None
    except KeyboardInterrupt:
        pass


@app.command()
def create(
    study_file: Path = typer.Argument(..., help="A study file (studies/*.toml)."),
    storage: str | None = StorageOpt,
    force: bool = typer.Option(False, "--force", help="Update the stored study even if its search definition differs."),
) -> None:
    """Create the study of STUDY_FILE (or update its stored file) without running a trial; workers then join by name.

    The one-shot step of docker/compose.yaml and docker/k8s/: the database is set up once, before any worker starts.
    """
    # Imported here, not at the top: this command trains nothing, so it pays for no training module.
    from hpsearch.spec import load_spec
    from hpsearch.storage import open_storage
    from hpsearch.study import finished_if_exists, open_study

    spec = load_spec(study_file)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not Optuna's "A new study created" log line
    rdb = open_storage(storage)
    existed = finished_if_exists(rdb, spec.name) is not None
    study = open_study(spec, rdb, force=force)
    if existed:
        console.print(f"study {spec.name!r} exists ({count_finished(study)} finished trials); stored study file "
                      f"updated; join with: hpsearch worker {spec.name}", soft_wrap=True)
    else:
        console.print(f"study {spec.name!r} created ({spec.strategy} on {spec.dataset}, {len(spec.enqueue)} enqueued); "
                      f"join with: hpsearch worker {spec.name}", soft_wrap=True)
        _say_warm_start(study)


@app.command()
def proxy(
    storage: str | None = StorageOpt,
    host: str = typer.Option(DEFAULT_HOST, "--host", help="Address to listen on (0.0.0.0: every interface; the "
                             "proxy has no authentication, so expose it only on a trusted network)."),
    port: int = typer.Option(DEFAULT_PORT, "--port", min=1, max=65535, help="Port to listen on."),
) -> None:
    """Serve the database to many workers as Optuna's gRPC storage proxy; workers pass --storage grpc://HOST:PORT.
    Workers' heartbeats go through it, and it fails and retries the trials of killed workers (README, "Proxy")."""
    from hpsearch import proxy as grpc_proxy

    url = storage_url(storage)
    if is_proxy_url(url):
        raise SpecError(f"--storage: {redact_url(url)!r} is a proxy; hpsearch proxy needs the database URL itself "
                        "(e.g. postgresql+psycopg://user@host/db)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rdb = open_storage(url)
    grpc_proxy.check_listen(host, port)  # before saying it listens
    console.print(f"gRPC storage proxy on grpc://{host}:{port}  (workers: --storage grpc://{host}:{port}; "
                  "Ctrl-C stops it)", soft_wrap=True)
    try:
        grpc_proxy.serve(rdb, host=host, port=port)
    except KeyboardInterrupt:
        pass


@app.command("export-model")
def export_model(
    name: str = typer.Argument(..., help="Study name."),
    out: Path = typer.Option(..., "--out", help="The file to write: .onnx (ONNX) or .pt/.pth/.ts (TorchScript); its "
                             "model card is written beside it as FILE.json."),
    trial: int | None = typer.Option(None, "--trial", min=0, show_default="the best complete trial",
                                     help="Export this complete trial's model."),
    seed: int = typer.Option(0, "--seed", min=0, help="Which of evaluate's seeds (0: the first, as in its "
                             "<study>-trial<N>-seed<i>.pt)."),
    fmt: str | None = typer.Option(None, "--format", show_default="from --out's suffix",
                                   help="torchscript | onnx."),
    storage: str | None = StorageOpt,
    data_dir: Path | None = DataDirOpt,
    cache_dir: Path | None = CacheDirOpt,
    device: str = DeviceOpt,
    threads: int | None = ThreadsOpt,
    precision: str = PrecisionOpt,
) -> None:
    """Write a trial's model as one self-contained file (uint8 images [B, C, H, W] in, logits out; preprocessing
    inside) with its model card, after checking it against PyTorch on validation images.

    The model is the one `evaluate --save` saved for that trial and seed, else it is retrained as evaluate does (and
    its test accuracy stored)."""
    from hpsearch import export as exporting
    from hpsearch.devices import check_precision, configure_threads, resolve_device

    exporting.resolve_format(fmt, out)  # a bad --format/--out fails before anything is opened
    rdb = open_storage(storage, create=False)
    spec = load_spec_from_study(rdb, name)
    study = load_existing(rdb, name)
    dev = resolve_device(device)
    check_precision(precision, dev)
    configure_threads(threads)  # the export, its check and its latency run on the CPU whatever --device trains on

    def say(text: str) -> None:
        console.print(text, soft_wrap=True)

    done = exporting.export_model(study, spec, trial=trial, seed_index=seed, fmt=fmt, out=out,
                                  data_dir=data_dir or default_data_dir(), cache_dir=cache_dir or default_cache_dir(),
                                  device=dev, say=say, precision=precision)
    card = done.card
    check = card["verification"]
    latency = card["latency_ms_per_image"]
    console.print(
        f"wrote {done.path} ({card['format']}, {card['bytes'] / 1e6:.2f} MB) and {done.card_path}: study "
        f"{card['study']!r} trial {card['trial']} seed {card['seed_index']}, test acc {card['test_accuracy']:.4f}; "
        f"checked on {check['images']} validation images (argmax agreement {check['argmax_agreement']:.2%}, max "
        f"|logit diff| {check['max_abs_logit_diff']:.2g}); {latency['batch_1']:.3g} ms/image at batch 1, "
        f"{latency['batch_64']:.3g} ms/image at batch 64 ({card['latency_runtime']})", soft_wrap=True)


@app.command()
def predict(
    model: Path = typer.Argument(..., help="A file hpsearch export-model wrote (.onnx or TorchScript), its card "
                                 "FILE.json beside it."),
    images: list[Path] = typer.Argument(..., help="Image files and/or folders (walked recursively)."),
    top: int = typer.Option(3, "--top", min=1, help="Classes shown per image (at most the model's classes)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line: path and top classes."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per forward pass."),
) -> None:
    """Top classes with their probabilities for each image. An image that cannot be read is one error line and the
    others still run; the exit code is then 1."""
    # numpy, PIL and onnxruntime only for an .onnx model: torch is imported for a TorchScript one alone.
    from hpsearch import predict as predicting

    loaded = predicting.open_model(model)
    files = predicting.image_files(images)
    failed = 0
    terminal = console.is_terminal and not as_json
    k = min(top, len(loaded.classes))
    table = Table("image", *(f"#{i + 1}" for i in range(k))) if terminal else None
    for result in predicting.predict(loaded, files, top=top, batch_size=batch_size):
        if isinstance(result, predicting.Failure):
            failed += 1
            err_console.print(f"error: {result.path}: cannot read the image ({result.reason})", soft_wrap=True,
                              markup=False)
        elif as_json:
            print(json.dumps({"path": str(result.path),
                              "top": [{"class": c, "probability": p} for c, p in result.top]}))
        elif table is not None:
            table.add_row(str(result.path), *(f"{c} {p:.3f}" for c, p in result.top))
        else:
            print("\t".join([str(result.path), *(f"{c}\t{p:.4f}" for c, p in result.top)]))
    if table is not None and table.row_count:
        console.print(table)
    if failed:
        raise SystemExit(1)
