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

# Everything but the end-to-end tests (tests/e2e: the demo, multi-host runs, training quality).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" --ignore=tests/e2e --durations=10 tests

bench: $(STAMP)
	$(PY) bench/moe_dispatch.py
	$(PY) bench/train_step.py
	$(PY) bench/merge.py
	$(PY) bench/export_hf.py

clean:
	rm -rf $(VENV) .pytest_cache
