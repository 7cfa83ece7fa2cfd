"""How steady the probe's step time is: the same probe of the report's base CNN (fp32, batch 64: steps of a few
milliseconds, the hardest case), repeated, timing 3 steps against timing until each dtype has ``train.PROBE_SECONDS``
of steps. What `--precision auto` and the cost caps read is one such probe, so the spread between repeats of the
same probe is how far one decision can be off.

    .venv/bin/python benchmarks/bench_probe.py [--repeats 20] [--threads T]

Printed per setting, the two alternating (a burst of load hits both alike): the probe's per-step median over the
repeats, its range (max/min), its coefficient of variation, the range of the ratio of two consecutive probes (what
a bf16/fp32 comparison of two equal precisions would read), the steps timed and the seconds one probe costs
(its 0.25 s look at the cores included).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a fresh clone without installing
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_train import TRAIN, as_data, base_cnn  # noqa: E402

from hpsearch.devices import configure_threads  # noqa: E402
from hpsearch.train import PROBE_SECONDS, probe_steps  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: available cores)")
    args = ap.parse_args()
    threads = configure_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (5_256, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (5_256,), generator=g)
    data = as_data(x, y, torch.device("cpu"))
    built = base_cnn(data.info)
    print(f"the report's base CNN, batch 64, fp32, {threads} threads, {args.repeats} probes per setting; torch "
          f"{torch.__version__}; {platform.processor() or platform.machine()}", flush=True)
    settings = {"3 steps": 0.0, f">= {PROBE_SECONDS} s of steps": PROBE_SECONDS}
    ms: dict[str, list[float]] = {name: [] for name in settings}
    timed: dict[str, list[int]] = {name: [] for name in settings}
    cost = dict.fromkeys(settings, 0.0)
    for _ in range(args.repeats):
        for name, min_seconds in settings.items():
            t0 = time.perf_counter()
            probe = probe_steps(built, data, TRAIN, torch.device("cpu"), (None,), batch=64, warmup=2,
                                min_seconds=min_seconds)
            cost[name] += time.perf_counter() - t0
            ms[name].append(probe.wall[None] * 1000)
            timed[name].append(probe.timed_steps)
    for name, v in ms.items():
        pairs = [a / b for a, b in zip(v[::2], v[1::2], strict=False)]
        print(f"{name:>20}: median {statistics.median(v):.2f} ms per step, range {min(v):.2f}-{max(v):.2f} "
              f"(max/min {max(v) / min(v):.2f}), cv {statistics.stdev(v) / statistics.mean(v):.3f}; ratio of two "
              f"probes {min(pairs):.2f}-{max(pairs):.2f}; {statistics.median(timed[name]):.0f} steps timed, "
              f"{cost[name] / args.repeats:.2f} s per probe")


if __name__ == "__main__":
    main()
