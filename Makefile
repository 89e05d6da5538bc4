# capsem for Jupyter. `make demo` and `make test` set up everything they need from nothing
# (Debian packages, the Python env, the VM image) and are idempotent. `make test` runs the unit
# tier first (no VM, no image: a failure shows in minutes), then builds the image and runs the VM
# tier; the pytest marker `vm` (pyproject.toml) is the exact split, no test runs twice.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
CAPSEM := $(VENV)/bin/capsem
PYTEST_ARGS ?=
# mitmproxy 11 (the last for py3.11) pins tornado<=6.4.2 and an older cryptography: it gets its own
# env; the proxy service runs from it as a separate process (capsem_vm/proxy/service.py finds it)
PROXY_VENV ?= .venv-proxy

.PHONY: demo test unit fuzz vm system venv proxy-venv image clean help other-release

help:
	@echo "make demo   - set up everything and run a real notebook in a capsem kernel"
	@echo "make test   - set up everything and run the test suite: the unit tier, then the VM tier"
	@echo "make unit   - the tests that need no VM and no VM image (no image build; minutes)"
	@echo "make vm     - build (or reuse) the VM image and run the tests that boot VMs or need it (and the few slow ones)"
	@echo "make fuzz   - the property tests with fresh random examples, ten times as many (finds new cases)"
	@echo "make system - install the Debian packages capsem needs (root)"
	@echo "make venv   - create the Python env in $(VENV)"
	@echo "make image  - build (or reuse the cached) VM image"
	@echo "make proxy-venv - create the egress proxy's env (mitmproxy) in $(PROXY_VENV)"
	@echo "make other-release RELEASE=trixie - the VM, kernel and egress tests on another Debian host release (root)"

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

# mypy first (seconds): the VM contract (capsem_vm/vm_protocol.py) and both VMs that fulfil it.
# why: the unit tier runs with an empty image cache, so a test that needs the image but is not
# marked `vm` fails here, on every machine, instead of passing where an image happens to be cached
unit: system venv proxy-venv
	$(VENV)/bin/mypy
	@cache=$$(mktemp -d); start=$$(date +%s); \
	CAPSEM_CACHE_DIR=$$cache/user CAPSEM_SYSTEM_CACHE_DIR=$$cache/system \
	  $(VENV)/bin/pytest -m "not vm and not slow" $(PYTEST_ARGS); rc=$$?; \
	rm -rf "$$cache"; echo "make unit: unit tier took $$(( $$(date +%s) - start ))s (exit $$rc)"; exit $$rc

# property tests with fresh random examples (ten times as many): what fails becomes an @example
fuzz: venv
	CAPSEM_HYPOTHESIS_PROFILE=fuzz $(VENV)/bin/pytest -m "not vm" $$(grep -rl "from hypothesis" tests) $(PYTEST_ARGS)

vm: system venv proxy-venv image
	$(VENV)/bin/pytest -m "vm or slow" $(PYTEST_ARGS)

# sub-makes, not prerequisites: the order (unit tier, then image, then VM tier) holds under -j too
test:
	$(MAKE) unit
	$(MAKE) vm

demo: system venv proxy-venv image
	$(PY) scripts/demo.py $(DEMO_ARGS)

# Another Debian host release (issue 16): build (or reuse) a root of RELEASE with its own QEMU, virtiofsd,
# vhost-device-vsock and Python (scripts/other-release.sh, cached in /var/cache/capsem/hostroots) and run
# the VM, kernel and egress test modules inside it, on this host's image. CI runs the reduced form
# (tests/test_other_release.py, in `make vm`).
RELEASE ?= trixie
OTHER_RELEASE_TESTS ?= tests/test_vm.py tests/test_kernel_lifecycle.py tests/test_egress_vm.py tests/test_sandbox.py \
  --deselect tests/test_vm.py::test_tampered_assets_never_boot
# (that test hard-links the image into its tmp dir: the root sees the host's image through a read-only
# bind mount, across which no link can be made; what it checks, asset hashing, is the same Python)
other-release: system image
	bash scripts/other-release.sh $(RELEASE) versions
	@start=$$(date +%s); bash scripts/other-release.sh $(RELEASE) run python -m pytest -p no:cacheprovider \
	  $(OTHER_RELEASE_TESTS) $(PYTEST_ARGS); rc=$$?; \
	echo "make other-release: $(RELEASE) tests took $$(( $$(date +%s) - start ))s (exit $$rc)"; exit $$rc

clean:
	rm -rf $(VENV) $(PROXY_VENV)
