# Quick start: `make run` (relay on the embedded defaults) and `make test` (the whole suite).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
CONFIG ?= config/relay.toml
# `make install`: relay in a virtualenv of its own under $(PREFIX)/lib/relay, and the
# `relay` command linked into $(PREFIX)/bin (on PATH); DESTDIR for staged installs.
PREFIX ?= /usr/local

.PHONY: run test bench venv test-venv install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# constraints.txt holds the exact versions the suite passed with (CI and `make test` use it).
$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -q -c constraints.txt -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $@ $(VENV)/.installed

venv: $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/relay -c $(CONFIG) serve

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Benchmark (see README "Benchmark"); Postfix's smtp-source/smtp-sink are used when installed.
BENCH_ARGS ?= --compare-postfix
bench: $(VENV)/.installed-test
	$(BIN)/python bench/run.py $(BENCH_ARGS)

install:
	$(PYTHON) -m venv $(DESTDIR)$(PREFIX)/lib/relay
	$(DESTDIR)$(PREFIX)/lib/relay/bin/pip install -q --upgrade pip
	$(DESTDIR)$(PREFIX)/lib/relay/bin/pip install -q .
	install -d $(DESTDIR)$(PREFIX)/bin
	ln -sf $(PREFIX)/lib/relay/bin/relay $(DESTDIR)$(PREFIX)/bin/relay
	@echo "installed: $(PREFIX)/bin/relay (run it where config/relay.toml is, or give -c / RELAY_CONFIG)"

clean:
	rm -rf $(VENV) var .pytest_cache
