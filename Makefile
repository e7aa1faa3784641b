# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all lint format install clean chromium

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/nanoseek demo

# tests/test_web_chat.py drives Debian's chromium with Playwright: installed here when missing,
# and a failed install stops `make test` (the test is never skipped).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing chromium for tests/test_web_chat.py"; \
	  SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; } || { \
	  echo "error: could not install chromium, which tests/test_web_chat.py needs (apt-get install chromium)" >&2; \
	  exit 1; }

test: $(STAMP) chromium
	$(PY) -m pytest

test-all: $(STAMP) chromium
	$(PY) -m pytest -m ""

# ruff: lint and the format check (what .ci/run runs first); `make format` rewrites the files
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

format: $(STAMP)
	$(VENV)/bin/ruff format src tests
	$(VENV)/bin/ruff check --fix src tests

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
