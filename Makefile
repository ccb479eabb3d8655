# adtrain: on a fresh clone `make quickstart` (the main job) and `make test`; each runs `make install` first when .venv is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# pytest-xdist workers, one thread each (tests/conftest.py); 0 runs the suite in this process
PYTEST_WORKERS ?= 2

.PHONY: install lock test quickstart bench bench-smoke notebook clean

install:  ## virtual environment + adtrain with its dev extra (tests, notebook, offline data/weights), at constraints.txt's versions
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]" -c constraints.txt

lock: | $(PY)  ## constraints.txt from this environment (after `make test` passed in it): the versions CI installs
	$(PY) .ci/lock.py constraints.txt

$(PY):  # a fresh clone: `make quickstart` and `make test` set up the environment first
	$(MAKE) install

test: | $(PY)  ## the whole test suite on CPU, in PYTEST_WORKERS processes
	$(PY) -m pytest -q --durations=25 -n $(PYTEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

quickstart: | $(PY)  ## the README quickstart: PatchCore on real ELPV cells with real ImageNet weights (under 2 min on 2 cores)
	$(PY) -m adtrain method=patchcore data=elpv backbone=efficientnet_lite0   # = python -m adtrain (no arguments)

bench: | $(PY)  ## throughput and memory figures of the quickstart's run (see docs/BENCHMARKS.md), offline
	$(PY) -m adtrain.bench

bench-smoke: | $(PY)  ## every quick benchmark script once on tiny inputs (~3 min): a script a refactor broke fails here
	PY=$(PY) bash benchmarks/smoke.sh

notebook: | $(PY)  ## the notebooks in JupyterLab (the notebook extra, part of dev)
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf outputs multirun .pytest_cache
