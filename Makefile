# The README's two commands. Each creates its own virtual environment in .venv and installs
# pinned dependencies into it (constraints.txt: the exact version of each); nothing installed by hand is assumed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test

$(VENV)/.runtime: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

demo: $(VENV)/.runtime
	$(PY) -m minipeft demo

test: $(VENV)/.test
	$(PY) -m pytest -q
