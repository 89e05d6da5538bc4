"""Pick the accelerator: KVM where it really runs a stock kernel, TCG otherwise."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CHOICES = ("auto", "kvm", "tcg")


@dataclass(frozen=True)
class AccelChoice:
    accel: str  # "kvm" or "tcg"
    reason: str


def kvm_status() -> tuple[bool, str]:
    """Is KVM usable for a stock Debian kernel? Returns (usable, why)."""
    if not os.path.exists("/dev/kvm"):
        return False, "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is not readable and writable by this user (join the kvm group)"
    modules = Path("/sys/module")
    # kvm_pvm provides /dev/kvm for PVM-enabled guest kernels only: a stock kernel hangs under it.
    if (modules / "kvm_pvm").exists():
        return False, "/dev/kvm is provided by kvm_pvm, which cannot run a stock guest kernel"
    if not ((modules / "kvm_intel").exists() or (modules / "kvm_amd").exists()):
        return False, "neither kvm_intel nor kvm_amd is loaded"
    if os.geteuid() == 0:  # QEMU then runs as an unprivileged uid (privsep.py) with group kvm
        st = os.stat("/dev/kvm")
        if not (st.st_mode & 0o006 == 0o006 or (st.st_mode & 0o060 == 0o060 and st.st_gid != 0)):
            return False, ("/dev/kvm is accessible to root only, and QEMU does not run as root "
                           "(give it to group kvm, mode 0660, as Debian's udev rules do)")
    return True, "/dev/kvm with hardware virtualisation"


def choose(requested: str = "auto") -> AccelChoice:
    if requested not in CHOICES:
        raise ValueError(f"accelerator must be one of {', '.join(CHOICES)}, not {requested!r}")
    if requested == "tcg":
        return AccelChoice("tcg", "TCG requested")
    usable, why = kvm_status()
    if requested == "kvm":
        if not usable:
            from .errors import VMError
            raise VMError(f"KVM requested but not usable: {why}", "use --accel tcg (slower) or fix KVM access")
        return AccelChoice("kvm", "KVM requested")
    if usable:
        return AccelChoice("kvm", why)
    return AccelChoice("tcg", f"KVM not usable ({why}); using TCG emulation (about 10x slower)")
