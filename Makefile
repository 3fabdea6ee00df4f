# Rampart developer commands. `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
ARGS ?=

.PHONY: demo test lint format install migrate serve services-start services-stop bench sdk-test

# The SDK (sdk/python, distribution rampart-sdk) goes in first: the server imports the pure
# assignment code from it and declares it as a dependency.
$(STAMP): pyproject.toml sdk/python/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ./sdk/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

migrate: $(STAMP)
	$(BIN)/python manage.py migrate --noinput

demo: $(STAMP)
	$(BIN)/python -m scripts.demo $(ARGS)

serve: migrate
	$(BIN)/uvicorn config.asgi:application --host 127.0.0.1 --port 8000 \
		--http routing.edge.server:EdgeHttpProtocol

test: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy analysis/stats routing/observe/histogram.py routing/observe/llm_stats.py routing/observe/shadow_pairs.py routing/split.py \
		routing/proxy/breaker.py routing/proxy/upstream.py sdk/python/rampart_sdk experiments/contracts.py \
		analysis/verdict.py experiments/prediction_path.py experiments/input_cells.py \
		experiments/input_windows.py

# The SDK alone: build its wheel, install it with its test needs into a fresh virtualenv
# without Django, check Django is absent there, and run sdk/python/tests against the wheel.
SDK_BUILD := var/sdk-build
sdk-test: $(STAMP)
	rm -rf $(SDK_BUILD)
	$(BIN)/python -m pip wheel --quiet --no-deps --wheel-dir $(SDK_BUILD)/dist ./sdk/python
	$(PYTHON) -m venv $(SDK_BUILD)/venv
	$(SDK_BUILD)/venv/bin/python -m pip install --quiet \
		"$$(ls $(SDK_BUILD)/dist/rampart_sdk-*.whl)[test]"
	! $(SDK_BUILD)/venv/bin/python -c 'import django' 2>/dev/null
	$(SDK_BUILD)/venv/bin/python -c \
		'import rampart_sdk; assert "site-packages" in rampart_sdk.__file__, rampart_sdk.__file__'
	cd sdk/python && ../../$(SDK_BUILD)/venv/bin/pytest -q -p no:cacheprovider tests

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

services-start:
	scripts/services.sh start

services-stop:
	scripts/services.sh stop
