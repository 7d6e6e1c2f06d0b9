# Two commands for a new user: `make demo` and `make test`. The Makefile builds its own virtualenv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-test

.PHONY: demo test test-fast bench clean

# pip byte-compiles what it installs one file at a time (70 s of the 115 s the installation took
# on 2 cores); compileall does it on every core afterwards (31 s). Files some packages ship that
# are not Python 3 fail to compile, as they do under pip, and are ignored.
$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-compile -e '.[test]'
	$(PY) -m compileall -qq -j 0 $(VENV)/lib || true
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/flexolmo demo

# The whole suite: the unit tests, then tests/e2e (the demo, the README, multi-host runs,
# training quality), both on TEST_WORKERS processes. The end-to-end tests' runs are short too,
# and compile like the unit tests; the demo's runs, long ones, are compiled as a user's are
# (tests/e2e/fixtures.py).
test: test-fast
	XLA_FLAGS="$(TEST_XLA_FLAGS)" \
	  $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=20 tests/e2e

# The unit tests on TEST_WORKERS processes. They compile hundreds of tiny programs and run each a
# few times, so XLA:CPU skips its costly optimizations for them (the tiny model's training step
# compiles in 1.1 s instead of 2.8 s and runs in 15 ms instead of 5). JAX's compilation cache is
# kept in .cache/jax between runs: a second run compiles only what changed.
TEST_WORKERS ?= 2
TEST_XLA_FLAGS ?= --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true
test-fast: $(STAMP)
	XLA_FLAGS="$(TEST_XLA_FLAGS)" JAX_COMPILATION_CACHE_DIR=$(CURDIR)/.cache/jax \
	  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
	  $(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow" --ignore=tests/e2e --durations=10 tests

bench: $(STAMP)
	$(PY) bench/moe_dispatch.py
	$(PY) bench/train_step.py
	$(PY) bench/merge.py
	$(PY) bench/export_hf.py

clean:
	rm -rf $(VENV) .pytest_cache .cache
