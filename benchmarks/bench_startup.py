"""Cold start of each CLI command: wall time of `python -m hpsearch ...` in a fresh process, from exec to exit.

    .venv/bin/python benchmarks/bench_startup.py [--repeats 5]

Each command runs against a throwaway SQLite database holding one study of 20 trials (made with Optuna, no
training), so every command does its real work. `dashboard` is left out: it serves until stopped (its start-up
imports are checked by tests/test_startup.py). The table gives the median and the minimum over --repeats runs
(on a shared machine other processes only ever add time), plus the same for `python -c "import torch"` as the
cost the non-training commands avoid. Results and the machine are in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        url = f"sqlite:///{work / 'bench.db'}"
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(study_name="bench", storage=url, direction="maximize")
        study.optimize(lambda t: t.suggest_float("lr", 1e-4, 1e-1, log=True), n_trials=20)
        env = {**os.environ, "HPSEARCH_STORAGE": url, "PYTHONPATH": str(ROOT), "COLUMNS": "120"}
        hp = [sys.executable, "-m", "hpsearch"]
        rows = {
            "hpsearch --help": hp + ["--help"],
            "hpsearch run --help": hp + ["run", "--help"],
            "hpsearch studies": hp + ["studies"],
            "hpsearch show bench": hp + ["show", "bench"],
            "hpsearch show bench --json": hp + ["show", "bench", "--json"],
            "hpsearch export bench --out t.csv": hp + ["export", "bench", "--out", "t.csv"],
            "python -c 'import torch' (for scale)": [sys.executable, "-c", "import torch"],
        }
        for cmd in rows.values():  # one untimed run each: the page cache is warm for every row alike
            timed(cmd, work, env)
        machine = platform.processor() or platform.machine()
        print(f"{machine}, {os.cpu_count()} cores, Python {platform.python_version()}, {args.repeats} runs each")
        print("| command | median s | min s |\n|---|---|---|")
        for name, cmd in rows.items():
            times = [timed(cmd, work, env) for _ in range(args.repeats)]
            print(f"| `{name}` | {statistics.median(times):.2f} | {min(times):.2f} |", flush=True)


if __name__ == "__main__":
    main()
