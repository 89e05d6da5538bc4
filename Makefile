# capsem for Jupyter. `make demo` and `make test` set up everything they need from nothing
# (Debian packages, the Python env, the VM image) and are idempotent.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
CAPSEM := $(VENV)/bin/capsem
PYTEST_ARGS ?=
# mitmproxy 11 (the last for py3.11) pins tornado<=6.4.2 and an older cryptography: it gets its own
# env; the proxy service runs from it as a separate process (capsem_vm/proxy/service.py finds it)
PROXY_VENV ?= .venv-proxy

.PHONY: demo test system venv proxy-venv image unit clean help

help:
	@echo "make demo   - set up everything and run a real notebook in a capsem kernel"
	@echo "make test   - set up everything and run the test suite"
	@echo "make system - install the Debian packages capsem needs (root)"
	@echo "make venv   - create the Python env in $(VENV)"
	@echo "make image  - build (or reuse the cached) VM image"
	@echo "make proxy-venv - create the egress proxy's env (mitmproxy) in $(PROXY_VENV)"

system:
	bash scripts/setup-system.sh

# the editable install also builds the JupyterLab extension (labextension/, npm) and enables it
LABEXT_SRC := labextension/package.json labextension/package-lock.json $(wildcard labextension/src/*.ts labextension/style/*)

$(VENV)/.installed: pyproject.toml $(LABEXT_SRC)
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

$(PROXY_VENV)/.installed: pyproject.toml
	python3 -m venv $(PROXY_VENV)
	$(PROXY_VENV)/bin/pip install -q --upgrade pip
	$(PROXY_VENV)/bin/pip install -q 'mitmproxy==11.0.2' 'platformdirs>=3' 'uvloop>=0.19'
	touch $@

proxy-venv: $(PROXY_VENV)/.installed

image: system venv
	$(CAPSEM) image build

test: system venv proxy-venv image
	$(VENV)/bin/pytest $(PYTEST_ARGS)

demo: system venv proxy-venv image
	$(PY) scripts/demo.py $(DEMO_ARGS)

clean:
	rm -rf $(VENV) $(PROXY_VENV)
