"""SIGTERM (``docker stop``, Kubernetes pod deletion, preemption): end the running trial now so another worker
resumes it, instead of leaving it RUNNING until its heartbeat goes stale (a minute by default).

The handler raises ``Terminated`` in the main thread. It is a KeyboardInterrupt, so Optuna marks the running trial
FAIL exactly as for Ctrl-C and re-raises it. The objective first asks hpsearch's storage to queue the retry in the
same transaction as that FAIL (``heartbeat.queue_retry_with_fail``: a SIGKILL right after cannot lose it), built as
Optuna's stale-trial callback builds it (same system attrs, inherited intermediate values), so the retry resumes
from the trial's checkpoint; behind the gRPC proxy ``retry_terminated`` queues it afterwards. The command prints
one line and exits 143 (128 + SIGTERM).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

import optuna
from optuna.trial import TrialState

from hpsearch._optuna import quiet_experimental

EXIT_CODE = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """Raised by SIGTERM. The objective sets ``trial_number`` (the trial it ended) on its way out."""

    trial_number: int | None = None
    retried: bool = False


RESEND_SECONDS = 1.0


class _State:
    term: Terminated | None = None  # the one Terminated of this process, once SIGTERM came
    delivered = False  # it reached code that handles it: later SIGTERMs are ignored


_state = _State()


def take_terminated() -> Terminated | None:
    """The Terminated of this process, if SIGTERM came, taken over by the caller: from now on it is being handled,
    and a resent or second SIGTERM raises nothing more."""
    _state.delivered = _state.term is not None
    return _state.term


def delivered(term: Terminated) -> None:
    """Called where a Terminated is caught: cleanup that follows (Optuna storing FAIL) is not interrupted again."""
    _state.delivered = True


def _handler(signum: int, frame: FrameType | None) -> None:
    if _state.delivered:
        return  # a second SIGTERM (a forwarding parent and the process group both send one): already ending
    if _state.term is None:
        _state.term = Terminated()
        threading.Thread(target=_resend, args=(_state.term,), daemon=True).start()
    raise _state.term


def _resend(term: Terminated) -> None:
    # A signal handler's exception is lost when it lands in a __del__ or weakref callback (seen: SQLAlchemy's,
    # "Exception ignored in ..."), so SIGTERM is sent again until some code has handled the Terminated.
    while _state.term is term and not _state.delivered:
        time.sleep(RESEND_SECONDS)
        if _state.term is term and not _state.delivered:  # not a later command's (tests run several in one process)
            os.kill(os.getpid(), signal.SIGTERM)


@contextmanager
def sigterm_ends_trial(print_line: Callable[[str], None]) -> Iterator[None]:
    """Around a command that runs trials: SIGTERM raises Terminated; a Terminated that reaches here is turned into
    one line (``print_line(text)``) and exit 143. Only the main thread can install a handler: elsewhere (a test
    calling the command from a thread) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _handler)
    try:
        yield
    except Terminated as e:
        delivered(e)
        if e.trial_number is not None and e.retried:
            text = (f"terminated (SIGTERM): trial {e.trial_number} was marked FAIL and queued again; "
                    "a worker resumes it from its last checkpoint")
        elif e.trial_number is not None:
            text = (f"terminated (SIGTERM): trial {e.trial_number} was not queued again (its retries are used up, "
                    "or its FAIL could not be stored: then its heartbeat goes stale and it is retried)")
        else:
            text = "terminated (SIGTERM): no trial was running"
        print_line(text)
        raise SystemExit(EXIT_CODE) from None
    finally:
        _state.delivered = True  # stops the resending thread
        if previous is not None:  # None: a handler not set from Python, which cannot be put back
            signal.signal(signal.SIGTERM, previous)
        _state.term, _state.delivered = None, False


def retry_terminated(study: optuna.Study, term: Terminated, *, max_retry: int) -> None:
    """Enqueues the retry of the trial ``term`` ended (Optuna has marked it FAIL by now) unless its FAIL queued it,
    built by Optuna's own stale-trial callback so that it carries ``failed_trial`` / ``retry_history`` and resumes
    like any retry."""
    if term.trial_number is None:
        return
    trials = study.get_trials(deepcopy=False)
    trial = next((t for t in trials if t.number == term.trial_number and t.state == TrialState.FAIL), None)
    if trial is None:
        return  # Optuna could not store FAIL (database gone): its heartbeat goes stale and it is retried then
    if any(t.system_attrs.get("retry_history", [])[-1:] == [trial.number] for t in trials):
        term.retried = True  # queued with the FAIL (heartbeat.queue_retry_with_fail)
        return
    with quiet_experimental():
        callback = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry,
                                                                     inherit_intermediate_values=True)
        before = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
        callback(study, trial)
        term.retried = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,))) > before
