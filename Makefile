# The two commands of the README: `make run` (the quickstart pipeline) and `make test` (the suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build by default; GPU users install their CUDA build of torch into .venv first (see README).
TORCH_SPEC ?= torch==2.13.0
SPEC ?= specs/quickstart.yaml
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: install run test ui bench figures clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/llmcycle run $(SPEC)

test: install
	$(BIN)/python -m pytest; rc=$$?; [ $$rc -eq 5 ] && echo "no tests collected" && exit 0; exit $$rc

ui: install
	$(BIN)/llmcycle ui $(SPEC)

# Each benchmark writes benchmarks/results/<bench>[.<variant>].json (benchmarks/record.py); the table of them
# all follows. `make bench BENCH_ARGS=--quick` for the shortened runs; benchmarks/gpu_check.sh on a CUDA machine.
BENCH_ARGS ?=
bench: install
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b $(BENCH_ARGS) || exit 1; done
	$(BIN)/python benchmarks/report.py

figures: install
	$(BIN)/python docs/figures.py

clean:
	rm -rf runs test-artifacts .pytest_cache
