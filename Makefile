# Two commands: `make serve` runs trustplane on the embedded default, `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: serve test lint types unit venv clean bench

$(BIN)/trustplane: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

venv: $(BIN)/trustplane

serve: venv
	$(BIN)/trustplane serve

lint: venv
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples

types: venv
	$(BIN)/mypy --strict src/

unit: venv
	$(BIN)/pytest

test: lint types unit

bench: venv
	$(BIN)/python bench/token_endpoint.py

clean:
	rm -rf $(VENV) .trustplane .pytest_cache .mypy_cache .ruff_cache
