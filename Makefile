# Two commands for a fresh machine with only Python 3.11+ installed:
#   make demo   creates .venv, installs rankcut, runs the embedded demo
#   make test   creates .venv, installs rankcut with test extras, runs the test suite
#               (tests marked slow are left out; make test-all runs them too)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test test-all lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-runtime: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[demo]"
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed-runtime

demo: $(VENV)/.installed-runtime
	$(BIN)/python -m rankcut.demo

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest --durations=15

test-all: $(VENV)/.installed-dev   # also the slow tests (more torchvision models; ~15 min)
	$(BIN)/python -m pytest -m ''

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .

bench: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/decompose_speed.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis src/*.egg-info
