# smtpdup developer tasks. Needs only python3 (3.11+) and make: the first
# target that needs it creates .venv and installs requirements.txt plus the
# package (editable), again whenever requirements.txt or pyproject.toml
# changes (the stamp .venv/.installed records the last install).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed

PYTEST_ARGS ?=
BENCH_ARGS ?=
CHECK_ARGS ?=
CHAOS_ARGS ?=

.PHONY: all venv test demo bench chaos check lint clean distclean

all: test

venv: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt pyproject.toml | $(PY)
	$(PIP) install -r requirements.txt
	$(PIP) install -e . --no-deps
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/smtpdup demo

bench: $(STAMP)
	$(PY) bench/run.py $(BENCH_ARGS)

# The long fault run: 300 kill -9 cycles under load, a flapping backup.
chaos: $(STAMP)
	$(PY) bench/chaos.py $(CHAOS_ARGS)

check: $(STAMP)
	$(VENV)/bin/smtpdup check $(CHECK_ARGS)

# Cheap and dependency-free: every file must at least compile.
lint: $(STAMP)
	$(PY) -m compileall -q smtpdup tests bench

# Build and test leftovers only; never spool/ (undelivered backup copies)
# nor demo-mail/ (what the demo received).
clean:
	rm -rf build dist *.egg-info .pytest_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
