# Two set-up commands for a fresh clone: `make demo` and `make test`.
# Every install goes through constraints.txt, the committed lock of the whole environment.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_HOME ?= $(CURDIR)/demo-home

.PHONY: venv demo test lint format lock clean bench

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip==26.3"
	$(BIN)/python -m pip install --quiet --constraint constraints.txt --editable ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	rm -rf "$(DEMO_HOME)"
	TRIALPIPE_HOME="$(DEMO_HOME)" $(BIN)/trialpipe demo

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest

# Throughput of every contender on the same generated files, ratios to plain pydicom I/O,
# in 3 rounds (about 25 minutes); writes docs/benchmarks.md.
# BENCH_ARGS="--ct 200 --mr 0 --small 0 --dag-files 400 --repeat 1" for a quick look.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.run --out docs/benchmarks.md $(BENCH_ARGS)

# Re-resolve the environment from pyproject.toml and rewrite the lock (a deliberate act).
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --upgrade "pip==26.3"
	.lock-venv/bin/python -m pip install --quiet ".[dev]"
	.lock-venv/bin/python -m pip freeze --exclude-editable | grep -vi '^trialpipe' > constraints.txt
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) demo-home
