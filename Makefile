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
# xdist workers of the unit tier (scripts/unit-tier.sh says why two)
UNIT_WORKERS ?= 2
# mitmproxy 11 pins tornado<=6.4.2 and an older cryptography: it gets its own env (pyproject's `proxy`
# extra); the proxy service runs from it as a separate process (capsem_vm/proxy/service.py finds it:
# .venv-proxy beside .venv is the checkout's, /opt/capsem/proxy-venv an installed host's)
PROXY_VENV ?= .venv-proxy

.PHONY: demo test unit fuzz vm chaos many ray-test ray-bench user-build-test other-release system venv proxy-venv image clean help

help:
	@echo "make demo   - set up everything and run a real notebook in a capsem kernel"
	@echo "make test   - set up everything and run the test suite: the unit tier, then the VM tier"
	@echo "make unit   - the tests that need no VM and no VM image (no image build; minutes)"
	@echo "make vm     - build (or reuse) the VM image and run the tests that boot VMs or need it (and the few slow ones)"
	@echo "make user-build-test - an unprivileged user builds a rootfs of their own (mmdebstrap unshare; minutes)"
	@echo "make fuzz   - the property tests with fresh random examples, ten times as many (finds new cases)"
	@echo "make many   - 20 capsem kernels at once (10 pooled, 10 cold) beside 20 local ipykernels: bench/many.py (MANY_ARGS; minutes, under the VM lock)"
	@echo "make chaos  - kill each host process of a running kernel at random moments, many rounds (CAPSEM_CHAOS_ROUNDS, CAPSEM_CHAOS_SEED)"
	@echo "make ray-test - capsem kernels on a multi-node Ray cluster on this machine, the full form (docs/RAY.md; minutes)"
	@echo "make ray-bench - bench/ray.py: 20 sandboxes across 2 Ray nodes, cold and warm, round trip remote vs local (long)"
	@echo "make system - install the Debian packages capsem (and working on it) needs (root): capsem setup --dev"
	@echo "make venv   - create the Python env in $(VENV)"
	@echo "make image  - build (or reuse the cached) VM image: capsem setup --image"
	@echo "make proxy-venv - create the egress proxy's env (mitmproxy) in $(PROXY_VENV): capsem setup --proxy-env"
	@echo "make other-release RELEASE=trixie - the VM, kernel and egress tests on another Debian host release (root)"

# The three set-up targets are `capsem setup` with parts turned off. `system` comes before the venv
# exists (the venv needs python3-venv and npm): scripts/setup-system.sh runs the same code with the
# system's python3 from this checkout (capsem_vm.setup's packages part needs only the stdlib).
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

$(PROXY_VENV)/.installed: pyproject.toml | $(VENV)/.installed
	$(CAPSEM) setup --no-packages --no-image --proxy-env $(PROXY_VENV)
	touch $@

proxy-venv: $(PROXY_VENV)/.installed

image: system venv
	$(CAPSEM) setup --no-packages --no-proxy-env --image

# mypy first (seconds): the VM contract (capsem_vm/vm_protocol.py) and both VMs that fulfil it.
# why: the unit tier runs with an empty image cache, so a test that needs the image but is not
# marked `vm` fails here, on every machine, instead of passing where an image happens to be cached
unit: system venv proxy-venv
	$(VENV)/bin/mypy
	UNIT_WORKERS=$(UNIT_WORKERS) scripts/unit-tier.sh $(VENV)/bin/pytest $(PYTEST_ARGS)

# property tests with fresh random examples (ten times as many): what fails becomes an @example
fuzz: venv
	CAPSEM_HYPOTHESIS_PROFILE=fuzz $(VENV)/bin/pytest -m "not vm" $$(grep -rl "from hypothesis" tests) $(PYTEST_ARGS)

vm: system venv proxy-venv image
	$(VENV)/bin/pytest -m "vm or slow" $(PYTEST_ARGS)

# issue 19's "20 kernels at once" in full (bench/many.py; the CI form is tests/test_many_kernels.py):
# holds the host for several minutes, so under the shared VM lock; results in bench/results/
MANY_ARGS ?=
many: system venv proxy-venv image
	flock /tmp/capsem-vm.lock $(PY) bench/many.py --json bench/results/many-$$(date -u +%F).json \
		--md bench/results/many-$$(date -u +%F).md $(MANY_ARGS)

# the chaos suite (tests/faults/test_chaos.py: a cold kernel's helpers; test_chaos_pool_server.py: a
# pooled kernel's helpers and the Jupyter server), many rounds per fault with a fresh seed each run
# (printed; CAPSEM_CHAOS_SEED=N reruns one); `make vm` runs it once per fault with the fixed seed
CAPSEM_CHAOS_ROUNDS ?= 10
chaos: system venv proxy-venv image
	@seed=$${CAPSEM_CHAOS_SEED:-$$(date +%s)}; echo "make chaos: CAPSEM_CHAOS_SEED=$$seed CAPSEM_CHAOS_ROUNDS=$(CAPSEM_CHAOS_ROUNDS)"; \
	CAPSEM_CHAOS_SEED=$$seed CAPSEM_CHAOS_ROUNDS=$(CAPSEM_CHAOS_ROUNDS) $(VENV)/bin/pytest -s tests/faults/test_chaos.py tests/faults/test_chaos_pool_server.py $(PYTEST_ARGS)

# capsem on a multi-node Ray cluster on this machine (issue 18, docs/RAY.md): `make vm` runs the reduced
# form (2 nodes, 1 sandbox each, one node kill); this adds jupyter_kernel_test and nbval on a Ray-placed
# kernel. ray-bench holds the VM lock for many minutes (20 TCG VMs)
ray-test: system venv proxy-venv image
	CAPSEM_RAY_FULL=1 $(VENV)/bin/pytest -s tests/test_ray_cluster.py tests/test_ray_capsem.py $(PYTEST_ARGS)

ray-bench: system venv proxy-venv image
	flock /tmp/capsem-vm.lock $(PY) bench/ray.py $(RAY_BENCH_ARGS)

# not in `make test` (minutes of mmdebstrap): the full rootfs build as a normal user, from the wheel
user-build-test: system venv proxy-venv image
	CAPSEM_TEST_FULL_USER_BUILD=1 $(VENV)/bin/pytest tests/test_normal_user.py -k rootfs_without_root $(PYTEST_ARGS)

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
