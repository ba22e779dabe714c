# One-command front door. `make run` sets up and runs the main job; `make test` sets up and
# runs the tests (the training stack on gymnasium 0.29, then the env alone on gymnasium 1.x,
# then RL Zoo on gymnasium 1.x); `make test-fast` is the edit loop (the suite without tests
# marked slow). `make test-ray` (RLlib, Ray Tune; a 1.9 GB venv) is not part of `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
VENV_GYM1 ?= .venv-gym1
VENV_ZOO ?= .venv-zoo
VENV_RAY ?= .venv-ray
VENV_PRODSTACK ?= .venv-prodstack
PY := $(VENV)/bin/python
PY_GYM1 := $(VENV_GYM1)/bin/python
PY_ZOO := $(VENV_ZOO)/bin/python
PY_RAY := $(VENV_RAY)/bin/python
PY_PRODSTACK := $(VENV_PRODSTACK)/bin/python
# CPU build of torch, installed before the project so the range in pyproject.toml is already
# satisfied (an unpinned torch would pull a multi-GB CUDA build).
TORCH_VERSION ?= 2.13.0
GYM1_VERSION ?= 1.2.2
# Must match the ray extra of pyproject.toml (it pins gymnasium $(GYM1_VERSION)).
RAY_VERSION ?= 2.60.0
ARGS ?=
# pip prints one line per package it fetches and installs (not its redrawn progress bars, which
# show nothing useful in a log); the filter drops the "already satisfied" noise.
PIP_INSTALL = -m pip install --progress-bar off
HEARTBEAT = scripts/with_heartbeat.sh "[setup]" bash -o pipefail -c
PIP_SHOW = { grep --line-buffered -E "^(Collecting|Processing|Downloading|Installing|Successfully|ERROR)" || true; } | sed -u "s/^/  /"

.PHONY: setup run compare test test-train test-fast test-gym1 test-zoo test-ray test-prodstack lint clean

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

# RL Zoo on gymnasium 1.x (rl_zoo3 needs shimmy 2, which imitation's gymnasium pin excludes).
$(VENV_ZOO)/.installed: pyproject.toml
	@echo "[setup] creating $(VENV_ZOO): RL Zoo on gymnasium $(GYM1_VERSION) (about 2 minutes)"
	$(PYTHON) -m venv $(VENV_ZOO)
	$(HEARTBEAT) '$(PY_ZOO) $(PIP_INSTALL) torch==$(TORCH_VERSION) 2>&1 | $(PIP_SHOW)'
	$(HEARTBEAT) '$(PY_ZOO) $(PIP_INSTALL) "gymnasium==$(GYM1_VERSION)" -e ".[zoo,dev]" 2>&1 | $(PIP_SHOW)'
	touch $@

# Ray (RLlib, Tune) on the gymnasium it pins, with the training stack for the sweep; imitation
# without its declared gymnasium 0.29 pin (--no-deps) plus the one package its data modules
# import. Large (~1.7 GB): outside `make test`.
$(VENV_RAY)/.installed: pyproject.toml
	@echo "[setup] creating $(VENV_RAY): Ray $(RAY_VERSION) on gymnasium $(GYM1_VERSION) (about 5 minutes, ~1.7 GB)"
	$(PYTHON) -m venv $(VENV_RAY)
	$(HEARTBEAT) '$(PY_RAY) $(PIP_INSTALL) torch==$(TORCH_VERSION) 2>&1 | $(PIP_SHOW)'
	$(HEARTBEAT) '$(PY_RAY) $(PIP_INSTALL) "gymnasium==$(GYM1_VERSION)" -e ".[ray,dev]" 2>&1 | $(PIP_SHOW)'
	$(HEARTBEAT) '$(PY_RAY) $(PIP_INSTALL) --no-deps imitation==1.0.0 2>&1 | $(PIP_SHOW)'
	$(HEARTBEAT) '$(PY_RAY) $(PIP_INSTALL) "datasets>=2.8" jsonpickle 2>&1 | $(PIP_SHOW)'
	touch $@

# vLLM production-stack's router (pinned source in ../shared/thirdparty/production-stack; needs
# Python >= 3.12) with the learned router: its dependencies (read from its pyproject.toml) plus
# onnxruntime and PyYAML for our adapter. The source itself is not installed: the test copies
# it, applies deploy/production_stack/learned_router.patch and puts the copy on PYTHONPATH.
PRODSTACK_SRC ?= ../shared/thirdparty/production-stack
PYTHON312 ?= $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12; do $$p -c "" 2>/dev/null && { echo $$p; break; }; done)
$(VENV_PRODSTACK)/.installed: $(PRODSTACK_SRC)/pyproject.toml deploy/production_stack/requirements.txt
	@test -n "$(PYTHON312)" || { echo "[setup] python3.12 not found (production-stack needs >= 3.12)"; exit 1; }
	@echo "[setup] creating $(VENV_PRODSTACK): production-stack's router on $(PYTHON312)"
	$(PYTHON312) -m venv $(VENV_PRODSTACK)
	$(PY_PRODSTACK) -c "import tomllib; print(*tomllib.load(open('$(PRODSTACK_SRC)/pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" > $(VENV_PRODSTACK)/prodstack-requirements.txt
	$(HEARTBEAT) '$(PY_PRODSTACK) $(PIP_INSTALL) -r $(VENV_PRODSTACK)/prodstack-requirements.txt -r deploy/production_stack/requirements.txt 2>&1 | $(PIP_SHOW)'
	touch $@

setup: $(VENV)/.installed

run: setup
	$(PY) train/warmstart.py $(ARGS)

compare: setup
	$(PY) -m llm_cluster_env.tools.compare $(ARGS)

test: test-train test-gym1 test-zoo

# The suite includes the learned router inside the real production-stack router
# (tests/test_production_stack.py, ~1 min); it needs .venv-prodstack, built here when python3.12
# and the pinned source are present, and skips with the reason otherwise.
test-train: setup
	@$(MAKE) --no-print-directory $(VENV_PRODSTACK)/.installed || echo "[setup] $(VENV_PRODSTACK) not built (needs python3.12 and $(PRODSTACK_SRC)): its test skips"
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow" -p no:cacheprovider -n 2

test-gym1: $(VENV_GYM1)/.installed
	$(PY_GYM1) -m pytest -q -m "not train" -p no:cacheprovider

test-zoo: $(VENV_ZOO)/.installed
	$(PY_ZOO) -m pytest -q -m zoo -p no:cacheprovider

test-ray: $(VENV_RAY)/.installed
	$(PY_RAY) -m pytest -q -m ray -p no:cacheprovider

# The learned router inside the real production-stack router alone (also part of `make test`).
test-prodstack: setup $(VENV_PRODSTACK)/.installed
	$(PY) -m pytest -q -p no:cacheprovider tests/test_production_stack.py

lint: setup
	$(PY) -m ruff check llm_cluster_env sb3_warmstart train benchmarks scripts tests examples

clean:
	rm -rf $(VENV) $(VENV_GYM1) $(VENV_ZOO) $(VENV_RAY) $(VENV_PRODSTACK) .pytest_cache
