"""The fixtures every test module shares (pytest finds them here: never import a fixture). Tests
that boot VMs need the default image (`make image` builds it).

Mark `vm` (pytest.mark.vm) every test that boots a VM or needs the image: `make unit` runs the
others with an empty image cache, before the image is built; `make vm` runs the marked ones, and the
few marked `slow` (no VM, but tens of seconds) that would hold up the unit tier.

Helper modules (no tests, plain names: agent_harness, proxy_helpers, proxy_world, kernel_helpers,
...) import by name: pyproject.toml puts tests/ and tests/security/ on the path (`pythonpath`).

- `image_dir` (session): the default VM image, an error when there is none.
- `runtime_root`: a private CAPSEM_RUNTIME_DIR per test.
- `capsem_kernelspecs` (session): the capsem kernelspecs in a private prefix (kernel_helpers).
- `agent`: the real guest agent running on the host (agent_harness.Agent).
- `world` (module, async): the module's proxy world, built by the module's `build_world`.
- `server_world` (module): a Jupyter server with one capsem kernel (one VM), as the module's
  `SERVER_WORLD` (jupyter_helpers.ServerWorld) says.
"""

import os
import shutil
from pathlib import Path

import pytest
import pytest_asyncio
from hypothesis import settings

import jupyter_helpers
import kernel_helpers
from agent_harness import Agent

# why: speed is measured in bench/, not in pass/fail tests. Hypothesis' default 200 ms deadline
# per example failed property tests at random on a host shared with running VMs (one example took
# 300-550 ms, its replay 3 ms); the examples and their checks are unchanged.
# why derandomize: a CI run on a clean clone must not fail on an example nobody drew before; the same
# examples run every time. `make fuzz` (profile "fuzz") draws fresh random ones, ten times as many,
# to look for new failures: what it finds becomes an @example.
settings.register_profile("capsem", deadline=None, derandomize=True)
settings.register_profile("fuzz", deadline=None, derandomize=False, max_examples=1000)
settings.load_profile(os.environ.get("CAPSEM_HYPOTHESIS_PROFILE", "capsem"))


@pytest.fixture(scope="session")
def image_dir():
    """The default VM image; a missing image is an error, never a skip."""
    from capsem_vm.image.store import default_image_dir
    from capsem_vm.errors import ImageError

    try:
        return default_image_dir()
    except ImageError as exc:
        pytest.fail(f"no VM image: {exc} (run `make image`)")


@pytest.fixture
def runtime_root(tmp_path, monkeypatch):
    """A private runtime dir per test, so leftovers are attributable."""
    root = Path("/tmp") / f"capsem-rt-{os.getpid()}-{tmp_path.name[-12:]}"
    root.mkdir(mode=0o700)
    monkeypatch.setenv("CAPSEM_RUNTIME_DIR", str(root))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def capsem_kernelspecs(image_dir):
    state = kernel_helpers.setup_kernelspecs()
    # The installed spec is the real one (CLI output): our provisioner, message-mode interrupt.
    from jupyter_client.kernelspec import KernelSpecManager
    spec = KernelSpecManager().get_kernel_spec(kernel_helpers.KERNEL)
    assert spec.resource_dir.startswith(str(state["prefix"]))
    assert spec.metadata["kernel_provisioner"]["provisioner_name"] == "capsem-provisioner"
    assert spec.interrupt_mode == "message"
    yield state
    kernel_helpers.teardown_kernelspecs()


@pytest.fixture
def agent(tmp_path):
    a = Agent(tmp_path)
    yield a
    a.stop()


# why module scope and the module's loop: a world (proxy service, upstream servers, bridges) takes
# seconds to start, every test of the module shares it, and its bridges serve on that loop
@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def world(request, tmp_path_factory):
    """The module's world: `build_world(tmp_path_factory)` of the test module, an async context
    manager (contextlib.asynccontextmanager) that builds it and takes it down again."""
    build = getattr(request.module, "build_world", None)
    if build is None:
        pytest.fail(f"{request.module.__name__} uses the `world` fixture but defines no build_world")
    async with build(tmp_path_factory) as w:
        yield w


# why module scope: one VM per module (a capsem kernel boots in minutes under TCG)
@pytest.fixture(scope="module")
def server_world(request, tmp_path_factory, image_dir):
    """A Jupyter server with the capsem extension and one running capsem kernel, as the module's
    `SERVER_WORLD` (jupyter_helpers.ServerWorld) says; a dict (jupyter_helpers.capsem_server)."""
    spec = getattr(request.module, "SERVER_WORLD", None)
    if spec is None:
        pytest.fail(f"{request.module.__name__} uses the `server_world` fixture but defines no SERVER_WORLD")
    with jupyter_helpers.capsem_server(tmp_path_factory.mktemp(spec.name), spec) as w:
        yield w
