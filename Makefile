# Two commands for a new user: `make demo` and `make test`. The Makefile builds its own virtualenv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-test

.PHONY: demo test test-fast bench clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/flexolmo demo

test: $(STAMP)
	$(PY) -m pytest -q --durations=20 tests

# The unit tests (not tests/e2e: the demo, the README, multi-host runs, training quality) on
# TEST_WORKERS processes. JAX's compilation cache is kept in .cache/jax between runs: a second
# run compiles only what changed.
TEST_WORKERS ?= 2
test-fast: $(STAMP)
	JAX_COMPILATION_CACHE_DIR=$(CURDIR)/.cache/jax JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
	  $(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow" --ignore=tests/e2e --durations=10 tests

bench: $(STAMP)
	$(PY) bench/moe_dispatch.py
	$(PY) bench/train_step.py
	$(PY) bench/merge.py
	$(PY) bench/export_hf.py

clean:
	rm -rf $(VENV) .pytest_cache .cache
