"""The commands that do not train: studies, show, export, report and delete read the study database; dashboard and
proxy serve it; predict runs an exported model. None imports torch (predict only for a TorchScript model)."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

import optuna
import typer
from optuna.trial import TrialState
from rich.table import Table

from hpsearch import results
from hpsearch._attrs import SPEC_ATTR
from hpsearch._display import summary_table
from hpsearch._errors import HpsearchError, SpecError
from hpsearch._paths import default_cache_dir, write_atomically
from hpsearch._secrets import redact_url, scrub
from hpsearch._urls import is_proxy_url
from hpsearch.cli._options import ArtifactsLocation, CacheDir, Storage, StudyName, console, err_console
from hpsearch.proxy import DEFAULT_HOST, DEFAULT_PORT
from hpsearch.storage import open_storage, storage_url
from hpsearch.study import load_existing
from hpsearch.trials import ranked, stop_note


def studies(storage: Storage = None) -> None:
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


def show(
    name: StudyName,
    storage: Storage = None,
    top: int = typer.Option(5, "--top", min=1, help="How many of the best complete trials to list."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """The best trial and the top K complete trials of a study."""
    study = load_existing(open_storage(storage, create=False), name)
    complete = ranked(study)
    tested = results.stored(study)
    rows = [_trial_row(t, tested) for t in complete[:top]]
    if as_json:
        counts = {s.name: sum(t.state == s for t in study.get_trials(deepcopy=False)) for s in TrialState}
        best = dict(rows[0], config=complete[0].user_attrs.get("config")) if rows else None
        spec = json.loads(study.user_attrs.get(SPEC_ATTR, "null"))
        print(json.dumps({"study": name, "spec": spec, "counts": counts, "best": best, "top": rows}, indent=2))
        return
    console.print(summary_table(study))
    if rows:
        table = Table("rank", "trial", "val acc", "test acc", "epochs", "s/epoch", "params", title=f"top {len(rows)}",
                      title_justify="left")
        for i, row in enumerate(rows, 1):
            spe = row["seconds_per_epoch"]
            test = "-" if row["test_accuracy_mean"] is None else (
                f"{row['test_accuracy_mean']:.4f} ± {row['test_accuracy_std']:.4f} ({len(row['test_accuracies'])})")
            table.add_row(str(i), str(row["number"]), f"{row['value']:.4f}", test, str(row["epochs_run"]),
                          "-" if spe is None else f"{spe:.1f}", str(row["param_count"]))
        console.print(table)


def export(
    name: StudyName,
    out: Path = typer.Option(..., "--out", help="Output file: .csv or .json."),
    storage: Storage = None,
) -> None:
    """Write all trials with their params and values to a .csv or .json file."""
    if out.suffix.lower() not in (".csv", ".json"):
        raise SpecError(f"--out: {str(out)!r} must end in .csv or .json")
    study = load_existing(open_storage(storage, create=False), name)
    tested = results.stored(study)
    rows = [_trial_row(t, tested) for t in study.get_trials(deepcopy=False)]
    text = json.dumps(rows, indent=2) if out.suffix.lower() == ".json" else _csv_text(rows)
    if out.is_dir():
        raise SpecError(f"--out: {str(out)!r} is a directory; give a file name ending in .csv or .json")
    try:
        write_atomically(out, text)  # never a half-written export
    except OSError as e:
        raise HpsearchError(f"--out: cannot write {str(out)!r} ({e.strerror})") from None
    console.print(f"wrote {len(rows)} trials of study {name!r} to {out}")


def _csv_text(rows: list[dict[str, Any]]) -> str:
    """export's CSV: one column per row field and per parameter any trial has (``param_<name>``)."""
    params = sorted({k for r in rows for k in r["params"]})
    fields = [k for k in rows[0] if k != "params"] if rows else ["number", "state", "value"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(fields + [f"param_{p}" for p in params])
    for r in rows:
        writer.writerow([r[f] for f in fields] + [r["params"].get(p, "") for p in params])
    return buf.getvalue()


def report(
    names: list[str] = typer.Argument(..., help="Study names (several on one dataset: strategy-vs-cost view)."),
    out: Path = typer.Option(..., "--out", help="Folder for index.html, summary.md and the PNG figures."),
    storage: Storage = None,
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


def delete(
    name: StudyName,
    storage: Storage = None,
    cache_dir: CacheDir = None,
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


def dashboard(
    storage: Storage = None,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8080, "--port", min=1, max=65535, help="Port to listen on."),
    cache_dir: CacheDir = None,
    artifacts_location: ArtifactsLocation = None,
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


def proxy(
    storage: Storage = None,
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
