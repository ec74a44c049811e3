# One target each for set-up, demo, lint, test and bench.
VENV ?= .venv
PY := $(VENV)/bin/python
SL := $(VENV)/bin/sortline

.PHONY: setup demo lint format test test-all bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-cache-dir torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q --no-cache-dir -e ".[dev]"
	touch $@

## Classify the bundled sample photos through Redis, a Celery worker and SQLite.
demo: setup
	@set -e; trap '$(SL) down' EXIT; \
	$(SL) up --no-flower; \
	$(SL) submit samples -r --wait; \
	$(SL) results latest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

## Lint, then the unit and integration tests (slow and gpu tests excluded).
test: lint
	$(PY) -m pytest

test-all: lint
	$(PY) -m pytest -m "slow or not slow"

bench: setup
	$(PY) bench/throughput.py
	$(PY) bench/tune.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache sortline.db* .sortline
