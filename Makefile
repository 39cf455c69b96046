# Flywheel: `make demo` runs the nightly loop end to end through Airflow; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export FLYWHEEL_HOME ?= $(CURDIR)

.PHONY: install demo test test-fast up constraints clean

install: $(VENV)/.installed

# torch first, with pip: pip takes the CPU build on disk, where other installers would download a CUDA one.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt torch uv
	$(BIN)/uv pip install --quiet --python $(BIN)/python -c constraints.txt -e ".[test]"
	touch $@

demo: install
	$(BIN)/flywheel demo --fresh

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not e2e"

# A local Airflow (api-server, scheduler, dag-processor, triggerer) on http://localhost:8080.
up: install
	$(BIN)/flywheel up

constraints:
	$(BIN)/uv pip freeze --python $(BIN)/python | grep -v -E '^(flywheel|-e )' | sed 's/+cpu$$//' > constraints.new
	{ sed -n '1,3p' constraints.txt; cat constraints.new; } > constraints.txt && rm constraints.new

clean:
	rm -rf $(VENV) .airflow
