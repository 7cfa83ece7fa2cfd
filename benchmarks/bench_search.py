"""Search efficiency (issue #11): what test accuracy a study file buys in a fixed wall-clock budget.

    .venv/bin/python benchmarks/bench_search.py studies/mnist-scratch.toml --budget 900 \
        --data-dir ../shared/datasets [--study-seeds 0 1] [--eval-seeds 3] [--top 1] [--out search.md] \
        [--pruners file median successive-halving hyperband hyperband+dead]

For each pruner and study seed, in a fresh SQLite database: `hpsearch run FILE --timeout BUDGET` with no trial-count
limit (no trial starts after BUDGET seconds; the one running finishes), then `hpsearch evaluate NAME --top K --seeds S`
(the best configuration retrained on train+val for its best epoch count, then measured on the test split). The
commands are the CLI a user runs, as subprocesses, so their start-up and data loading are part of the budget.

Printed per study seed (and their mean): best validation accuracy, the best a sampled (not enqueued) trial reached,
test accuracy of the best trial (mean ± std over the evaluate seeds), trials complete / pruned / rejected before
training / failed, epochs trained, the seconds spent in trials that ended at chance (best validation accuracy <=
chance + the dead-trial margin, chance = 1 / --classes) and their share of the run, and the wall time of run and
evaluate. Results are in benchmarks/README.md.

``--eval-epochs N --eval-train-fraction 1`` make the final training longer than the search's (N epochs, the schedule
stretched to N, on every training image): what a study file that searches on a subset for few epochs buys when its
winner is then trained properly. Without them, the study file's ``final`` training applies (else the trial's best
epoch count on the study's images).

``--compare-sampled`` (issue #23, "the search earns its keep"): evaluate also retrains the best complete *enqueued*
trial and the best complete *sampled* one with the same final training and seeds (``evaluate --trial A --trial B``),
and the table says what the search added over its best enqueued row: their test accuracies and the difference.

``--search-code DIR`` runs the search with the hpsearch of another checkout (the "before" figures: ``git worktree add
/tmp/before COMMIT`` and the study file as it was then); evaluate is always this checkout's, so both are measured
with the same ruler. That run gets its own data cache (a cache written by one version is not read by another).

``--pruners`` compares pruners side by side: each replaces the study file's ``pruner`` line (``file`` keeps it); the
``+dead`` presets add dead-trial pruning, the others turn it off. Same study seeds for every pruner, so the enqueued
and random start-up trials are the same and only the pruning differs.
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
from hpsearch.stopping import DEAD_MARGIN  # noqa: E402
from hpsearch.trials import ending, is_enqueued, is_rejected  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# The pruners of the comparison (issue #11), with the knobs the shipped study files use.
PRUNERS = {
    "median": '{ type = "median", n_startup_trials = 2, n_warmup_steps = 1, dead_trial = false }',
    "median+dead": '{ type = "median", n_startup_trials = 2, n_warmup_steps = 1 }',
    "successive-halving": '{ type = "successive-halving", min_resource = 1, reduction_factor = 3, dead_trial = false }',
    "hyperband": '{ type = "hyperband", min_resource = 1, reduction_factor = 3, dead_trial = false }',
    "hyperband+dead": '{ type = "hyperband", min_resource = 1, reduction_factor = 3 }',
}


@dataclass
class Outcome:
    pruner: str
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
    sampled_best: tuple[float, int] | None  # best validation accuracy of a trial the sampler chose (not enqueued)
    epochs: int  # epochs trained in all trials
    test: list[float]  # per evaluate seed
    test_mean: float
    test_std: float  # as `hpsearch evaluate` stores it
    # --compare-sampled: (trial, test mean, test std, seeds) of the best complete enqueued and sampled trials
    enqueued_test: tuple[int, float, float, int] | None = None
    sampled_test: tuple[int, float, float, int] | None = None


def with_key(text: str, key: str, value: str) -> str:
    """The study file's text with its top-level ``key = value`` (TOML) set, added before the first table if absent."""
    first_table = re.search(r"(?m)^\[", text)
    cut = first_table.start() if first_table else len(text)
    head, tail = text[:cut], text[cut:]
    line = f"{key} = {value}"
    if re.search(rf"(?m)^{key}\s*=", head):
        head = re.sub(rf"(?m)^{key}\s*=.*$", lambda _: line, head, count=1)
    else:
        head = head.rstrip("\n") + f"\n{line}\n\n"
    return head + tail


def sampled_best(trials: list[optuna.trial.FrozenTrial]) -> tuple[float, int] | None:
    """The best validation accuracy any epoch of a sampled (not enqueued) trial reached, and that trial's number.

    When a study enqueues a strong row, it is usually the study's best at a small budget whatever the pruner, so
    the best trial alone cannot tell pruners apart; what the sampled trials reached can. A complete trial's value
    counts too: a study with rungs reports its rungs' ends as intermediate values and the last stage only as the
    trial's value."""
    reached = {t.number: [*t.intermediate_values.values(), *([] if t.value is None else [t.value])]
               for t in trials if not is_enqueued(t)}
    sampled = [(max(values), number) for number, values in reached.items() if values]
    return max(sampled) if sampled else None


def best_complete(trials: list[optuna.trial.FrozenTrial], *, enqueued: bool) -> optuna.trial.FrozenTrial | None:
    """The best complete trial that was (or was not) an enqueued row."""
    mine = [t for t in trials if t.state == TrialState.COMPLETE and is_enqueued(t) == enqueued]
    return max(mine, key=lambda t: (t.value or 0.0, -t.number)) if mine else None


def tested(study: optuna.Study, trial: optuna.trial.FrozenTrial | None) -> tuple[int, float, float, int] | None:
    if trial is None:
        return None
    record = results.stored(study).get(trial.number, {})
    runs = record.get("runs", [])
    return trial.number, float(record.get("mean", float("nan"))), float(record.get("std", 0.0)), len(runs)


def hpsearch(*args: str, code: Path = ROOT) -> float:
    """Runs ``hpsearch ARGS`` from the checkout ``code`` (its output goes to this terminal); returns its wall seconds.

    Run in ``code``, as ``python -m`` puts the working directory first on the import path; paths must be absolute."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "hpsearch", *args], check=True, cwd=code,
                   env={**os.environ, "PYTHONPATH": str(code)})
    return time.perf_counter() - start


def one_seed(args: argparse.Namespace, name: str, pruner: str, seed: int, work: Path) -> Outcome:
    text = with_key(args.study_file.read_text(), "seed", str(seed))
    if pruner != "file":
        text = with_key(text, "pruner", PRUNERS[pruner])
    study_file = work / f"study-{pruner}-seed{seed}.toml"
    study_file.write_text(text)
    db = work / f"search-{pruner}-seed{seed}.db"
    storage = f"sqlite:///{db}"
    common = ["--storage", storage, "--data-dir", str(args.data_dir), "--threads", str(args.threads)]
    own_cache = ["--cache-dir", str(work / "cache-search-code")] if args.search_code else []
    run_seconds = hpsearch("run", str(study_file), "--timeout", str(args.budget), "--n-trials", "100000", *common,
                           *own_cache, code=args.search_code or ROOT)
    final = ((["--epochs", args.eval_epochs] if args.eval_epochs is not None else [])
             + (["--train-fraction", str(args.eval_train_fraction)] if args.eval_train_fraction is not None else []))
    eval_seconds = hpsearch("evaluate", name, "--top", str(args.top), "--seeds", str(args.eval_seeds), *final,
                            *common)

    study = optuna.load_study(study_name=name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    pair = [best_complete(trials, enqueued=True), best_complete(trials, enqueued=False)]
    if args.compare_sampled and all(pair):
        named = [a for t in pair if t is not None for a in ("--trial", str(t.number))]
        eval_seconds += hpsearch("evaluate", name, *named, "--seeds", str(args.eval_seeds), *final, *common)
    chance = 1.0 / args.classes + DEAD_MARGIN
    at_chance = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials
                    if t.datetime_complete is not None and t.datetime_start is not None and t.intermediate_values
                    and max(t.intermediate_values.values()) <= chance)
    best = study.best_trial
    stored = results.stored(study).get(best.number, {})
    return Outcome(
        pruner=pruner, seed=seed, run_seconds=run_seconds, eval_seconds=eval_seconds,
        complete=sum(t.state == TrialState.COMPLETE for t in trials),
        pruned=sum(t.state == TrialState.PRUNED and not is_rejected(t) for t in trials),
        rejected=sum(is_rejected(t) for t in trials),
        failed=sum(ending(t) == "failed" for t in trials if t.state.is_finished()),
        at_chance_seconds=at_chance, best_val=float(best.value or 0.0), best_trial=best.number,
        sampled_best=sampled_best(trials), epochs=sum(len(t.intermediate_values) for t in trials),
        test=[r["test_accuracy"] for r in stored.get("runs", [])],
        test_mean=float(stored.get("mean", float("nan"))), test_std=float(stored.get("std", 0.0)),
        enqueued_test=tested(study, pair[0]) if args.compare_sampled else None,
        sampled_test=tested(study, pair[1]) if args.compare_sampled else None,
    )


def table(outcomes: list[Outcome], args: argparse.Namespace) -> str:
    rows = ["| pruner | study seed | best val (trial) | best val of a sampled trial (trial) | test acc of best, "
            "mean ± std (seeds) | complete / pruned / rejected / failed | epochs trained | s in trials at chance "
            "(share) | run s | evaluate s |", "|---" * 10 + "|"]
    for o in outcomes:
        sampled = f"{o.sampled_best[0]:.4f} ({o.sampled_best[1]})" if o.sampled_best else "none"
        rows.append(f"| {o.pruner} | {o.seed} | {o.best_val:.4f} ({o.best_trial}) | {sampled} | "
                    f"{o.test_mean:.4f} ± {o.test_std:.4f} ({len(o.test)}) | "
                    f"{o.complete} / {o.pruned} / {o.rejected} / {o.failed} | {o.epochs} | {o.at_chance_seconds:.0f} "
                    f"({o.at_chance_seconds / o.run_seconds:.0%}) | {o.run_seconds:.0f} | {o.eval_seconds:.0f} |")
    if args.compare_sampled:
        rows += ["", "What the search added over its best enqueued row (same final training, same seeds):", "",
                 "| pruner | study seed | best enqueued: test (trial) | best sampled: test (trial) | sampled - "
                 "enqueued |", "|---" * 5 + "|"]
        for o in outcomes:
            e, p = o.enqueued_test, o.sampled_test
            cells = [f"{t[1]:.4f} ± {t[2]:.4f} ({t[0]}, {t[3]} seeds)" if t else "no complete trial" for t in (e, p)]
            diff = f"{(p[1] - e[1]) * 100:+.2f} points" if e and p else "-"
            rows.append(f"| {o.pruner} | {o.seed} | {cells[0]} | {cells[1]} | {diff} |")
    for pruner in dict.fromkeys(o.pruner for o in outcomes):
        mine = [o for o in outcomes if o.pruner == pruner]
        tests = [o.test_mean for o in mine if o.test]
        if len(mine) > 1 and tests:
            test = f"{statistics.fmean(tests):.4f} ± {statistics.pstdev(tests):.4f} (over study seeds)"
            rows.append(f"| {pruner} | mean | {statistics.fmean(o.best_val for o in mine):.4f} | | {test} | | | | | |")
    final = (f" --epochs {args.eval_epochs}" if args.eval_epochs is not None else "") + (
        f" --train-fraction {args.eval_train_fraction:g}" if args.eval_train_fraction is not None else "")
    return (f"`{args.study_file}`, budget {args.budget:g} s per study seed, evaluate --top {args.top} --seeds "
            f"{args.eval_seeds}{final}\n\n" + "\n".join(rows) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study_file", type=Path)
    parser.add_argument("--budget", type=float, required=True, help="seconds of search per study seed")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--study-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--eval-seeds", type=int, default=3)
    parser.add_argument("--pruners", nargs="+", default=["file"], choices=["file", *PRUNERS],
                        help="pruners to compare ('file': the study file's own)")
    parser.add_argument("--top", type=int, default=1)
    parser.add_argument("--eval-epochs", default=None, help="evaluate --epochs: best | max | N (a longer final "
                        "training, the schedule stretched to N); default: the study file's final, else best")
    parser.add_argument("--compare-sampled", action="store_true",
                        help="also test the best enqueued and the best sampled trial with the same final training")
    parser.add_argument("--eval-train-fraction", type=float,
                        help="evaluate --train-fraction (default: the study's; 1: every training image)")
    parser.add_argument("--classes", type=int, default=10, help="classes of the dataset (chance = 1 / classes)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--workdir", type=Path, help="keep the databases here (default: a temporary directory)")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    parser.add_argument("--search-code", type=Path,
                        help="run the search with the hpsearch checkout in this folder (evaluate uses this one)")
    args = parser.parse_args()
    for path in ("study_file", "data_dir", "workdir", "out", "search_code"):  # the commands run in another folder
        if getattr(args, path) is not None:
            setattr(args, path, getattr(args, path).resolve())
    name = tomllib.loads(args.study_file.read_text())["name"]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        outcomes: list[Outcome] = []
        for pruner in args.pruners:
            for seed in args.study_seeds:
                outcomes.append(one_seed(args, name, pruner, seed, work))
                if args.out:  # after every run, so a long comparison cut short keeps what it measured
                    args.out.write_text(table(outcomes, args))
    print(table(outcomes, args))


if __name__ == "__main__":
    main()
