# The two commands a fresh machine needs: `make demo` (the main job) and `make test`. Each installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml clients/python/pyproject.toml | sha256sum | cut -c1-12)

.PHONY: demo test install check lint format type-check imports

install: $(STAMP)

$(STAMP): pyproject.toml clients/python/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[worker,test]"
	$(PY) -m pip install -q -e ./clients/python
	rm -f $(VENV)/.installed-*; touch $@

demo: $(STAMP)
	$(VENV)/bin/distillery-server demo

# One OpenBLAS thread per process: the tests run an API, workers and pytest side by side on few cores.
test: $(STAMP)
	OPENBLAS_NUM_THREADS=1 $(VENV)/bin/pytest

# Before every commit: formatting, lint, types, the import rules between floors, the generated sync client.
check: lint type-check imports
	$(PY) clients/python/tools/unasync.py --check

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

type-check: $(STAMP)
	$(VENV)/bin/mypy

imports: $(STAMP)
	$(VENV)/bin/lint-imports
