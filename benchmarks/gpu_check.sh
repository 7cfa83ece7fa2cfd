#!/usr/bin/env bash
# The GPU check of issue 3, one command on a machine with a CUDA GPU (about 3 minutes on one H100):
#   bash benchmarks/gpu_check.sh [DATA_DIR]
# 1. the benchmark's rows 1-3 on the GPU (10,000 images, CIFAR-10 when DATA_DIR has it, else random uint8), with
#    torch.compile timed as well; 2. a 3-trial study on synthetic data with --device cuda, then --workers 2.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DATA=${1:-}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$PY benchmarks/bench_train.py --device cuda --images 10000 --repeats 3 --skip optuna,rss --compile \
    ${DATA:+--data-dir "$DATA"}
WORK=$(mktemp -d)
cat > "$WORK/gpu.toml" <<'TOML'
name = "gpu-check"
dataset = "synthetic:classes=10,size=32,channels=3,train=5000,test=500"
strategy = "scratch"
epochs = 3
n_trials = 3
[space]
augmentation = ["base", "strong", "stronger"]
TOML
$PY -m hpsearch run "$WORK/gpu.toml" --device cuda --storage "sqlite:///$WORK/gpu.db" --cache-dir "$WORK/cache"
$PY -m hpsearch run "$WORK/gpu.toml" --device cuda --storage "sqlite:///$WORK/gpu.db" --cache-dir "$WORK/cache" \
    --n-trials 6 --workers 2
$PY -m hpsearch export gpu-check --storage "sqlite:///$WORK/gpu.db" --out "$WORK/trials.csv"
cut -d, -f1-9 "$WORK/trials.csv"
