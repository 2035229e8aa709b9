# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast lint clean

setup: $(VENV)/.installed
	@scripts/setup_system.sh

$(VENV)/.installed: pyproject.toml scripts/check_java.sh
	@scripts/check_java.sh
	@$(PY) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Python 3.11 is needed (set PY=/path/to/python3.11)")'
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch==2.13.0 is pinned exactly: a looser spec pulls a multi-GB CUDA build.
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

demo: setup
	$(BIN)/sae run --config conf/local.yaml

test: setup
	$(BIN)/python -m pytest -q

# Everything but the tests marked slow (spark-submit, a standalone cluster, groups of training
# processes, the simulated nights, real corpora end to end, scenarios of two or more Spark jobs in
# sequence, and the further variants of a parametrised ingest), with the test JVM set up for tiny
# queries (tests/conftest.py, SAE_TESTS_FAST): feedback in under three minutes while developing.
# Every source keeps its single-ingest tests here. CI runs `make test`, slow ones included, with
# Spark's defaults.
test-fast: setup
	SAE_TESTS_FAST=1 $(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf out .pytest_cache
