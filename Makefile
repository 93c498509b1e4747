# maas: `make run` and `make test` work on a fresh machine; everything else is a step of theirs.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROTOS := $(shell find protos -name '*.proto')
# Pytest arguments, e.g. `make test PYTEST_ARGS="-k registry -x"`.
PYTEST_ARGS ?=

.PHONY: help setup proto lint fmt test test-fast run bench postgres lock clean

help: ## Show this help.
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, exactly 2.13.0 (a CPU wheel on this machine's disk); then the code generator; then the
# project in editable mode, whose package list includes the generated code.
$(VENV)/.installed: pyproject.toml setup.py constraints.txt | $(BIN)/python
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0 grpcio-tools
	$(MAKE) --no-print-directory proto
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

setup: $(VENV)/.installed ## Create .venv and install everything (quick when already there).

gen/.stamp: $(PROTOS) | $(BIN)/python
	rm -rf gen && mkdir -p gen
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=gen --grpc_python_out=gen --pyi_out=gen $(PROTOS)
	touch $@

proto: gen/.stamp ## Generate Python code from protos/ into gen/ (build output, never edited).

lint: setup proto ## Ruff (style), mypy (types) and import-linter (architecture contracts).
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

fmt: setup ## Format and autofix.
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

postgres: ## Install PostgreSQL from Debian's packages when it is missing (the tests start their own).
	@ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || { \
	  echo "installing PostgreSQL from Debian's packages"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; }

test: setup proto postgres lint ## Set up, lint, and run the whole test suite.
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup proto ## Unit and contract tests only, SQLite only.
	$(BIN)/python -m pytest -m "not slow and not postgres" $(PYTEST_ARGS)

run: setup proto ## Start the mesh (embedded defaults), train, deploy and query digits through the gateway (Ctrl-C stops it).
	$(BIN)/maas up --quickstart

bench: setup proto ## Run the benchmarks; figures go to benchmarks/results/ and the terminal.
	$(BIN)/python -m benchmarks.registry_transfer
	$(BIN)/python -m benchmarks.paramserver
	$(BIN)/python -m benchmarks.training
	$(BIN)/python -m benchmarks.serving
	$(BIN)/python -m benchmarks.security_cost
	$(BIN)/python -m benchmarks.artifact_trust
	$(BIN)/python -m benchmarks.shared_memory
	$(BIN)/python -m benchmarks.scheduler_admission

lock: setup ## Rewrite constraints.txt from what .venv holds (after changing pyproject.toml).
	{ echo '# Exact versions `make setup` installs (pip -c): one tested set. Regenerate with `make lock`.'; \
	  $(BIN)/pip freeze --exclude-editable | grep -v '^maas' | sed 's/^torch==2.13.0+cpu/torch==2.13.0/'; } > constraints.txt

clean: ## Remove the virtualenv, generated code and local data.
	rm -rf $(VENV) gen .maas .pytest_cache .ruff_cache
