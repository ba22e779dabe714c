# One-command front door. `make run` sets up and runs the main job; `make test` sets up and
# runs the tests (the training stack on gymnasium 0.29, then the env alone on gymnasium 1.x).
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

.PHONY: setup run compare test test-train test-gym1 lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e ".[train,dev]"
	touch $@

# The environment package alone (gymnasium + numpy), on gymnasium 1.x, as RLlib would install it.
$(VENV_GYM1)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_GYM1)
	$(PY_GYM1) -m pip install --quiet "gymnasium==$(GYM1_VERSION)" -e ".[compare]" pytest
	touch $@

setup: $(VENV)/.installed

run: setup
	$(PY) train/warmstart.py $(ARGS)

compare: setup
	$(PY) -m llm_cluster_env.compare $(ARGS)

test: test-train test-gym1

test-train: setup
	$(PY) -m pytest -q

test-gym1: $(VENV_GYM1)/.installed
	$(PY_GYM1) -m pytest -q -m "not train" -p no:cacheprovider

lint: setup
	$(PY) -m ruff check llm_cluster_env sb3_warmstart train benchmarks scripts tests

clean:
	rm -rf $(VENV) $(VENV_GYM1) .pytest_cache
