# samopt developer commands.
#   make demo   create .venv (torch and the application), get Fashion-MNIST, compare SGD/SAM/SSAM-F/SSAM-D/δ-SAM
#               with 40% label noise (under 15 min on 2 CPU cores; DEMO_OPTIMIZERS=sgd,sam,asam,... adds ASAM)
#   make test   create .venv, then ruff, the import contracts, mypy, the docs site and the test suite (what CI runs),
#               in TEST_WORKERS processes (pytest-xdist; 2, one per core of CI's machine; 0 runs it in this process)
#   make docs   build the documentation site into site/ (mkdocs-material; `mkdocs serve` to browse it)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned: an open range would pull a multi-GB CUDA build onto CPU machines. On this
# project's machines torch==2.13.0 resolves to a CPU build; elsewhere, for a CPU-only machine, add
# TORCH_FLAGS="--index-url https://download.pytorch.org/whl/cpu".
TORCH ?= torch==2.13.0
TORCH_FLAGS ?=
FMNIST := /usr/share/datasets/fashion-mnist
DEMO_SEEDS ?= 1
DEMO_OPTIMIZERS ?= sgd,sam,ssam-f,ssam-d,delta-sam
DEMO_OUT ?= runs/demo
TEST_WORKERS ?= 2

.PHONY: setup test docs demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH_FLAGS) $(TORCH)
	touch $@

# the demo needs the application's extras only; the tests, every extra and the tools
$(VENV)/.app: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install --quiet -e '.[app]'
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

test: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# Fashion-MNIST: Debian's dataset-fashion-mnist where apt works, else the public download into data/.
demo: $(VENV)/.app
	@if [ ! -f $(FMNIST)/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
	  echo "installing Debian's dataset-fashion-mnist"; \
	  ($$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist) \
	    || echo "apt-get could not install dataset-fashion-mnist; downloading Fashion-MNIST instead"; \
	fi
	@if [ -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then DATA=; else DATA="--data-dir data/fashion-mnist --download"; fi; \
	$(BIN)/samopt compare --recipe fmnist-demo --optimizers $(DEMO_OPTIMIZERS) \
	  --seeds $(DEMO_SEEDS) --out $(DEMO_OUT) $$DATA

bench: setup
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python benchmarks/step_cost.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis samopt.egg-info site
