# Two commands from a fresh clone: `make run` (the default MNIST study) and `make test`.
# The first use creates .venv and installs hpsearch into it (editable, with the dev tools).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.14.1 torchvision==0.29.1
# The development machines keep real datasets in ../shared/datasets; elsewhere hpsearch's own default
# data directory is used (and torchvision downloads what is missing).
DATA ?= $(wildcard ../shared/datasets)
STUDY ?= studies/mnist-fast.toml

$(BIN)/hpsearch: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH) -e '.[dev]'
	touch $@

.PHONY: install run test lint
install: $(BIN)/hpsearch

run: install
	$(BIN)/hpsearch run $(STUDY) $(if $(DATA),--data-dir $(DATA))

# pytest's exit code 5 (no test collected) is a failure, not a pass.
test: install
	$(BIN)/python -m pytest; rc=$$?; if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

lint: install
	$(BIN)/ruff check hpsearch tests benchmarks
	$(BIN)/mypy hpsearch benchmarks  # benchmarks too: they build configs by hand and would rot unseen
