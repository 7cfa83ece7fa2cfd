# Two commands from a fresh clone: `make run` (default MNIST study) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.14.1 torchvision==0.29.1
DATA ?= ../shared/datasets
STUDY ?= studies/mnist-scratch.toml

$(BIN)/hpsearch: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH) -e '.[dev]'
	touch $@

.PHONY: install run test lint
install: $(BIN)/hpsearch

run: install
	$(BIN)/hpsearch run $(STUDY) --data-dir $(DATA)

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check hpsearch tests benchmarks
	$(BIN)/mypy hpsearch
