"""Shared fixtures. Tests that boot VMs need the default image (`make image` builds it).

Mark `vm` (pytest.mark.vm) every test that boots a VM or needs the image: `make unit` runs the
others with an empty image cache, before the image is built; `make vm` runs the marked ones."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

REPO = Path(__file__).resolve().parent.parent

# why: speed is measured in bench/, not in pass/fail tests. Hypothesis' default 200 ms deadline
# per example failed property tests at random on a host shared with running VMs (one example took
# 300-550 ms, its replay 3 ms); the examples and their checks are unchanged.
# why derandomize: a CI run on a clean clone must not fail on an example nobody drew before; the same
# examples run every time. `make fuzz` (profile "fuzz") draws fresh random ones, ten times as many,
# to look for new failures: what it finds becomes an @example.
settings.register_profile("capsem", deadline=None, derandomize=True)
settings.register_profile("fuzz", deadline=None, derandomize=False, max_examples=1000)
settings.load_profile(os.environ.get("CAPSEM_HYPOTHESIS_PROFILE", "capsem"))
CAPSEM = [sys.executable, "-m", "capsem_vm.cli"]


@pytest.fixture(scope="session")
def image_dir():
    """The default VM image; a missing image is an error, never a skip."""
    from capsem_vm.image.store import default_image_dir
    from capsem_vm.errors import ImageError

    try:
        return default_image_dir()
    except ImageError as exc:
        pytest.fail(f"no VM image: {exc} (run `make image`)")


HELPER_NAMES = ("qemu-system-x86_64", "virtiofsd", "vhost-device-vsock")


def helper_processes(*markers: str) -> list[str]:
    """Live capsem helper processes (QEMU, virtiofsd, vhost-device-vsock) as "pid cmdline".

    With markers, only those whose command line mentions one of them (a runtime dir, a share path):
    other engineers' or tests' VMs on the same machine must not count.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state == "Z" or not args:
            continue
        if not any(name in args.split(" ", 1)[0] for name in HELPER_NAMES):
            continue
        if "qemu-system" in args and "capsem" not in args:
            continue
        if markers and not any(m in args for m in markers):
            continue
        found.append(f"{entry.name} {args}")
    return sorted(found)


@pytest.fixture
def runtime_root(tmp_path, monkeypatch):
    """A private runtime dir per test, so leftovers are attributable."""
    root = Path("/tmp") / f"capsem-rt-{os.getpid()}-{tmp_path.name[-12:]}"
    root.mkdir(mode=0o700)
    monkeypatch.setenv("CAPSEM_RUNTIME_DIR", str(root))
    yield root
    shutil.rmtree(root, ignore_errors=True)
