"""Exported models against PyTorch on the WHOLE test split, and `hpsearch predict` on N JPEG files.

    .venv/bin/python benchmarks/bench_export.py NAME [--storage URL] [--trial N] [--seed I] [--images 1000]
        [--data-dir DIR] [--cache-dir DIR]
    .venv/bin/python benchmarks/bench_export.py --quick      # a tiny synthetic study made here: checks the script runs

For a study with a model saved by `hpsearch evaluate --save` (export-model retrains one otherwise), it exports the
trial's model as ONNX and as TorchScript (`hpsearch export-model`, timed), then on every test image:
- argmax agreement and max |logit diff| of each exported file (onnxruntime / torch.jit.load) against PyTorch's
  Classifier (`hpsearch.load_model` of the saved model);
- each one's test accuracy next to the one `evaluate` stored for that seed (evaluate may have measured in bf16 on a
  CPU with native bf16: a few images' argmax can then differ).
Then it writes N test images as JPEG files (quality 95; cycled when the test split is smaller) and times
`hpsearch predict MODEL DIR --json` as a fresh process: start-up is a call on ONE image (interpreter, imports,
session, one decode), and the time for N images minus that start-up is the per-image cost. Goal (issue #26): 1,000
JPEGs in under 10 s excluding start-up; start-up under 2 s. Reading the test split here is the benchmark's business
only: the product's one reader is `hpsearch evaluate`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
QUICK_STUDY = """\
name = "bench-export"
dataset = "synthetic:classes=10,size=32,channels=3,train=512,test=256"
strategy = "scratch"
epochs = 1
n_trials = 1
pruner = "none"
tta = "flip"

[space]
conv_layers = 2
channels = 8
padding = "same"
stride = 1
fc_layers = 1
batch_size = 64
optimizer = "adam"
"""


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return "unknown CPU"


def cli(args: list[str], *, cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "hpsearch", *args], cwd=cwd, env=env, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"hpsearch {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
    return seconds, done.stdout


def compare(reference: np.ndarray, got: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {"agreement": float((reference.argmax(1) == got.argmax(1)).mean()),
            "max_diff": float(np.abs(reference.astype(np.float64) - got).max()),
            "accuracy": float((got.argmax(1) == labels).mean())}


def logits_in_batches(run: Any, x: np.ndarray, batch: int = 256) -> np.ndarray:
    return np.concatenate([run(x[i : i + batch]) for i in range(0, len(x), batch)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", help="study name (with a model saved by evaluate --save)")
    parser.add_argument("--storage", default=os.environ.get("HPSEARCH_STORAGE", "sqlite:///hpsearch.db"))
    parser.add_argument("--trial", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=1000, help="JPEG files predict is timed on")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("--quick", action="store_true", help="a tiny synthetic study made here, 100 images")
    args = parser.parse_args()
    if not args.quick and not args.name:
        parser.error("give a study NAME, or --quick")

    import torch
    from PIL import Image

    import hpsearch
    from hpsearch import data as datasets
    from hpsearch._paths import default_cache_dir, default_data_dir
    from hpsearch.storage import open_storage
    from hpsearch.study import load_existing, load_spec_from_study

    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        work = Path(tmp)
        cwd = Path.cwd()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
        if args.quick:
            cwd = work
            args.name, args.storage, args.images = "bench-export", f"sqlite:///{work / 'bench.db'}", 100
            env |= {"HPSEARCH_CACHE": str(work / "cache"), "HPSEARCH_DATA": str(work / "data")}
            (work / "study.toml").write_text(QUICK_STUDY)
            cli(["run", "study.toml", "--storage", args.storage], cwd=cwd, env=env)
            cli(["evaluate", args.name, "--seeds", "1", "--save", "models", "--storage", args.storage],
                     cwd=cwd, env=env)
        env["HPSEARCH_STORAGE"] = args.storage
        if args.data_dir:
            env["HPSEARCH_DATA"] = str(args.data_dir.resolve())
        if args.cache_dir:
            env["HPSEARCH_CACHE"] = str(args.cache_dir.resolve())
        picked = [] if args.trial is None else ["--trial", str(args.trial)]

        # ---------------------------------------------------------------- export, both formats
        exported: dict[str, tuple[Path, dict[str, Any], float]] = {}
        for fmt, name in (("onnx", "model.onnx"), ("torchscript", "model.pt")):
            out = work / "exported" / name
            seconds, _ = cli(["export-model", args.name, *picked, "--seed", str(args.seed), "--out", str(out)],
                                  cwd=cwd, env=env)
            exported[fmt] = (out, json.loads(out.with_name(name + ".json").read_text()), seconds)
        card = exported["onnx"][1]
        source = Path(card["source"]["model"])
        source = source if source.is_absolute() else cwd / source

        # ---------------------------------------------------------------- the whole test split
        rdb = open_storage(args.storage, create=False)
        spec = load_spec_from_study(rdb, args.name)
        record = load_existing(rdb, args.name).user_attrs[f"evaluate:{card['trial']}"]
        stored_accuracy = record["runs"][args.seed]["test_accuracy"]
        precision = record["runs"][args.seed].get("precision", "fp32")
        data_dir = Path(env.get("HPSEARCH_DATA") or default_data_dir())
        cache_dir = Path(env.get("HPSEARCH_CACHE") or default_cache_dir())
        test = datasets.load_test(spec.dataset, data_dir=data_dir, cache_dir=cache_dir, device=torch.device("cpu"))
        x, labels = test.x.numpy(), test.y.numpy()
        model = hpsearch.load_model(source)

        def run_torch(batch: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model(torch.from_numpy(batch)).numpy()

        import onnxruntime as ort

        session = ort.InferenceSession(str(exported["onnx"][0]), providers=["CPUExecutionProvider"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit's deprecation notice
            scripted = torch.jit.load(str(exported["torchscript"][0]))

        def run_onnx(batch: np.ndarray) -> np.ndarray:
            return np.asarray(session.run(None, {"images": batch})[0])

        def run_ts(batch: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return scripted(torch.from_numpy(batch)).numpy()

        reference = logits_in_batches(run_torch, x)
        fidelity = {"PyTorch (load_model)": compare(reference, reference, labels),
                    "ONNX (onnxruntime)": compare(reference, logits_in_batches(run_onnx, x), labels),
                    "TorchScript (torch.jit.load)": compare(reference, logits_in_batches(run_ts, x), labels)}

        # ---------------------------------------------------------------- predict on N JPEG files
        folder = work / "jpegs"
        folder.mkdir()
        for i in range(args.images):
            image = x[i % len(x)]
            Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(
                folder / f"{i:05d}.jpg", quality=95)
        one = folder / "00000.jpg"
        timing = {}
        for fmt, (out, _, _) in exported.items():
            cli(["predict", str(out), str(one), "--json"], cwd=cwd, env=env)  # warm the page cache
            startup = statistics.median(cli(["predict", str(out), str(one), "--json"], cwd=cwd, env=env)[0]
                                        for _ in range(3))
            total, output = cli(["predict", str(out), str(folder), "--json"], cwd=cwd, env=env)
            assert len(output.splitlines()) == args.images
            timing[fmt] = (startup, total)

    # ---------------------------------------------------------------- report
    print(f"study {args.name!r} trial {card['trial']} seed {args.seed} ({spec.dataset}, {len(x)} test images); "
          f"CPU: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, onnxruntime {ort.__version__}")
    print(f"export-model wall time: onnx {exported['onnx'][2]:.1f} s, torchscript {exported['torchscript'][2]:.1f} s "
          "(a fresh process each, its check and latency runs included)")
    print()
    print(f"| runtime | argmax agreement vs PyTorch | max abs logit diff | test acc (fp32) | evaluate's stored test "
          f"acc (trained in {precision}) |")
    print("|---|---|---|---|---|")
    for name, row in fidelity.items():
        print(f"| {name} | {row['agreement']:.4%} | {row['max_diff']:.2g} | {row['accuracy']:.4f} | "
              f"{stored_accuracy:.4f} |")
    print()
    print(f"| predict | start-up s (1 image) | {args.images} JPEGs s (excl. start-up) | ms/image | card latency "
          "ms/image b1 / b64 |")
    print("|---|---|---|---|---|")
    for fmt, (startup, total) in timing.items():
        lat = exported[fmt][1]["latency_ms_per_image"]
        print(f"| {fmt} | {startup:.2f} | {total - startup:.2f} | {1000 * (total - startup) / args.images:.2f} | "
              f"{lat['batch_1']:.3g} / {lat['batch_64']:.3g} |")
    print()
    print(textwrap.fill("Goal: ONNX predict on 1,000 JPEGs under 10 s excluding start-up, start-up under 2 s. "
                        "Start-up is the median of 3 one-image calls.", 118))


if __name__ == "__main__":
    main()
