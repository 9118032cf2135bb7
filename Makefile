# The README's two commands. Each creates its own virtual environment in .venv and installs
# pinned dependencies into it; nothing installed by hand is assumed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test

$(VENV)/.runtime: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.runtime
	$(PY) -m minipeft demo

test: $(VENV)/.test
	$(PY) -m pytest -q
