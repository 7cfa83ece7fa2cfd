"""Search efficiency (issue #11): what test accuracy a study file buys in a fixed wall-clock budget.

    .venv/bin/python benchmarks/bench_search.py studies/mnist-scratch.toml --budget 900 \
        --data-dir ../shared/datasets [--study-seeds 0 1] [--eval-seeds 3] [--top 1] [--out search.md]

For each study seed, in a fresh SQLite database: `hpsearch run FILE --timeout BUDGET` with no trial-count limit
(no trial starts after BUDGET seconds; the one running finishes), then `hpsearch evaluate NAME --top K --seeds S`
(the best configuration retrained on train+val for its best epoch count, then measured on the test split). The
commands are the CLI a user runs, as subprocesses, so their start-up and data loading are part of the budget.

Printed per study seed (and their mean): best validation accuracy, test accuracy of the best trial (mean ± std over
the evaluate seeds), trials complete / pruned / rejected before training / failed, the seconds spent in trials that
ended at chance (best validation accuracy <= chance + the dead-trial margin, chance = 1 / --classes) and their share
of the run, and the wall time of run and evaluate. Results are in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a fresh clone without installing

from hpsearch import results  # noqa: E402
from hpsearch._display import trial_ending  # noqa: E402
from hpsearch.study import DEAD_MARGIN, is_rejected  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Outcome:
    seed: int
    run_seconds: float
    eval_seconds: float
    complete: int
    pruned: int
    rejected: int
    failed: int
    at_chance_seconds: float
    best_val: float
    best_trial: int
    test: list[float]  # per evaluate seed
    test_mean: float
    test_std: float  # as `hpsearch evaluate` stores it


def with_seed(text: str, seed: int) -> str:
    """The study file's text with its top-level ``seed`` set (added before the first table if absent)."""
    first_table = re.search(r"(?m)^\[", text)
    cut = first_table.start() if first_table else len(text)
    head, tail = text[:cut], text[cut:]
    if re.search(r"(?m)^seed\s*=", head):
        head = re.sub(r"(?m)^seed\s*=.*$", f"seed = {seed}", head, count=1)
    else:
        head = head.rstrip("\n") + f"\nseed = {seed}\n\n"
    return head + tail


def hpsearch(*args: str) -> float:
    """Runs ``hpsearch ARGS`` (its output goes to this terminal); returns its wall seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "hpsearch", *args], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - start


def one_seed(args: argparse.Namespace, name: str, seed: int, work: Path) -> Outcome:
    study_file = work / f"study-seed{seed}.toml"
    study_file.write_text(with_seed(args.study_file.read_text(), seed))
    db = work / f"search-seed{seed}.db"
    storage = f"sqlite:///{db}"
    common = ["--storage", storage, "--data-dir", str(args.data_dir), "--threads", str(args.threads)]
    run_seconds = hpsearch("run", str(study_file), "--timeout", str(args.budget), "--n-trials", "100000", *common)
    eval_seconds = hpsearch("evaluate", name, "--top", str(args.top), "--seeds", str(args.eval_seeds), *common)

    study = optuna.load_study(study_name=name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    chance = 1.0 / args.classes + DEAD_MARGIN
    at_chance = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials
                    if t.datetime_complete is not None and t.datetime_start is not None and t.intermediate_values
                    and max(t.intermediate_values.values()) <= chance)
    best = study.best_trial
    stored = results.stored(study).get(best.number, {})
    return Outcome(
        seed=seed, run_seconds=run_seconds, eval_seconds=eval_seconds,
        complete=sum(t.state == TrialState.COMPLETE for t in trials),
        pruned=sum(t.state == TrialState.PRUNED and not is_rejected(t) for t in trials),
        rejected=sum(is_rejected(t) for t in trials),
        failed=sum(trial_ending(t) == "failed" for t in trials if t.state.is_finished()),
        at_chance_seconds=at_chance, best_val=float(best.value or 0.0), best_trial=best.number,
        test=[r["test_accuracy"] for r in stored.get("runs", [])],
        test_mean=float(stored.get("mean", float("nan"))), test_std=float(stored.get("std", 0.0)),
    )


def table(outcomes: list[Outcome], args: argparse.Namespace) -> str:
    rows = ["| study seed | best val (trial) | test acc of best, mean ± std (seeds) | complete / pruned / rejected / "
            "failed | s in trials at chance (share) | run s | evaluate s |", "|---|---|---|---|---|---|---|"]
    for o in outcomes:
        rows.append(f"| {o.seed} | {o.best_val:.4f} ({o.best_trial}) | {o.test_mean:.4f} ± {o.test_std:.4f} "
                    f"({len(o.test)}) | "
                    f"{o.complete} / {o.pruned} / {o.rejected} / {o.failed} | {o.at_chance_seconds:.0f} "
                    f"({o.at_chance_seconds / o.run_seconds:.0%}) | {o.run_seconds:.0f} | {o.eval_seconds:.0f} |")
    if len(outcomes) > 1:
        tests = [o.test_mean for o in outcomes if o.test]
        rows.append(f"| mean | {statistics.fmean(o.best_val for o in outcomes):.4f} | "
                    f"{statistics.fmean(tests):.4f} ± {statistics.pstdev(tests):.4f} (over study seeds) | | | | |")
    return (f"`{args.study_file}`, budget {args.budget:g} s per study seed, evaluate --top {args.top} --seeds "
            f"{args.eval_seeds}\n\n" + "\n".join(rows) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study_file", type=Path)
    parser.add_argument("--budget", type=float, required=True, help="seconds of search per study seed")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--study-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--eval-seeds", type=int, default=3)
    parser.add_argument("--top", type=int, default=1)
    parser.add_argument("--classes", type=int, default=10, help="classes of the dataset (chance = 1 / classes)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--workdir", type=Path, help="keep the databases here (default: a temporary directory)")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = parser.parse_args()
    name = tomllib.loads(args.study_file.read_text())["name"]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        outcomes = [one_seed(args, name, seed, work) for seed in args.study_seeds]
    text = table(outcomes, args)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
