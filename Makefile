# capsem for Jupyter. `make demo` and `make test` set up everything they need from nothing
# (Debian packages, the Python env, the VM image) and are idempotent.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
CAPSEM := $(VENV)/bin/capsem
PYTEST_ARGS ?=

.PHONY: demo test system venv image unit clean help

help:
	@echo "make demo   - set up everything and run a real notebook in a capsem kernel"
	@echo "make test   - set up everything and run the test suite"
	@echo "make system - install the Debian packages capsem needs (root)"
	@echo "make venv   - create the Python env in $(VENV)"
	@echo "make image  - build (or reuse the cached) VM image"

system:
	bash scripts/setup-system.sh

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

image: system venv
	$(CAPSEM) image build

test: system venv image
	$(VENV)/bin/pytest $(PYTEST_ARGS)

demo: system venv image
	$(CAPSEM) vm run -- python3 -c 'import platform; print("hello from the capsem guest:", platform.uname())'

clean:
	rm -rf $(VENV)
