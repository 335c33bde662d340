# The two set-up commands of the README: `make run` and `make test`.
# Each creates the virtual environment it needs from the project's own files.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	touch $@

.PHONY: run test lint bench fuzz
run: $(BIN)/.installed
	$(BIN)/msgledger run --dev

lint: $(BIN)/.installed
	$(BIN)/ruff check daemon tests bench
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q

# schemathesis against a daemon it starts (one process, then two fronts), 10 minutes in all.
fuzz: $(BIN)/.installed
	$(BIN)/python -m tests.test_openapi 600

bench: $(BIN)/.installed
	$(BIN)/python bench/ingest.py
