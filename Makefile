# One place for the project's install and test steps; README and .ci/run call these.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: dev test lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

dev: $(BIN)/python
	$(BIN)/pip install --quiet -e ".[dev]"

test: dev
	$(BIN)/python -m pytest

lint: dev
	$(BIN)/ruff check datagen tests examples
	$(BIN)/mypy datagen
