# Rampart developer commands. `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
ARGS ?=

.PHONY: demo test lint format install migrate serve services-start services-stop bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

migrate: $(STAMP)
	$(BIN)/python manage.py migrate --noinput

demo: $(STAMP)
	$(BIN)/python -m scripts.demo $(ARGS)

serve: migrate
	$(BIN)/uvicorn config.asgi:application --host 127.0.0.1 --port 8000 \
		--http routing.server:EdgeHttpProtocol

test: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy analysis/stats routing/hashing.py routing/assignment.py routing/histogram.py \
		routing/split.py routing/breaker.py routing/upstream.py routing/sdk experiments/contracts.py \
		analysis/verdict.py

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

services-start:
	scripts/services.sh start

services-stop:
	scripts/services.sh stop
