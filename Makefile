# Developer entry points. `make test` works on a fresh machine: it builds .venv, starts the local
# stack (real Kafka + S3 on loopback), runs pytest against it and stops what it started.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CI builds .venv once on a clean clone: no wheel cache (torch's CUDA wheels from PyPI are ~4 GB,
# and a cache would hold them a second time beside the ~7 GB installed).
PIP_INSTALL_ARGS ?= $(if $(CI),--no-cache-dir,)
# Free space .venv needs while it is built (installed size plus pip's unpacked downloads).
VENV_NEEDS_GB := 11
PYTEST_ARGS ?=
# The locks (requirements/README.md): .venv is installed from requirements/dev.txt with uv, which
# is itself installed from requirements/uv.txt (pinned, hashed). `make lock` recompiles them.
LOCK := requirements/dev.txt
UV := $(VENV)/bin/uv
# The stamp names what was installed: both projects' metadata and the locks.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml devtools/pyproject.toml $(LOCK) requirements/uv.txt | sha256sum | cut -c1-16)

.PHONY: help venv test lint demo stack-up stack-down chromium

help:
	@echo "make venv        create .venv: the package with [export,dev], and devtools/ (test helpers)"
	@echo "make test        venv, stack up, pytest, stack down (a stack that already ran stays up)"
	@echo "make lint        ruff check, ruff format --check, mypy, lint-imports (layering)"
	@echo "make demo        venv, stack up, sample video -> submit -> serve -> collect -> demo-out/, stack down"
	@echo "make stack-up    start the local stack (eval \"\$$(scripts/stack up)\" to configure a shell)"
	@echo "make stack-down  stop the local stack"
	@echo "make lock        recompile the hashed locks in requirements/ from pyproject.toml (uv)"
	@echo "make image       build the container image (deploy/Dockerfile; MODEL=path/to/best.pt)"
	@echo "make image-test  run the image as the Kubernetes pod does against the local stack"

venv: $(STAMP)

$(STAMP): pyproject.toml devtools/pyproject.toml $(LOCK) requirements/uv.txt
	@free_gb=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); \
	tmp_gb=$$(df -Pk "$${TMPDIR:-/tmp}" | awk 'NR==2 {print int($$4 / 1048576)}'); \
	echo "disk: $$free_gb GB free here, $$tmp_gb GB in $${TMPDIR:-/tmp}; .venv needs about $(VENV_NEEDS_GB) GB while it builds"; \
	if [ ! -x $(PY) ] && [ "$$free_gb" -lt $(VENV_NEEDS_GB) ]; then \
		echo "WARNING: less than $(VENV_NEEDS_GB) GB free: the install may stop with 'No space left on device'." >&2; \
		echo "         Free space here (torch's CUDA build from PyPI is most of it) or set TMPDIR to a larger disk." >&2; \
	fi
	@if [ ! -x $(PY) ]; then echo "creating $(VENV)"; $(PYTHON) -m venv $(VENV); fi
	$(PY) -m pip install --disable-pip-version-check -q $(PIP_INSTALL_ARGS) --require-hashes \
		-r requirements/uv.txt
	$(UV) pip install --python $(PY) -q $(if $(CI),--no-cache,) --require-hashes -r $(LOCK)
	$(UV) pip install --python $(PY) -q --no-deps --no-build-isolation -e . -e ./devtools
	@$(PY) scripts/check_lock.py || echo "WARNING: $(LOCK) is behind pyproject.toml: run make lock" >&2
	@if ! command -v ss >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then \
		echo "installing iproute2 (ss) for the stack's loopback test"; \
		sudo=""; [ "$$(id -u)" -eq 0 ] || sudo="sudo"; \
		DEBIAN_FRONTEND=noninteractive $$sudo apt-get update -qq </dev/null; \
		DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq iproute2 </dev/null; \
	fi
	@rm -f $(VENV)/.installed-*
	@touch $@

# `scripts/stack run` starts what is not running, runs the command with the stack's environment,
# stops only the servers it started and exits with the command's status.
test: venv chromium
	scripts/stack run -- $(VENV)/bin/pytest $(PYTEST_ARGS)

# Headless Chromium renders the demo page in tests/integration/test_demo_html.py. Installed from
# Debian's archive only when missing and running as root; otherwise that test skips and says why.
chromium:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium (headless page test)"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null || true; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium \
			</dev/null || echo "chromium not installed; the page test will skip"; \
	fi

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# Video in, annotated results out: topics, serve (test model), submit, collect, demo-out/index.html.
demo: venv
	scripts/stack run -- $(PY) scripts/demo.py

stack-up: venv
	scripts/stack up

stack-down:
	scripts/stack down

# Detector throughput: the original design vs the pool, per runtime and precision (< 15 min;
# BENCH_ARGS=--quick for a short run, --sweep for the processes × threads grid behind auto).
.PHONY: bench-detector
bench-detector: venv
	$(PY) bench/detector_bench.py $(BENCH_ARGS)

# bf16 with the stem kept in f32: agreement with the fp32 reference and cost, per choice of layers.
.PHONY: bench-bf16
bench-bf16: venv
	$(PY) bench/bf16_stem.py $(BENCH_ARGS)

# int8 against fp32 on the test model's held-out split: mAP, agreement at the service's thresholds.
.PHONY: bench-int8
bench-int8: venv
	$(PY) bench/int8_bench.py $(BENCH_ARGS)

# End to end through Kafka and S3 vs the detector alone vs the original design in the same loop.
.PHONY: bench-pipeline
bench-pipeline: venv
	scripts/stack run -- $(PY) bench/pipeline_bench.py $(BENCH_ARGS)

# The locks (requirements/README.md). dev.txt first; the others take its versions as constraints.
LOCK_FLAGS := --quiet --universal --python-version 3.11 --generate-hashes --custom-compile-command 'make lock'
.PHONY: lock
lock:
	@if [ ! -x $(UV) ]; then \
		[ -x $(PY) ] || $(PYTHON) -m venv $(VENV); \
		$(PY) -m pip install -q --require-hashes -r requirements/uv.txt 2>/dev/null \
			|| $(PY) -m pip install -q "$$(grep -v '^#' requirements/uv.in)"; \
	fi
	$(UV) pip compile $(LOCK_FLAGS) requirements/uv.in -o requirements/uv.txt
	$(UV) pip compile $(LOCK_FLAGS) --extra export --extra dev pyproject.toml devtools/pyproject.toml \
		requirements/stack.in requirements/build.in -o requirements/dev.txt
	$(UV) pip compile $(LOCK_FLAGS) --extra export -c requirements/dev.txt pyproject.toml \
		requirements/build.in -o requirements/export.txt
	$(UV) pip compile $(LOCK_FLAGS) -c requirements/dev.txt pyproject.toml requirements/build.in \
		-o requirements/service.txt
	$(PY) scripts/check_lock.py

# The container image (deploy/Dockerfile) on the base PYTHON_IMAGE, from a wheelhouse of the locks
# (scripts/image-build: pulls the base or builds a stand-in from Debian's archive when missing).
IMAGE ?= inference-service:0.1.0
PYTHON_IMAGE ?= python:3.11-slim-bookworm
MODEL ?= models/test/best.pt
.PHONY: image image-test
image:
	IMAGE='$(IMAGE)' PYTHON_IMAGE='$(PYTHON_IMAGE)' MODEL='$(MODEL)' scripts/image-build

# The built image under the pod's security context against the local stack (scripts/image_test.py).
image-test: venv
	scripts/stack run -- $(PY) scripts/image_test.py --image '$(IMAGE)'
