# Flywheel: `make demo` runs the nightly loop end to end through Airflow; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# Triton's Python backend runs in its own small environment (see pipelines/launch/triton.py).
BACKEND_REQUIREMENTS := pipelines/serving/backend/requirements.txt
export FLYWHEEL_HOME ?= $(CURDIR)

.PHONY: install system-packages demo lint test test-fast test-distributed up constraints clean

# Debian packages the tests start for real: Prometheus, its Pushgateway and Alertmanager (alert
# rules, metrics, the rollback on an alert), Chromium (the browser test of the Airflow UI pages),
# PostgreSQL and Redis (Airflow on the CeleryExecutor in make test-distributed), a Java runtime
# (pyspark's JVM: data.engine spark, tests/unit/test_spark.py).
SYSTEM_PACKAGES := prometheus prometheus-pushgateway prometheus-alertmanager chromium postgresql redis-server openjdk-17-jre-headless
SYSTEM_COMMANDS := promtool prometheus prometheus-pushgateway prometheus-alertmanager chromium /usr/lib/postgresql/15/bin/pg_ctl redis-server java
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

install: $(VENV)/.installed system-packages

system-packages:
	@for c in $(SYSTEM_COMMANDS); do command -v $$c >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then \
		$(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $(SYSTEM_PACKAGES); \
	fi

# torch first, with pip: pip takes the CPU build on disk, where other installers would download a CUDA one.
$(VENV)/.installed: pyproject.toml constraints.txt $(BACKEND_REQUIREMENTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt torch uv
	$(BIN)/uv pip install --quiet --python $(BIN)/python -c constraints.txt -e ".[test,cluster,spark]"
	test -x $(VENV)/triton-python/bin/python || $(PYTHON) -m venv $(VENV)/triton-python
	$(BIN)/uv pip install --quiet --python $(VENV)/triton-python/bin/python -r $(BACKEND_REQUIREMENTS)
	# No bytecode beside the models: Triton would see a changed version folder and reload it.
	echo "import sys; sys.dont_write_bytecode = True" > $$($(VENV)/triton-python/bin/python -c "import sysconfig; print(sysconfig.get_path('purelib'))")/sitecustomize.py
	touch $@

demo: install
	$(BIN)/flywheel demo --fresh

# ruff and mypy first: a lint or type error fails in a minute, before the 20-minute suite.
# mypy is strict on pipelines/ ([tool.mypy] in pyproject.toml).
LINTED := pipelines dags plugins tests bench
lint: install
	$(BIN)/ruff check $(LINTED)
	$(BIN)/mypy

test: install lint
	$(BIN)/python -m pytest

test-fast: install lint
	$(BIN)/python -m pytest -m "not e2e and not distributed and not bench"

# Airflow on the CeleryExecutor (PostgreSQL, Redis, a default and a gpu worker) runs the retrain DAG.
test-distributed: install
	$(BIN)/python -m pytest -m distributed tests/distributed

# Airflow (api-server, scheduler, dag-processor, triggerer) on http://localhost:8080,
# Triton on :8000 (HTTP), :8001 (gRPC), :8002 (metrics), and the MLflow tracking server and UI
# at tracking.uri (http://127.0.0.1:5000; projects/defaults.yaml), until Ctrl-C.
up: install
	$(BIN)/flywheel up

constraints:
	$(BIN)/uv pip freeze --python $(BIN)/python | grep -v -E '^(flywheel|-e )' | sed 's/+cpu$$//' > constraints.new
	{ sed -n '1,3p' constraints.txt; cat constraints.new; } > constraints.tmp && mv constraints.tmp constraints.txt && rm constraints.new

clean:
	rm -rf $(VENV) .airflow
