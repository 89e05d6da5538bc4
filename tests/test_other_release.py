"""capsem on another Debian host release, for real (issue 16): a Debian 13 (trixie) root with that
release's own QEMU (10.x), Rust virtiofsd, Python 3.13, and vhost-device-vsock from Debian's unstable
suite as `make system` fetches it (trixie has none), built by scripts/other-release.sh and cached in
/var/cache/capsem/hostroots. Inside it (chroot in a private mount and pid namespace) this checkout
boots the host-built guest image (mounted read-only): a kernel VM through the Sandbox API, a write
to its shared folder read back on the host side, one allowed and one refused request through the
egress proxy (mitmproxy in the root's own env) to real servers on this machine (egress_world).

The reduced form CI runs; `make other-release RELEASE=trixie` runs the VM, kernel and egress test
modules whole. Needs root (mmdebstrap --mode=root, chroot, mounts).
"""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

from host_helpers import REPO

pytestmark = pytest.mark.vm

RELEASE = os.environ.get("CAPSEM_OTHER_RELEASE", "trixie")
SCRIPT = REPO / "scripts" / "other-release.sh"
# the parts of tests/test_sandbox.py that make the reduced form: boot, write to the share and read it
# on the host, one allowed and one refused request (through the proxy, to servers on this machine)
SMOKE = ("tests/test_sandbox.py", "-k", "commands_run_in_the_vm_and_folder or network_rows_allowed_and_refused")


def _script(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), RELEASE, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def root():
    if os.geteuid() != 0:
        pytest.fail("the other-release test builds a root with mmdebstrap and chroots into it: run it as root")
    t0 = time.monotonic()
    built = _script("build", timeout=1800)
    assert built.returncode == 0, built.stderr[-4000:]
    print(f"\n{RELEASE} root: {built.stdout.strip()} ready in {time.monotonic() - t0:.1f} s")
    return built.stdout.strip()


def test_the_release_brings_its_own_qemu_virtiofsd_and_python(root):
    out = _script("versions", timeout=120)
    assert out.returncode == 0, out.stderr[-4000:]
    print(out.stdout)
    if RELEASE == "trixie":
        assert re.search(r"QEMU emulator version 10\.", out.stdout), out.stdout
        assert re.search(r"virtiofsd 1\.", out.stdout), out.stdout  # the Rust one
        assert re.search(r"Python 3\.13\.", out.stdout), out.stdout
    # capsem's own view inside the root: the Rust virtiofsd dialect, that release's QEMU
    probe = _script("run", "python", "-c",
                    "from capsem_vm import helpers; print(helpers.qemu().path, helpers.virtiofsd().path, "
                    "helpers.virtiofsd().dialect, helpers.vhost_device_vsock().path)", timeout=120)
    assert probe.returncode == 0, probe.stderr[-4000:]
    assert probe.stdout.split() == ["/usr/bin/qemu-system-x86_64", "/usr/libexec/virtiofsd", "rust",
                                    "/usr/bin/vhost-device-vsock"], probe.stdout


def test_kernel_vm_share_and_egress_inside_the_release(root):
    t0 = time.monotonic()
    out = _script("run", "python", "-m", "pytest", "-p", "no:cacheprovider", "-q", "-s", *SMOKE, timeout=900)
    print(out.stdout[-6000:])
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-4000:]
    assert re.search(r"\b2 passed\b", out.stdout), out.stdout[-2000:]
    print(f"{RELEASE} smoke run: {time.monotonic() - t0:.1f} s")
