# `make demo` runs the reference lifecycle across three local deployments, `make serve` runs
# trustplane on the embedded default, `make test` runs every check, `make fast` every check but the
# end-to-end tests (the edit loop).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo serve test fast lint types unit unit-fast venv clean bench bench-lifecycle

$(BIN)/trustplane: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

venv: $(BIN)/trustplane

# one worker per core on the embedded default (docs/operations.md "Several workers on SQLite")
WORKERS ?= $(shell nproc 2>/dev/null || echo 1)

demo: venv
	$(BIN)/trustplane demo

serve: venv
	$(BIN)/trustplane serve --workers $(WORKERS)

lint: venv
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples

types: venv
	$(BIN)/mypy --strict src/

# --durations: the slowest tests, printed at the end of every run, so that slow ones get noticed.
# -n: pytest-xdist workers, one per core by default; --dist loadfile keeps each test file on one
# worker, so that a module's shared server starts once (tests/parallel.py: what runs alone).
TEST_WORKERS ?= auto
PYTEST := $(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile --durations=15

unit: venv
	$(PYTEST)

unit-fast: venv
	$(PYTEST) -m "not e2e"

test: lint types unit

fast: lint types unit-fast

bench: venv
	$(BIN)/python bench/token_endpoint.py

# every service on this machine: PostgreSQL and NATS on 127.0.0.1 (docs/settlement.md "Numbers")
bench-lifecycle: venv
	$(BIN)/python bench/lifecycle.py

clean:
	rm -rf $(VENV) .trustplane .pytest_cache .mypy_cache .ruff_cache
