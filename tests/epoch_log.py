"""Which epochs each trial trained, in every process: what tells a retry that resumed after its checkpoint from one
that trained every epoch again with the same seed (its values are the same either way).

``EPOCH_LOG=DIR`` makes a process that called ``install()`` append ``TRIAL STEP`` to ``DIR/PID.log`` after each
value a trial reports (``optuna.Trial.report``: once per epoch trained, for a study without rungs; a retry's
inherited values are copied, not reported). Run as a script, ``epoch_log.py ARGS`` is tests/chaos_worker.py's
``hpsearch ARGS`` (slow epochs, the worker's pid on each trial) with the log.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from pathlib import Path

ENV = "EPOCH_LOG"


def install() -> None:
    """Patches optuna.Trial.report in this process when EPOCH_LOG is set."""
    directory = os.environ.get(ENV)
    if not directory:
        return
    import optuna

    report = optuna.Trial.report
    path = Path(directory) / f"{os.getpid()}.log"
    path.parent.mkdir(parents=True, exist_ok=True)

    def logged(self: optuna.Trial, value: float, step: int) -> None:
        report(self, value, step)
        with path.open("a") as f:  # a line per write: a process killed mid-way leaves whole lines before it
            f.write(f"{self.number} {step}\n")

    optuna.Trial.report = logged  # type: ignore[method-assign]


def read(directory: Path) -> dict[int, list[int]]:
    """Trial number -> the steps it reported, in order, across every process's log."""
    steps: dict[int, list[int]] = defaultdict(list)
    for log in sorted(directory.glob("*.log")):
        for line in log.read_text().split("\n")[:-1]:  # [:-1]: "" after the last newline, or a cut line
            parts = line.split()
            if len(parts) == 2 and all(p.isdigit() for p in parts):
                steps[int(parts[0])].append(int(parts[1]))
    return dict(steps)


if __name__ == "__main__":
    from tests.chaos_worker import install as slow_epochs

    slow_epochs()
    install()
    from hpsearch.cli import main

    sys.argv = ["hpsearch", *sys.argv[1:]]
    main()
