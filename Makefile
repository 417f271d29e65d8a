# `make run` and `make test` are the whole set-up: each bootstraps .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint unit bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[worker,dev]'
	touch $(STAMP)

## run: the worker and the notifier in dev mode (SQLite in var/, keys generated into var/)
run: $(STAMP)
	@$(PY) scripts/ensure_broker.py OTP_AMQP_URL
	@mkdir -p var
	@OTP_DEV=$${OTP_DEV:-true} bash scripts/run_dev.sh $(PY)

## test: ruff, mypy and the whole pytest suite against the machine's RabbitMQ
test: $(STAMP)
	@$(PY) scripts/ensure_broker.py OTP_TEST_AMQP_BASE
	@$(PY) scripts/ensure_postgres.py
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

## bench: throughput, latency and memory against a bare aio-pika consumer
bench: $(STAMP)
	@$(PY) scripts/ensure_broker.py OTP_BENCH_AMQP_BASE
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
