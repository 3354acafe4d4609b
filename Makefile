# Two commands on a fresh machine with Python 3.10+:
#   make train   # set up .venv and train the default run (CPU or GPU)
#   make test    # set up .venv and run the test suite
#   make test-gpu  # the GPU suite (tests/gpu) with the CUDA torch already in .venv (README, GPU)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup train test test-gpu clean

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
	# Two workers (one test file each at a time; see tests/conftest.py): most tests use one core.
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS)

# No `setup` dependency: setup pins torch for the CPU, and this target must use the CUDA build the
# user installed into .venv (README, GPU). It stops at once when that torch sees no GPU, instead
# of reporting every test skipped.
test-gpu:
	@$(BIN)/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else \
		'make test-gpu: torch ' + torch.__version__ + ' in $(VENV) sees no CUDA GPU; install the CUDA build first (README.md, GPU)')"
	$(BIN)/python -m pytest -m gpu tests/gpu -q -rs $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs
