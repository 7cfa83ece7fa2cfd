"""The consoles every command prints on, and the options several commands share, each declared once as an
``Annotated`` alias (``storage: Storage = None``): its flag, environment variable and help text live here."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from hpsearch.session import Consoles, RunOptions

# markup off: messages carry user text such as "[space]" that rich would otherwise take for a style tag.
console = Console(highlight=False, markup=False)
err_console = Console(stderr=True, highlight=False, markup=False)
CONSOLES = Consoles(out=console, err=err_console)

StudyFile = Annotated[Path, typer.Argument(help="A study file (studies/*.toml).")]
StudyName = Annotated[str, typer.Argument(help="Study name.")]
Storage = Annotated[str | None, typer.Option(
    "--storage", envvar="HPSEARCH_STORAGE", show_default="sqlite:///hpsearch.db",
    help="SQLAlchemy URL of the study database, or grpc://host:port of `hpsearch proxy`.")]
DataDir = Annotated[Path | None, typer.Option(
    "--data-dir", envvar="HPSEARCH_DATA", show_default="~/.cache/hpsearch/data",
    help="Where datasets are looked for (may be read-only).")]
CacheDir = Annotated[Path | None, typer.Option(
    "--cache-dir", envvar="HPSEARCH_CACHE", show_default="~/.cache/hpsearch/cache",
    help="Decoded datasets, downloads and trial checkpoints.")]
Device = Annotated[str, typer.Option(
    "--device", help="auto | cpu | cuda | cuda:N | mps (auto: CUDA, then MPS, then CPU).")]
NTrials = Annotated[int | None, typer.Option(
    "--n-trials", min=1, help="Run until the study holds this many finished trials.")]
Timeout = Annotated[float | None, typer.Option(
    "--timeout", min=1, help="Stop starting trials after this many seconds.")]
Threads = Annotated[int | None, typer.Option(
    "--threads", min=1, help="CPU threads for training (default: available cores).")]
Workers = Annotated[int, typer.Option(
    "--workers", min=1, help="Worker processes here: GPUs dealt round robin, CPU cores split between them.")]
Compile = Annotated[bool, typer.Option(
    "--compile", help="torch.compile each trial's model (see benchmarks/README.md).")]
ArtifactsLocation = Annotated[str | None, typer.Option(
    "--artifacts", envvar="HPSEARCH_ARTIFACTS", show_default="<cache dir>/artifacts",
    help="Artifact store for checkpoints: a directory (shared by the workers) or s3://bucket/prefix (pip install "
         "'hpsearch[s3]'). Recorded on the study.")]
KeepCheckpoints = Annotated[int, typer.Option(
    "--keep-checkpoints", min=0, envvar="HPSEARCH_KEEP_CHECKPOINTS",
    help="Keep the checkpoints of the K best complete trials (0: delete each once its trial has finished).")]
Precision = Annotated[str, typer.Option(
    "--precision", envvar="HPSEARCH_PRECISION",
    help="auto | fp32 | bf16 | fp16 (auto: CUDA's mixed precision; on a CPU with native bf16, whichever of fp32 and "
         "bf16 a few timed steps of each trial find faster).")]
NoArtifacts = Annotated[bool, typer.Option(
    "--no-artifacts",
    help="No per-trial PNGs and notes for optuna-dashboard; checkpoints still go to the artifact store (see "
         "benchmarks/README.md).")]


def run_options(ctx: typer.Context) -> RunOptions:
    """The RunOptions of ``run`` or ``worker``, from the options the command parsed (``ctx.params``, by parameter
    name): each command declares its options once, in its signature, and none repeats a call naming every one."""
    params: dict[str, Any] = dict(ctx.params)
    names = {f.name for f in dataclasses.fields(RunOptions)}
    return RunOptions(explain=not params.pop("no_artifacts"), **{k: v for k, v in params.items() if k in names})
