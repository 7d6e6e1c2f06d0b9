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

# The whole suite in one session: the unit tests and tests/e2e (the demo, the README, multi-host
# runs, training quality) on TEST_WORKERS processes, so that neither waits for the other's last
# tests. The unit tests and the end-to-end tests' short runs compile fast (TEST_XLA_FLAGS: XLA:CPU
# skips its costly optimizations; the tiny model's training step compiles in 1.1 s instead of
# 2.8 s and runs in 15 ms instead of 5); the demo's runs, long ones, compile as a user's are
# (tests/e2e/fixtures.py). JAX's compilation cache is kept in .cache/jax between runs: a second
# run compiles only what changed.
TEST_WORKERS ?= 2
TEST_XLA_FLAGS ?= --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true
TEST_ENV = XLA_FLAGS="$(TEST_XLA_FLAGS)" JAX_COMPILATION_CACHE_DIR=$(CURDIR)/.cache/jax \
  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=20 tests

# The unit tests alone (no demo, nothing marked slow), in a few minutes.
test-fast: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow" --ignore=tests/e2e \
	  --durations=10 tests

bench: $(STAMP)
	$(PY) bench/moe_dispatch.py
	$(PY) bench/train_step.py
	$(PY) bench/projection.py
	$(PY) bench/merge.py
	$(PY) bench/export_hf.py

clean:
	rm -rf $(VENV) .pytest_cache .cache
