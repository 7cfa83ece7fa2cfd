"""Which errors mean the database went away (wait and go on) and which mean another worker took this worker's trial
over (go on with the next): read by the run loop (``study.run_trials``) and by the CLI, which names the cause."""

from __future__ import annotations

import optuna
import sqlalchemy

DB_ERRORS = (optuna.exceptions.StorageInternalError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)


def database_error(e: BaseException | None) -> BaseException | None:
    """The database error behind ``e`` (the first in its chain), or None: what to tell the user, not the secondary
    error Optuna raised while handling it (an UnboundLocalError from its clean-up, say)."""
    while e is not None:
        if isinstance(e, DB_ERRORS) or type(e).__module__.startswith("grpc"):
            return e
        e = e.__cause__ or e.__context__
    return None


def lost_database(e: BaseException | None) -> bool:
    """Whether a database error is behind ``e``: Optuna can raise a secondary error while handling one
    (its own clean-up queries fail too), so the whole chain is searched."""
    return database_error(e) is not None


def taken_over(e: BaseException) -> bool:
    """Optuna's refusal to store the result of a trial that another worker has failed as stale meanwhile."""
    return isinstance(e, optuna.exceptions.UpdateFinishedTrialError) or (
        isinstance(e, ValueError) and str(e).startswith("Cannot tell a FAIL trial"))
