"""The ``hpsearch`` command line: each command parses, delegates, and turns errors into one line and an exit code.

Exit codes: 0 ok, 2 bad input (study file, option values, unknown study), 1 any other failure, 130 interrupted.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import optuna
import typer
from optuna.trial import TrialState
from rich.console import Console
from rich.table import Table

from hpsearch import data as datasets
from hpsearch._display import RunDisplay, summary_table
from hpsearch._errors import HpsearchError, SpecError, first_line
from hpsearch.devices import configure_threads, resolve_device
from hpsearch.launch import launch
from hpsearch.objective import checkpoint_dir, make_objective
from hpsearch.proxy import DEFAULT_HOST, DEFAULT_PORT, PROXY_WARNING, is_proxy_url
from hpsearch.spec import StudySpec, load_spec
from hpsearch.storage import open_storage, redact_url, storage_url
from hpsearch.study import (
    SPEC_ATTR,
    count_finished,
    fail_stale,
    finished_if_exists,
    load_existing,
    load_spec_from_study,
    open_study,
    run_trials,
)

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


def main() -> None:
    # Heartbeats, the retry callback and metric names are "experimental" in Optuna 5; hpsearch pins Optuna < 6.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        app()
    except SpecError as e:
        err_console.print(f"error: {e}", soft_wrap=True)
        sys.exit(2)
    except HpsearchError as e:
        err_console.print(f"error: {e}", soft_wrap=True)
        sys.exit(1)


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
    force: bool = typer.Option(False, "--force", help="Run even if the stored study was made from a different file."),
) -> None:
    """Create or resume the study of STUDY_FILE and run trials until it holds n_trials finished trials."""
    spec = load_spec(study_file)
    _run(spec, storage, n_trials, timeout, data_dir, cache_dir, device, threads, force=force, workers=workers,
         compile=compile)


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
    summary: bool = typer.Option(True, "--summary/--no-summary", hidden=True,
                                 help="End with the study's summary table (--workers' children do not)."),
) -> None:
    """Join an existing study by name (its study file is stored in the database) and run trials."""
    spec = load_spec_from_study(open_storage(storage, create=False), name)
    _run(spec, storage, n_trials, timeout, data_dir, cache_dir, device, threads, force=False, workers=workers,
         compile=compile, summary=summary)


def _run(spec: StudySpec, storage: str | None, n_trials: int | None, timeout: float | None, data_dir: Path | None,
         cache_dir: Path | None, device_name: str, threads: int | None, *, force: bool, workers: int = 1,
         compile: bool = False, summary: bool = True) -> None:
    device = resolve_device(device_name)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rdb = open_storage(storage)
    if summary and is_proxy_url(storage_url(storage)):  # once per command: --workers' children (no summary) skip it
        err_console.print(PROXY_WARNING.format(url=storage_url(storage)), soft_wrap=True)
    target = n_trials or spec.n_trials
    finished = finished_if_exists(rdb, spec.name)
    if target is not None and finished is not None and finished >= target:
        study = open_study(spec, rdb, force=force)  # still refuses a changed study file
        fail_stale(study)
        console.print(f"study {spec.name!r} already holds {finished} finished trials (target {target}); "
                      "nothing to run. Raise --n-trials to run more.")
        if summary:
            console.print(summary_table(study))
        return
    cache = cache_dir or datasets.default_cache_dir()
    if workers > 1:
        # Read once here: a bad dataset fails before the study exists, and a folder's decoded cache is written
        # once instead of raced by K workers. Each worker then loads it onto its own device.
        datasets.read_raw(spec.dataset, data_dir or datasets.default_data_dir(), cache)
        study = open_study(spec, rdb, force=force)
        code = launch(spec.name, workers, device, storage=storage_url(storage), n_trials=target, timeout=timeout,
                      data_dir=data_dir, cache_dir=cache_dir, compile=compile, out=console.file)
        console.print(summary_table(study))
        if code:
            raise SystemExit(code)
        return
    if device.type == "cpu":
        configure_threads(threads)
    # Data first: a dataset that cannot be read leaves the database untouched.
    data = datasets.load(spec.dataset, data_dir=data_dir or datasets.default_data_dir(), cache_dir=cache,
                         device=device, val_fraction=spec.val_fraction, train_fraction=spec.train_fraction,
                         seed=spec.seed)
    study = open_study(spec, rdb, force=force)
    finished = count_finished(study)
    console.print(f"study {spec.name!r}: {spec.strategy} on {spec.dataset} "
                  f"({len(data.train)} train / {len(data.val)} val images) on {device}; "
                  f"{finished} finished trials so far" + (f", running to {target}" if target else ""),
                  soft_wrap=True)
    with RunDisplay(console, study, target) as display:
        objective = make_objective(spec, data, device=device, progress=display.epoch, compile=compile,
                                   checkpoints=checkpoint_dir(cache / "checkpoints", storage_url(storage), spec.name))
        outcome = run_trials(study, objective, n_trials=target, timeout=timeout or spec.timeout,
                             on_trial_end=display.trial_end, on_storage_error=_storage_error)
    if summary:
        console.print(summary_table(study))
    if outcome.interrupted:
        err_console.print("interrupted: the running trial was marked FAIL; run the same command to resume")
        raise SystemExit(130)
    if outcome.fatal is not None:
        raise HpsearchError(outcome.fatal)
    if outcome.error is not None:
        raise HpsearchError(f"every trial of this run failed; last error: {outcome.error}")


def _storage_error(error: BaseException, retry_in: float) -> None:
    err_console.print(f"warning: lost the database ({first_line(error)}); going on in {retry_in:g} s", soft_wrap=True)


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


def _trial_row(t: optuna.trial.FrozenTrial) -> dict[str, Any]:
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
        "note": t.user_attrs.get("rejected") or t.user_attrs.get("diverged") or t.user_attrs.get("error"),
        "duration_s": duration,
        "datetime_start": t.datetime_start.isoformat() if t.datetime_start else None,
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
    ranked = [_trial_row(t) for t in complete[:top]]
    if as_json:
        counts = {s.name: sum(t.state == s for t in study.get_trials(deepcopy=False)) for s in TrialState}
        best = dict(ranked[0], config=complete[0].user_attrs.get("config")) if ranked else None
        spec = json.loads(study.user_attrs.get(SPEC_ATTR, "null"))
        print(json.dumps({"study": name, "spec": spec, "counts": counts, "best": best, "top": ranked}, indent=2))
        return
    console.print(summary_table(study))
    if ranked:
        table = Table("rank", "trial", "val acc", "epochs", "s/epoch", "params", title=f"top {len(ranked)}",
                      title_justify="left")
        for i, row in enumerate(ranked, 1):
            spe = row["seconds_per_epoch"]
            table.add_row(str(i), str(row["number"]), f"{row['value']:.4f}", str(row["epochs_run"]),
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
    rows = [_trial_row(t) for t in study.get_trials(deepcopy=False)]
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
    tmp = out.with_name(out.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out)  # never a half-written export
    except OSError as e:
        raise HpsearchError(f"--out: cannot write {str(out)!r} ({e.strerror})") from None
    console.print(f"wrote {len(rows)} trials of study {name!r} to {out}")


@app.command()
def delete(
    name: str = typer.Argument(..., help="Study name."),
    storage: str | None = StorageOpt,
    cache_dir: Path | None = CacheDirOpt,
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Delete a study, its trials and its checkpoints."""
    rdb = open_storage(storage, create=False)
    study = load_existing(rdb, name)
    n = len(study.get_trials(deepcopy=False))
    if not yes:
        if not sys.stdin.isatty():
            raise SpecError(f"delete {name!r}: confirmation needed; pass --yes to delete without asking")
        typer.confirm(f"Delete study {name!r} and its {n} trials?", abort=True)
    optuna.delete_study(study_name=name, storage=rdb)
    shutil.rmtree(checkpoint_dir((cache_dir or datasets.default_cache_dir()) / "checkpoints",
                                 storage_url(storage), name), ignore_errors=True)
    console.print(f"deleted study {name!r} ({n} trials)")


@app.command()
def dashboard(
    storage: str | None = StorageOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8080, "--port", min=1, max=65535, help="Port to listen on."),
) -> None:
    """Browse the studies in optuna-dashboard (blocks; Ctrl-C stops it)."""
    import optuna_dashboard

    rdb = open_storage(storage, create=False)
    console.print(f"optuna-dashboard on http://{host}:{port}/dashboard  (Ctrl-C stops it)")
    try:
        optuna_dashboard.run_server(rdb, host=host, port=port)
    except OSError as e:
        raise HpsearchError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror})") from None
    except KeyboardInterrupt:
        pass


@app.command()
def proxy(
    storage: str | None = StorageOpt,
    host: str = typer.Option(DEFAULT_HOST, "--host", help="Address to listen on (0.0.0.0: every interface; the "
                             "proxy has no authentication, so expose it only on a trusted network)."),
    port: int = typer.Option(DEFAULT_PORT, "--port", min=1, max=65535, help="Port to listen on."),
) -> None:
    """Serve the database to many workers as Optuna's gRPC storage proxy; workers pass --storage grpc://HOST:PORT.
    Behind the proxy there are no heartbeats: a killed worker's trial stays RUNNING and is not retried."""
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
