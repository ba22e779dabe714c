# One-command front door. `make run` sets up and runs the main job; `make test` sets up and
# runs the tests (the training stack on gymnasium 0.29, then the env alone on gymnasium 1.x);
# `make test-fast` is the edit loop (the suite without tests marked slow).
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
VENV_GYM1 ?= .venv-gym1
PY := $(VENV)/bin/python
PY_GYM1 := $(VENV_GYM1)/bin/python
# CPU build of torch, installed before the project so the range in pyproject.toml is already
# satisfied (an unpinned torch would pull a multi-GB CUDA build).
TORCH_VERSION ?= 2.13.0
GYM1_VERSION ?= 1.2.2
ARGS ?=
# pip prints one line per package it fetches and installs (not its redrawn progress bars, which
# show nothing useful in a log); the filter drops the "already satisfied" noise.
PIP_INSTALL = -m pip install --progress-bar off
HEARTBEAT = scripts/with_heartbeat.sh "[setup]" bash -o pipefail -c
PIP_SHOW = { grep --line-buffered -E "^(Collecting|Processing|Downloading|Installing|Successfully|ERROR)" || true; } | sed -u "s/^/  /"

.PHONY: setup run compare test test-train test-fast test-gym1 lint clean

$(VENV)/.installed: pyproject.toml
	@echo "[setup] creating $(VENV) (first run only: about 3 minutes on 2 cores, mostly torch)"
	$(PYTHON) -m venv $(VENV)
	@echo "[setup] installing torch==$(TORCH_VERSION) (CPU build)"
	$(HEARTBEAT) '$(PY) $(PIP_INSTALL) torch==$(TORCH_VERSION) 2>&1 | $(PIP_SHOW)'
	@echo "[setup] installing this project with its train, deploy and dev extras"
	$(HEARTBEAT) '$(PY) $(PIP_INSTALL) -e ".[train,deploy,dev]" 2>&1 | $(PIP_SHOW)'
	@echo "[setup] done"
	touch $@

# The environment package alone (gymnasium + numpy), on gymnasium 1.x, as RLlib would install it.
$(VENV_GYM1)/.installed: pyproject.toml
	@echo "[setup] creating $(VENV_GYM1): the env package alone on gymnasium $(GYM1_VERSION)"
	$(PYTHON) -m venv $(VENV_GYM1)
	$(HEARTBEAT) '$(PY_GYM1) $(PIP_INSTALL) "gymnasium==$(GYM1_VERSION)" -e ".[compare]" pytest 2>&1 | $(PIP_SHOW)'
	touch $@

setup: $(VENV)/.installed

run: setup
	$(PY) train/warmstart.py $(ARGS)

compare: setup
	$(PY) -m llm_cluster_env.compare $(ARGS)

test: test-train test-gym1

test-train: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow" -p no:cacheprovider -n 2

test-gym1: $(VENV_GYM1)/.installed
	$(PY_GYM1) -m pytest -q -m "not train" -p no:cacheprovider

lint: setup
	$(PY) -m ruff check llm_cluster_env sb3_warmstart train benchmarks scripts tests

clean:
	rm -rf $(VENV) $(VENV_GYM1) .pytest_cache
