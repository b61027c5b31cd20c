# The README's commands: `make demo`, `make test` (the full suite as CI runs it: on TensorFlow, then
# the backend-sensitive tests again on JAX) and
# `make test-fast` (no model builds or CLI subprocesses, under a minute). All build .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export TF_CPP_MIN_LOG_LEVEL ?= 3

.PHONY: demo test test-fast bench clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py --data demo_data --run runs/demo --out submissions/demo.csv

# The whole suite on TensorFlow, then the backend-sensitive tests (marked `backend`) on JAX, each
# spread over the machine's cores by pytest-xdist; each test module stays on one worker, so its
# module-scoped fixtures (run folders, a Ray cluster) are built once.
XDIST := -n auto --dist loadscope
test: $(STAMP)
	$(BIN)/python -m pytest $(XDIST)
	KERAS_BACKEND=jax $(BIN)/python -m pytest $(XDIST) -m backend

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

bench: $(STAMP)
	$(BIN)/python scripts/bench_extract.py

clean:
	rm -rf runs demo_data
