"""Optuna's noise that hpsearch silences on purpose, in one place (its ExperimentalWarning and log records that say
only what hpsearch expects or reports itself), and the stale-trial reaping every process that holds a storage runs."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import optuna

from hpsearch._errors import HpsearchError


@contextmanager
def quiet_experimental() -> Iterator[None]:
    """Silences Optuna's ExperimentalWarning inside the block: hpsearch chose those features (the heartbeat and its
    stale-trial retry, GPSampler, ...) knowingly, and a warning on every use would only be noise to the user."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def quiet_expected_logs() -> None:
    """Filters Optuna's log records that say only what hpsearch expects or says itself in one line (idempotent).
    Records of Optuna's submodules reach the handlers of the "optuna" logger, not its filters: filter there."""
    for handler in logging.getLogger("optuna").handlers:
        if _expected not in handler.filters:
            handler.addFilter(_expected)


def _expected(record: logging.LogRecord) -> bool:
    # Conditional parameters (momentum for sgd only, ...) make TPE fall back to independent sampling for
    # them; Optuna warns each time. Expected here, so not shown. So are Optuna's reports of a failed trial
    # whose error is an HpsearchError (already a one-line message of ours) and its "failed with value None".
    message = record.getMessage()
    if "sampled independently" in message or (message.startswith("Trial ") and "failed with value None" in message):
        return False
    # Ctrl-C and SIGTERM (a KeyboardInterrupt too): the CLI says in one line what happened to the trial; Optuna's
    # warning would add its traceback.
    # So is the refusal of a late write to a trial another worker failed as stale (run_trials says it in one line).
    return not (record.exc_info and isinstance(record.exc_info[1], HpsearchError | KeyboardInterrupt
                                               | optuna.exceptions.UpdateFinishedTrialError))


def fail_stale(study: optuna.Study) -> None:
    """Fails (and enqueues the retry of) trials whose worker died: their heartbeat is older than the grace period.
    Optuna does this before each trial; hpsearch also does it when a run has no trial to start, so a dead
    worker's trial does not stay RUNNING in a study that has reached its count, and each worker's heartbeat thread
    and ``hpsearch proxy`` do it every ``heartbeat.reap_seconds``. With ``heartbeat.HeartbeatStorage`` a trial without
    a heartbeat (its worker died first) is given one, so it goes stale too, and each stale trial is retried once
    however many processes fail it at the same moment, its FAIL and its retry written in one transaction (a reaper
    killed between the two lost the retry)."""
    with quiet_experimental():
        optuna.storages.fail_stale_trials(study)
