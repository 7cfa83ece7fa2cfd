"""The ``hpsearch`` command line: each command parses, delegates, and turns errors into one line and an exit code.

Exit codes: 0 ok, 2 bad input (study file, option values, unknown study), 1 any other failure, 130 interrupted.

The commands live in ``_train`` (run, worker, create, evaluate, reproduce, export-model: the run session and the
retrainings) and ``_browse`` (the commands that only read, serve or predict); the options several commands share
are declared once in ``_options``. They are registered here.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from typing import NoReturn

import optuna
import typer

from hpsearch._errors import HpsearchError, SpecError
from hpsearch._secrets import scrub, scrub_log_records
from hpsearch.cli import _browse, _train
from hpsearch.cli._options import console, err_console

__all__ = ["app", "console", "err_console", "main", "usage_message"]

# Modules that import torch (data, devices, launch, objective, spec, strategies, train) are imported inside the
# commands, and the run session's steps, that need them: torch takes seconds to import, and `--help`, `studies`,
# `show`, `export`, `delete` and `dashboard` never need it (tests/test_startup.py).

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Optuna hyperparameter search for image-classification CNNs.")
# In the order `hpsearch --help` lists them.
app.command("run")(_train.run)
app.command("worker")(_train.worker)
app.command("evaluate")(_train.evaluate)
app.command("reproduce")(_train.reproduce)
app.command("studies")(_browse.studies)
app.command("show")(_browse.show)
app.command("export")(_browse.export)
app.command("report")(_browse.report)
app.command("delete")(_browse.delete)
app.command("dashboard")(_browse.dashboard)
app.command("create")(_train.create)
app.command("proxy")(_browse.proxy)
app.command("export-model")(_train.export_model)
app.command("predict")(_browse.predict)


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
