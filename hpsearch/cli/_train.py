"""The commands that train (run, worker, evaluate, reproduce, export-model) and ``create``, which sets a study up
for workers. Each parses its options, calls the run session (hpsearch.session) or the module that does the work,
and prints the result; modules that import torch are imported inside the command."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import optuna
import typer
from rich.table import Table

from hpsearch import session, signals
from hpsearch._display import TrainingProgress
from hpsearch._errors import HpsearchError
from hpsearch._paths import default_cache_dir, default_data_dir
from hpsearch.cli._options import (
    CONSOLES,
    ArtifactsLocation,
    CacheDir,
    Compile,
    DataDir,
    Device,
    KeepCheckpoints,
    NoArtifacts,
    NTrials,
    Precision,
    Storage,
    StudyFile,
    StudyName,
    Threads,
    Timeout,
    Workers,
    console,
    err_console,
    run_options,
)

if TYPE_CHECKING:
    from hpsearch.spec import StudySpec

# Every parameter of run and worker reaches run_options(ctx) through ctx.params, by name.
Force = Annotated[bool, typer.Option("--force", help="Run even if the stored study was made from a different file.")]
Summary = Annotated[bool, typer.Option("--summary/--no-summary", hidden=True,
                                       help="End with the study's summary table (--workers' children do not).")]


def run(ctx: typer.Context, study_file: StudyFile, storage: Storage = None, n_trials: NTrials = None,
        timeout: Timeout = None, data_dir: DataDir = None, cache_dir: CacheDir = None, device: Device = "auto",
        threads: Threads = None, workers: Workers = 1, compile: Compile = False, precision: Precision = "auto",
        no_artifacts: NoArtifacts = False, force: Force = False, artifacts_location: ArtifactsLocation = None,
        keep_checkpoints: KeepCheckpoints = 0) -> None:
    """Create or resume the study of STUDY_FILE and run trials until it holds n_trials finished trials."""
    from hpsearch.spec import load_spec

    _run_study(load_spec(study_file), run_options(ctx))


def worker(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Name of a study created by `hpsearch run`.")],
           storage: Storage = None, n_trials: NTrials = None, timeout: Timeout = None, data_dir: DataDir = None,
           cache_dir: CacheDir = None, device: Device = "auto", threads: Threads = None, workers: Workers = 1,
           compile: Compile = False, precision: Precision = "auto", no_artifacts: NoArtifacts = False,
           summary: Summary = True, artifacts_location: ArtifactsLocation = None,
           keep_checkpoints: KeepCheckpoints = 0) -> None:
    """Join an existing study by name (its study file is stored in the database) and run trials."""
    _run_study(session.stored_spec(name, storage), run_options(ctx))


def _run_study(spec: StudySpec, options: session.RunOptions) -> None:
    with signals.sigterm_ends_trial(_say_terminated):
        session.run_study(spec, options, CONSOLES)


def _say_terminated(text: str) -> None:
    err_console.print(text, soft_wrap=True)


def create(
    study_file: StudyFile,
    storage: Storage = None,
    force: bool = typer.Option(False, "--force", help="Update the stored study even if its search definition differs."),
) -> None:
    """Create the study of STUDY_FILE (or update its stored file) without running a trial; workers then join by name.

    The one-shot step of docker/compose.yaml and docker/k8s/: the database is set up once, before any worker starts.
    """
    from hpsearch.spec import load_spec

    spec = load_spec(study_file)
    created = session.create_study(spec, storage=storage, force=force)
    if created.existed:
        console.print(f"study {spec.name!r} exists ({created.finished} finished trials); stored study file "
                      f"updated; join with: hpsearch worker {spec.name}", soft_wrap=True)
        return
    console.print(f"study {spec.name!r} created ({spec.strategy} on {spec.dataset}, {len(spec.enqueue)} enqueued); "
                  f"join with: hpsearch worker {spec.name}", soft_wrap=True)
    for line in created.warm_start:
        console.print(line, soft_wrap=True)


def evaluate(
    name: StudyName,
    storage: Storage = None,
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
    data_dir: DataDir = None,
    cache_dir: CacheDir = None,
    device: Device = "auto",
    threads: Threads = None,
    precision: Precision = "auto",
) -> None:
    """Retrain the best trials on train+val and measure them on the TEST split (the search never reads it).

    This retraining is what reads the test split: here, and in reproduce and export-model, which retrain the same
    way. Results are stored on the study (seeds already stored are skipped: a killed evaluate resumes) and shown by
    show and export."""
    from hpsearch import evaluate as final

    final.check_options(top=top, seeds=seeds, epochs=epochs or "best", train_fraction=train_fraction)
    stored = session.open_stored(name, session.RunOptions(storage=storage, data_dir=data_dir, cache_dir=cache_dir,
                                                          device=device, threads=threads, precision=precision))
    spec = stored.spec
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def progress(trial: int, index: int, total: int, accuracy: float) -> None:
        console.print(f"trial {trial:>4} seed {index + 1}/{total}  test acc {accuracy:.4f}")

    with TrainingProgress(console) as display:
        rows = final.evaluate_study(stored.study, spec, top=top, seeds=seeds, epochs=epochs,
                                    data_dir=stored.data_dir, cache_dir=stored.cache_dir, device=stored.device,
                                    train_fraction=train_fraction, save_dir=save, progress=progress,
                                    precision=precision, trials=trial_numbers,
                                    epoch_progress=session.epoch_line(display, "seed"))
    _say_tested(name, rows, save)
    fraction = next(f for f in (train_fraction, spec.final_train_fraction, spec.train_fraction) if f is not None)
    if fraction < 1:
        console.print(f"retrained on {fraction:.0%} of the training images plus val, as the search trained "
                      f"(--train-fraction 1: all of them)")


def _say_tested(name: str, rows: list[Any], save: Path | None) -> None:
    """evaluate's table of test accuracies, and where the retrained models were saved."""
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


def reproduce(
    study_file: Annotated[Path, typer.Argument(help="A report table: studies/report/*.toml.")],
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
    storage: Storage = None,
    data_dir: DataDir = None,
    cache_dir: CacheDir = None,
    device: Device = "auto",
    threads: Threads = None,
) -> None:
    """Run a report table, test every row, and print and write it next to the report's numbers."""
    from hpsearch import data as datasets
    from hpsearch import evaluate as final
    from hpsearch import reproduce as repro
    from hpsearch.spec import load_spec

    final.check_options(top=1, seeds=seeds, epochs="max")
    original = load_spec(study_file)
    changes = repro.Changes(epochs_scale=epochs_scale, train_fraction=train_fraction, dataset=dataset,
                            weights=weights, backbone=backbone)
    spec = repro.prepare(original, changes)
    target = out or Path(f"reproduce-{spec.name.replace('/', '_').replace(':', '_')}.md")
    data_dir = data_dir or default_data_dir()
    cache = cache_dir or default_cache_dir()
    options = session.RunOptions(storage=storage, data_dir=data_dir, cache_dir=cache, device=device, threads=threads)
    study, rows = repro.run_and_test(spec, options, seeds=seeds, weights_given=weights is not None, say=CONSOLES)
    lines = repro.compare(study, rows)
    note_lines = repro.notes(spec, original, changes, seeds, datasets.read_raw(spec.dataset, data_dir, cache).source)
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


def export_model(
    name: StudyName,
    out: Path = typer.Option(..., "--out", help="The file to write: .onnx (ONNX) or .pt/.pth/.ts (TorchScript); its "
                             "model card is written beside it as FILE.json."),
    trial: int | None = typer.Option(None, "--trial", min=0, show_default="the best complete trial",
                                     help="Export this complete trial's model."),
    seed: int = typer.Option(0, "--seed", min=0, help="Which of evaluate's seeds (0: the first, as in its "
                             "<study>-trial<N>-seed<i>.pt)."),
    fmt: str | None = typer.Option(None, "--format", show_default="from --out's suffix",
                                   help="torchscript | onnx."),
    storage: Storage = None,
    data_dir: DataDir = None,
    cache_dir: CacheDir = None,
    device: Device = "auto",
    threads: Threads = None,
    precision: Precision = "auto",
) -> None:
    """Write a trial's model as one self-contained file (uint8 images [B, C, H, W] in, logits out; preprocessing
    inside) with its model card, after checking it against PyTorch on validation images.

    The model is the one `evaluate --save` saved for that trial and seed, else it is retrained as evaluate does (and
    its test accuracy stored)."""
    from hpsearch import export as exporting

    exporting.resolve_format(fmt, out)  # a bad --format/--out fails before anything is opened
    stored = session.open_stored(name, session.RunOptions(storage=storage, data_dir=data_dir, cache_dir=cache_dir,
                                                          device=device, threads=threads, precision=precision),
                                 cpu_work=True)

    def say(text: str) -> None:
        console.print(text, soft_wrap=True)

    done = exporting.export_model(stored.study, stored.spec, trial=trial, seed_index=seed, fmt=fmt, out=out,
                                  data_dir=stored.data_dir, cache_dir=stored.cache_dir, device=stored.device, say=say,
                                  precision=precision)
    card = done.card
    check = card["verification"]
    latency = card["latency_ms_per_image"]
    console.print(
        f"wrote {done.path} ({card['format']}, {card['bytes'] / 1e6:.2f} MB) and {done.card_path}: study "
        f"{card['study']!r} trial {card['trial']} seed {card['seed_index']}, test acc {card['test_accuracy']:.4f}; "
        f"checked on {check['images']} validation images (argmax agreement {check['argmax_agreement']:.2%}, max "
        f"|logit diff| {check['max_abs_logit_diff']:.2g}); {latency['batch_1']:.3g} ms/image at batch 1, "
        f"{latency['batch_64']:.3g} ms/image at batch 64 ({card['latency_runtime']})", soft_wrap=True)
