"""Do cheap trainings rank configurations the way a full one does? (issue #23, "screen many configurations cheaply")

    .venv/bin/python benchmarks/bench_fidelity.py studies/cifar10-fast.toml --data-dir ../shared/datasets \
        --configs 8 --fidelities 2x0.05,4x0.1,10x0.2,10x0.5 [--out fidelity.jsonl]

Configurations: the study file's [[enqueue]] rows, then random samples of its [space] (Optuna's RandomSampler, seed
0; samples over the study's max_flops are skipped), up to ``--configs``. Each is trained at every fidelity
``EPOCHSxFRACTION``: a complete schedule of EPOCHS epochs (the LR schedule run to its end) on FRACTION of the training
split (its first images: a random subset), validated on the study's whole validation split, in the precision a trial
would choose. As in a search with rungs, the cheaper fidelities report their best validation accuracy and the last
one the final model's with the study's test-time augmentation. The same seed per configuration at every fidelity.
Printed: each configuration's accuracy per fidelity, then per fidelity the Spearman rank correlation with the last
(most expensive) fidelity, whether it picks the same best configuration, and its cost in seconds. Every result is
appended to ``--out`` as one JSON line as soon as it is measured (a killed run keeps what it measured; ``--resume``
skips what the file holds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import optuna
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpsearch._errors import Rejected  # noqa: E402
from hpsearch.data import Data, Split, load  # noqa: E402
from hpsearch.devices import choose_precision, configure_threads, precision_candidates, precision_name  # noqa: E402
from hpsearch.explain import summarize  # noqa: E402
from hpsearch.saved_model import replay  # noqa: E402
from hpsearch.spec import load_spec, split_row  # noqa: E402
from hpsearch.strategies import STRATEGIES  # noqa: E402
from hpsearch.train import fit, probe_precisions  # noqa: E402


def configurations(spec, info, n: int) -> list[dict]:
    """The enqueued rows, then random samples of the space that build and fit under max_flops."""
    strategy = STRATEGIES[spec.strategy]
    out = [split_row(row)[0] for row in spec.enqueue][:n]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    tries = 0
    while len(out) < n and tries < 50 * n:
        tries += 1
        trial = study.ask()
        try:
            config = strategy.suggest(trial, spec.space, spec.epochs, info)
        except Rejected:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        study.tell(trial, 0.0)
        if spec.max_flops is not None:
            macs = summarize(strategy.build(config, info).model, channels=info.channels,
                             size=(info.height, info.width)).macs
            if macs > spec.max_flops:
                continue
        out.append(dict(trial.params))
    return out


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):  # ties share their mean rank
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    if len(a) < 3 or statistics.pstdev(ra) == 0 or statistics.pstdev(rb) == 0:
        return float("nan")
    return statistics.correlation(ra, rb)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study_file", type=Path)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "hpsearch" / "cache")
    parser.add_argument("--configs", type=int, default=8)
    parser.add_argument("--fidelities", default="2x0.05,4x0.1,10x0.2,10x0.5")
    parser.add_argument("--out", type=Path, default=Path("fidelity.jsonl"))
    parser.add_argument("--resume", action="store_true", help="skip the (config, fidelity) pairs --out holds")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    configure_threads(args.threads)
    device = torch.device("cpu")
    spec = load_spec(args.study_file)
    fidelities = [(int(e), float(f)) for e, f in (x.split("x") for x in args.fidelities.split(","))]
    data = load(spec.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir, device=device,
                val_fraction=spec.val_fraction, train_fraction=1.0, seed=spec.seed)
    strategy = STRATEGIES[spec.strategy]
    configs = configurations(spec, data.info, args.configs)
    done: dict[tuple[int, int, float], dict] = {}
    if args.resume and args.out.exists():
        for line in args.out.read_text().splitlines():
            r = json.loads(line)
            done[(r["config"], r["epochs"], r["fraction"])] = r
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    print(f"{spec.dataset}: {len(data.train)} train / {len(data.val)} val; {len(configs)} configurations; fidelities "
          f"{args.fidelities}; {cpu}; tta {spec.tta}", flush=True)
    for c, params in enumerate(configs):
        config = strategy.suggest(replay(params, spec.space), spec.space, spec.epochs, data.info)
        for epochs, fraction in fidelities:
            if (c, epochs, fraction) in done:
                continue
            n = max(2, round(len(data.train) * fraction))
            subset = Data(train=Split(data.train.x[:n], data.train.y[:n]), val=data.val, info=data.info)
            seed = 1000 + c
            torch.manual_seed(seed)
            built = strategy.build(config, data.info)
            train = replace(config.train, epochs=epochs)
            candidates = precision_candidates("auto", device)
            amp = candidates[0] if len(candidates) == 1 else choose_precision(
                probe_precisions(built, subset, train, device, candidates).cost)
            start = time.perf_counter()
            tta = spec.tta if (epochs, fraction) == fidelities[-1] else "none"
            result = fit(built, subset, train, device=device, seed=seed, amp=amp, tta=tta)
            value = result.final_accuracy if result.final_accuracy is not None else result.best_val_accuracy
            record = {"config": c, "epochs": epochs, "fraction": fraction, "images": n, "value": value,
                      "best_val": result.best_val_accuracy, "seconds": time.perf_counter() - start,
                      "precision": precision_name(amp), "params": params}
            done[(c, epochs, fraction)] = record
            with args.out.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"config {c:>2}  {epochs:>2} epochs x {fraction:<5} ({n:>5} images)  val {value:.4f}  "
                  f"{record['seconds']:6.1f} s", flush=True)
    top = fidelities[-1]
    reference = [done[(c, *top)]["value"] for c in range(len(configs))]
    print(f"\n| fidelity | images x epochs | seconds per config (mean) | Spearman vs {top[0]}x{top[1]} | "
          "same best config |")
    print("|---|---|---|---|---|")
    for epochs, fraction in fidelities:
        values = [done[(c, epochs, fraction)]["value"] for c in range(len(configs))]
        seconds = statistics.fmean(done[(c, epochs, fraction)]["seconds"] for c in range(len(configs)))
        same = max(range(len(values)), key=values.__getitem__) == max(range(len(reference)),
                                                                      key=reference.__getitem__)
        print(f"| {epochs}x{fraction} | {done[(0, epochs, fraction)]['images']} x {epochs} | {seconds:.0f} | "
              f"{spearman(values, reference):.2f} | {'yes' if same else 'no'} |")


if __name__ == "__main__":
    main()
