"""A busy machine (issue #23): the same study run for the same budget twice, idle and beside CPU-bound processes.

    .venv/bin/python benchmarks/bench_busy.py studies/mnist-fast.toml --data-dir ../shared/datasets \
        [--budget 660] [--hogs 1] [--workdir DIR]

Each run is ``hpsearch run FILE --timeout BUDGET`` in a fresh SQLite database, as a subprocess (the CLI a user runs:
start-up, data loading and the OpenMP set-up included). The busy run starts ``--hogs`` single-threaded busy
processes (``while True: pass``) just before and kills them after. Printed per run: finished trials (configurations
seen), complete, pruned, refused or pruned for time (``max_seconds_per_epoch``), whether every enqueued row trained,
and the median wall and cost-clock seconds per epoch of the first enqueued trial. The goal: the busy run refuses
none of the enqueued rows for time and finishes at least half the trials the idle one does.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a fresh clone without installing

from hpsearch.trials import COST_CAP_ATTR, counts_toward_n_trials, is_enqueued  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run(study_file: Path, budget: float, data_dir: Path, work: Path, label: str, hogs: int) -> dict[str, Any]:
    db = work / f"{label}.db"
    db.unlink(missing_ok=True)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(hogs)]
    try:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "hpsearch", "run", str(study_file), "--timeout", str(budget),
                        "--storage", f"sqlite:///{db}", "--data-dir", str(data_dir), "--no-artifacts"],
                       check=True, cwd=work, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
    finally:
        for p in busy:
            p.kill()
            p.wait()
    name = tomllib.loads(study_file.read_text())["name"]
    trials = optuna.load_study(study_name=name, storage=f"sqlite:///{db}").get_trials(deepcopy=False)
    timed = [t for t in trials if t.user_attrs.get(COST_CAP_ATTR) == "max_seconds_per_epoch"]  # refused or stopped
    enqueued = [t for t in trials if is_enqueued(t)]
    first = enqueued[0] if enqueued else None
    return {
        "run": label, "seconds": seconds,
        "finished": sum(counts_toward_n_trials(t) for t in trials),
        "complete": sum(t.state == TrialState.COMPLETE for t in trials),
        "for_time": len(timed),
        "enqueued_refused": len({t.number for t in timed} & {t.number for t in enqueued}),
        "enqueued": len(enqueued),
        "wall": None if first is None else first.user_attrs.get("seconds_per_epoch"),
        "cost": None if first is None else first.user_attrs.get("cost_seconds_per_epoch"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study_file", type=Path)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--budget", type=float, default=660)
    parser.add_argument("--hogs", type=int, default=1)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    with tempfile.TemporaryDirectory() as tmp:
        work = (args.workdir or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        rows = [run(args.study_file.resolve(), args.budget, args.data_dir.resolve(), work, "idle", 0),
                run(args.study_file.resolve(), args.budget, args.data_dir.resolve(), work, "busy", args.hogs)]
    print(f"{args.study_file}, --timeout {args.budget:g}; {cpu}, {len(os.sched_getaffinity(0))} cores; busy: "
          f"{args.hogs} single-threaded busy process(es)")
    print("| run | wall s | finished trials | complete | refused or pruned for time | enqueued rows refused for "
          "time | first enqueued trial: wall s/epoch, cost-clock s/epoch |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        first = "-" if r["wall"] is None else f"{r['wall']:.1f}, {r['cost']:.1f}"
        print(f"| {r['run']} | {r['seconds']:.0f} | {r['finished']} | {r['complete']} | {r['for_time']} | "
              f"{r['enqueued_refused']} of {r['enqueued']} | {first} |")
    idle, busy = rows
    share = busy["finished"] / max(1, idle["finished"])
    print(f"\nbusy / idle finished trials: {share:.2f} (goal >= 0.5: {'met' if share >= 0.5 else 'MISSED'}); "
          f"enqueued refused for time when busy: {busy['enqueued_refused']} (goal 0: "
          f"{'met' if busy['enqueued_refused'] == 0 else 'MISSED'})")


if __name__ == "__main__":
    main()
