# Developer and CI entry points. `make test` is the one test command (CI runs it via .ci/run);
# `make test-fast` is the quick tier of it, `make docs` regenerates docs/configuration.md.

PYTHON ?= python3
VENV := .venv
VENV_PYTHON := $(VENV)/bin/python
# `make test-latest`'s venv: the newest releases of every dependency, the lock ignored.
VENV_LATEST := .venv-latest
EXTRAS := train,dev,bench,confluent
# Every dependency pinned for Linux x86_64 and Python 3.11 and later; `make lock` writes it.
LOCK := constraints.txt
# `make lock LOCK_UPGRADE=--upgrade` moves every pin to the newest release that resolves.
LOCK_UPGRADE ?=
PYTEST_ARGS ?=
comma := ,
# A new venv holds PyTorch with its CUDA libraries (about 6 GiB): refuse at once, not midway.
VENV_DISK_GIB := 8
DISK_CHECK := import shutil, sys; free = shutil.disk_usage(".").free / 2**30; \
	sys.exit(free < $(VENV_DISK_GIB) and \
	f"make: needs about $(VENV_DISK_GIB) GiB of free disk for PyTorch; {free:.1f} GiB free")

.PHONY: venv venv-runtime kafka-jars test test-fast test-latest lock lint docs demo

# $(call install,VENV,PIP OPTIONS,EXTRAS): create VENV if missing, then install the project with
# EXTRAS into it. pip keeps satisfied requirements, so torch's large download happens only once;
# the disk check applies where EXTRAS bring it (train).
define install
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "make: needs Python 3.11+ as $(PYTHON) (try: PYTHON=python3.12)" >&2; exit 1; }
	$(if $(findstring train,$(3)),@test -x $(1)/bin/python || $(PYTHON) -c '$(DISK_CHECK)')
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install --upgrade pip
	$(1)/bin/python -m pip install $(2) -e '.[$(3)]'
endef

# The stamp is newer than pyproject.toml and the lock once everything is installed at the locked
# versions: a repeated run does nothing, and a changed lock reinstalls what it moved.
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(call install,$(VENV),-c $(LOCK),$(EXTRAS))
	touch $@ $(VENV)/.installed-runtime

# The detector and the dev tools without the trainer's PyTorch: all that `make test-fast` needs.
# `make venv` later adds the rest to the same venv.
venv-runtime: $(VENV)/.installed-runtime

$(VENV)/.installed-runtime: pyproject.toml $(LOCK)
	$(call install,$(VENV),-c $(LOCK),dev)
	touch $@

# Re-resolve the lock after a change of pyproject.toml, keeping the other pins (or moving them
# all with LOCK_UPGRADE=--upgrade). Universal: the pins carry markers wherever they differ by
# Python version or platform. onnxruntime-gpu is resolved alongside for the GPU image.
lock: $(VENV)/bin/uv
	echo 'onnxruntime-gpu[cuda,cudnn]' | $(VENV)/bin/uv pip compile pyproject.toml - \
		$(addprefix --extra ,$(subst $(comma), ,$(EXTRAS))) --universal --python-version 3.11 \
		--custom-compile-command 'make lock' --quiet $(LOCK_UPGRADE) --output-file $(LOCK)

# uv alone, at its locked version: the rest of the venv may be what the new lock has to change.
$(VENV)/bin/uv:
	test -x $(VENV_PYTHON) || $(PYTHON) -m venv $(VENV)
	$(VENV_PYTHON) -m pip install -c $(LOCK) uv

# Kafka's jars via Maven into deploy/kafka/.cache (or $$SEQSENTINEL_KAFKA_CACHE); once only.
kafka-jars:
	$(PYTHON) deploy/kafka/local-kafka fetch --quiet

test: venv kafka-jars
	SEQSENTINEL_REQUIRE_KAFKA=1 $(VENV_PYTHON) -m pytest $(PYTEST_ARGS)

# The fast tier is a folder: tests/fast/, the runtime's tests (contract, scorer, engine, bulk
# decoding, replay, settings) on ONNX models built with onnx.helper (tests/onnx_fixtures.py).
# It needs neither torch nor a broker; run alone, its conftest makes `import torch` fail.
# `make test` runs it too, with the rest.
test-fast: venv-runtime
	$(VENV_PYTHON) -m pytest tests/fast $(PYTEST_ARGS)

# The suite against the newest release of every dependency, in a venv of its own: what
# `make lock LOCK_UPGRADE=--upgrade` would bring. Upgrades that venv on every run.
test-latest: kafka-jars
	$(call install,$(VENV_LATEST),--upgrade --upgrade-strategy eager,$(EXTRAS))
	SEQSENTINEL_REQUIRE_KAFKA=1 $(VENV_LATEST)/bin/python -m pytest $(PYTEST_ARGS)

# ruff, then the import directions between the layers (pyproject.toml's [tool.importlinter];
# tests/test_layers.py runs them with the suite too). Both read the source without running it,
# so the runtime venv is enough: no PyTorch download to lint.
lint: venv-runtime
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

# docs/configuration.md from the settings' descriptions in detector/config.py;
# tests/test_configuration_docs.py fails while it is out of date.
docs: venv-runtime
	$(VENV_PYTHON) -m detector.commands.config_docs --output docs/configuration.md

# The whole detector end to end on this machine: local Kafka, a model trained on synthetic
# sensors, `detector run`, `detector produce`, and the alerts printed as they arrive.
demo: venv kafka-jars
	PYTHON=$(VENV_PYTHON) deploy/demo.sh
