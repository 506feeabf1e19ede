# Two commands from a fresh clone (README.md): `make serve` and `make test`.
# Both create .venv when it is missing and install only when pyproject.toml changed, so the second
# run starts at once. People who manage their own environments use the pip commands in README.md.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel, as on the machines without a GPU where this project is built and tested. On a GPU
# machine, install your torch build into .venv first (README.md): a torch already there is kept.
TORCH ?= torch==2.13.0
MODEL ?= toy
ARGS ?=
PYTEST_ARGS ?=
, := ,
# CI provisions every tier (Ray, Chromium, PostgreSQL) so that nothing is skipped there.
TEST_EXTRAS := $(if $(CI),test$(,)ray,test)

.PHONY: serve test lint clean-venv

serve: $(VENV)/.installed-base
	$(BIN)/sd3-server serve --model $(MODEL) --starter-key $(ARGS)

test: $(VENV)/.installed-$(TEST_EXTRAS)
ifdef CI
	bash .ci/browser.sh
	bash .ci/postgres.sh >/dev/null
	. .ci/postgres.env && $(BIN)/pytest -q $(PYTEST_ARGS)
else
	$(BIN)/pytest -q $(PYTEST_ARGS)
endif

# The fast tier: what needs no PostgreSQL, Chromium or Ray and is not marked slow (README.md, Tests).
.PHONY: test-fast
test-fast: $(VENV)/.installed-test
	$(BIN)/pytest -q -m "not slow and not postgres and not browser and not ray" $(PYTEST_ARGS)

lint: $(VENV)/.installed-$(TEST_EXTRAS)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/mypy benchmarks  # scripts, not a package: checked as files, on their own
	$(BIN)/lint-imports
	bash .ci/lint-docker.sh

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH)"
	touch $@

$(VENV)/.installed-base: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-%: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install --quiet -e ".[$*]"
	touch $@ $(VENV)/.installed-base

clean-venv:
	rm -rf $(VENV)
