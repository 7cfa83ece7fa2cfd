"""``hpsearch ARGS`` whose epochs last CHAOS_EPOCH_SECONDS longer and whose trials record the worker's pid.

The chaos tests run this instead of ``python -m hpsearch``: tiny models keep the CPU free on a shared machine
while trials still last long enough to be killed mid-way, and the pid tells the test which worker runs a trial.
"""

from __future__ import annotations

import os
import sys
import time

PID_ATTR = "chaos_pid"


def install() -> None:
    """Patches hpsearch.objective; called before hpsearch.cli is imported, so its (eager or lazy) imports see
    the patched functions. Only in the worker process: importing this module changes nothing."""
    import hpsearch.objective as objective

    _fit = objective.fit
    _make_objective = objective.make_objective

    def slow_fit(*args, on_epoch=None, on_checkpoint=None, **kwargs):
        # The sleep stands in for the next epoch's training, so it comes after this epoch's report and checkpoint.
        # CHAOS_SLEEP_BEFORE_REPORT=1 sleeps between the epoch's training and its report instead: kills land
        # there, where neither the report nor the checkpoint of that epoch has happened.
        before = os.environ.get("CHAOS_SLEEP_BEFORE_REPORT") == "1"
        seconds = float(os.environ.get("CHAOS_EPOCH_SECONDS", "1"))

        def report(epoch, result):
            if before:
                time.sleep(seconds)
            if on_epoch is not None:
                on_epoch(epoch, result)
            if on_checkpoint is None and not before:
                time.sleep(seconds)

        def checkpoint(state):
            on_checkpoint(state)
            if not before:
                time.sleep(seconds)

        return _fit(*args, on_epoch=report, on_checkpoint=None if on_checkpoint is None else checkpoint, **kwargs)

    def tagged_objective(*args, **kwargs):
        inner = _make_objective(*args, **kwargs)

        def tagged(trial):
            trial.set_user_attr(PID_ATTR, os.getpid())
            return inner(trial)

        return tagged

    objective.fit = slow_fit
    objective.make_objective = tagged_objective


if __name__ == "__main__":
    install()
    from hpsearch.cli import main

    sys.argv = ["hpsearch", *sys.argv[1:]]
    main()
