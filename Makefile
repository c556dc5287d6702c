# Two commands do everything on a fresh Debian/Ubuntu machine with Python >= 3.11:
#   make run    set up, then run the whole pipeline (configs/fmnist_pair.py) on real Fashion-MNIST
#   make test   set up, then lint and run the test suite
# Set-up = a virtual environment in .venv with the package and its test extras, plus Debian's
# dataset-fashion-mnist (apt; needs root or sudo). Both steps are skipped once done.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/fmnist_pair.py
WORKDIR ?= runs/fmnist_pair
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=
# pytest-xdist workers: the suite is compile-bound (XLA compiles on one thread), so two workers
# on two cores take about half the time of one; worksteal evens out the long end-to-end tests
# (`make test PYTEST_WORKERS=0` runs it in-process).
PYTEST_WORKERS ?= 2

.PHONY: setup run test lint format clean-venv

setup: $(VENV)/.installed $(FMNIST)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

$(FMNIST):
	$(SUDO) apt-get install -y -q dataset-fashion-mnist || \
	  ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist)

run: setup
	$(PY) -m ptq_adversary.main --config=$(CONFIG) --workdir=$(WORKDIR)

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: setup lint
	TQDM_DISABLE=1 $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

format: $(VENV)/.installed
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean-venv:
	rm -rf $(VENV)
