# Two commands on a fresh machine with Python 3.10+:
#   make train   # set up .venv and train the default run (CPU or GPU)
#   make test    # set up .venv and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup train test clean

$(BIN)/distgan: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build (see README for GPUs).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $(BIN)/distgan

setup: $(BIN)/distgan

train: setup
	$(BIN)/distgan train $(ARGS)

test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs
