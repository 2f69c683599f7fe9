# Developer and CI entry points. `make test` is the one test command (CI runs it via .ci/run).

PYTHON ?= python3
VENV := .venv
VENV_PYTHON := $(VENV)/bin/python
PYTEST_ARGS ?=
# A new venv holds PyTorch with its CUDA libraries (about 6 GiB): refuse at once, not midway.
VENV_DISK_GIB := 8
DISK_CHECK := import shutil, sys; free = shutil.disk_usage(".").free / 2**30; \
	sys.exit(free < $(VENV_DISK_GIB) and \
	f"make venv: needs about $(VENV_DISK_GIB) GiB of free disk for PyTorch; {free:.1f} GiB free")

.PHONY: venv kafka-jars test lint demo

# The stamp is newer than pyproject.toml once everything is installed: a repeated run does
# nothing, and torch's large download happens only once (pip keeps satisfied requirements).
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "make venv: needs Python 3.11+ as $(PYTHON) (try: make venv PYTHON=python3.12)" >&2; exit 1; }
	@test -x $(VENV_PYTHON) || $(PYTHON) -c '$(DISK_CHECK)'
	test -x $(VENV_PYTHON) || $(PYTHON) -m venv $(VENV)
	$(VENV_PYTHON) -m pip install --upgrade pip
	$(VENV_PYTHON) -m pip install -e '.[train,dev,bench]'
	touch $@

# Kafka's jars via Maven into deploy/kafka/.cache (or $$SEQSENTINEL_KAFKA_CACHE); once only.
kafka-jars:
	$(PYTHON) deploy/kafka/local-kafka fetch --quiet

test: venv kafka-jars
	SEQSENTINEL_REQUIRE_KAFKA=1 $(VENV_PYTHON) -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The whole detector end to end on this machine: local Kafka, a model trained on synthetic
# sensors, `detector run`, `detector produce`, and the alerts printed as they arrive.
demo: venv kafka-jars
	PYTHON=$(VENV_PYTHON) deploy/demo.sh
