"""Warm start (issue #26): how many trials, and how much time, a Fashion-MNIST study warm-started from an MNIST study
needs to reach the best a cold-started Fashion-MNIST study found.

    .venv/bin/python benchmarks/bench_warm_start.py --data-dir ../shared/datasets [--trials 16] [--top 5] \
        [--epochs 2] [--train-fraction 0.25] [--seed 0]

Three studies of one small-CNN space (no [[enqueue]] rows: nothing but the search and the warm start picks
configurations), each `hpsearch run` as a subprocess, one after the other, in a fresh SQLite database:
  source  MNIST, --trials trials
  cold    Fashion-MNIST, --trials trials
  warm    Fashion-MNIST, --trials trials, ``warm_start = { studies = [source], top = --top }``
Printed: each study's best validation accuracy; for cold and warm, the trials (by number, pruned ones included) and the
seconds of the run until a complete trial first reached the cold study's best, and the warm/cold ratio. The goal
(issue #26): the warm study reaches the cold study's best in <= 50% of the cold study's trials.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import optuna
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[1]
SPACE = """
[space]
conv_layers = [1, 2, 3]
channels = { low = 8, high = 96, log = true }
kernel_size = [3, 5]
padding = "same"
stride = 1
pool = "max"
pool_kernel = 2
batch_norm = [true, false]
fc_layers = [1, 2]
fc_width = { low = 32, high = 256, log = true }
dropout = { low = 0.0, high = 0.5 }
optimizer = ["adam", "sgd"]
lr = { low = 1e-4, high = 1e-1, log = true }
scheduler = ["cosine", "none"]
batch_size = [64, 128]
augmentation = ["none", "base"]
"""


def study_file(name: str, dataset: str, args: argparse.Namespace, extra: str = "") -> str:
    return textwrap.dedent(f"""\
        name = "{name}"
        dataset = "{dataset}"
        strategy = "scratch"
        epochs = {args.epochs}
        n_trials = {args.trials}
        train_fraction = {args.train_fraction}
        seed = {args.seed}
        sampler = {{ type = "tpe", n_startup_trials = 5 }}
        pruner = {{ type = "median", n_startup_trials = 3, n_warmup_steps = 0 }}
        {extra}
        """) + SPACE


def run(path: Path, storage: str, args: argparse.Namespace, cwd: Path) -> None:
    cmd = [sys.executable, "-m", "hpsearch", "run", str(path), "--storage", storage, "--data-dir", args.data_dir,
           "--no-artifacts"]
    print("$", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    if done.returncode != 0:
        sys.exit(f"{path.name} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")


def first_reaching(study: optuna.Study, value: float) -> tuple[int, float] | None:
    """(trials run up to and including the first complete trial with value >= ``value``, seconds since the first
    trial started) or None."""
    trials = sorted(study.trials, key=lambda t: t.number)
    start = min(t.datetime_start for t in trials if t.datetime_start)
    for i, t in enumerate(trials, 1):
        if t.state == TrialState.COMPLETE and t.value is not None and t.value >= value and t.datetime_complete:
            return i, (t.datetime_complete - start).total_seconds()
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-fraction", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.data_dir = str(Path(args.data_dir).resolve())
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        storage = f"sqlite:///{work / 'bench.db'}"
        files = {
            "source": study_file("ws-mnist", "mnist", args),
            "cold": study_file("ws-fashion-cold", "fashion-mnist", args),
            "warm": study_file("ws-fashion-warm", "fashion-mnist", args,
                               f'warm_start = {{ studies = ["ws-mnist"], top = {args.top} }}'),
        }
        studies = {}
        for key, text in files.items():
            path = work / f"{key}.toml"
            path.write_text(text)
            run(path, storage, args, work)
            name = text.split('"')[1]
            studies[key] = optuna.load_study(study_name=name, storage=storage)
        cold_best = studies["cold"].best_value
        cold = first_reaching(studies["cold"], cold_best)
        warm = first_reaching(studies["warm"], cold_best)
        assert cold is not None
        print(f"\nCPU: {cpu}; {args.trials} trials per study, {args.epochs} epochs on {args.train_fraction:.0%} of the "
              f"training images, seed {args.seed}, warm start top {args.top}")
        print("| study | best val acc | trials to reach cold's best | seconds to it |")
        print("|---|---|---|---|")
        for key in ("source", "cold", "warm"):
            reach = {"cold": cold, "warm": warm}.get(key)
            cells = ("-", "-") if key == "source" else (
                ("not reached", "-") if reach is None else (str(reach[0]), f"{reach[1]:.0f}"))
            print(f"| {studies[key].study_name} | {studies[key].best_value:.4f} | {cells[0]} | {cells[1]} |")
        if warm is not None:
            print(f"warm/cold: {warm[0] / cold[0]:.2f} of the trials, {warm[1] / max(cold[1], 1e-9):.2f} of the time "
                  f"(goal: <= 0.50 of the trials)")
        warm_rows = [t.number for t in studies["warm"].trials if "warm_start" in t.user_attrs]
        print(f"warm-started trials: {warm_rows}; best warm trial {studies['warm'].best_trial.number} "
              f"({'warm-started' if studies['warm'].best_trial.number in warm_rows else 'sampled'})")


if __name__ == "__main__":
    main()
