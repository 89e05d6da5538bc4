"""Shared fixtures. Tests that boot VMs need the default image (`make image` builds it)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
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


def helper_processes() -> list[str]:
    """Command lines of capsem helper processes (QEMU, virtiofsd, vhost-device-vsock) still running."""
    out = subprocess.run(["ps", "-eo", "pid=,stat=,args="], capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines():
        pid, stat, args = line.strip().split(None, 2) + [""] * (3 - len(line.strip().split(None, 2)))
        if stat.startswith("Z"):
            continue
        if any(name in args for name in ("qemu-system-x86_64 -name capsem", "virtiofsd", "vhost-device-vsock")):
            found.append(f"{pid} {args}")
    return found


@pytest.fixture
def runtime_root(tmp_path, monkeypatch):
    """A private runtime dir per test, so leftovers are attributable."""
    root = Path("/tmp") / f"capsem-rt-{os.getpid()}-{tmp_path.name[-12:]}"
    root.mkdir(mode=0o700)
    monkeypatch.setenv("CAPSEM_RUNTIME_DIR", str(root))
    yield root
    shutil.rmtree(root, ignore_errors=True)
