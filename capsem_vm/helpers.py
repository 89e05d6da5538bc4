"""Find the host programs capsem drives. Each comes from a Debian package (see scripts/setup-system.sh)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import MissingHelperError

SETUP_HINT = "run `make system` (or scripts/setup-system.sh as root) to install it"


@dataclass(frozen=True)
class Program:
    name: str
    path: Path
    dialect: str = ""  # virtiofsd: "c" (QEMU's, bookworm) or "rust" (trixie and later)


def _first_existing(env_var: str, names: list[str], extra_paths: list[str]) -> Path | None:
    override = os.environ.get(env_var)
    if override:
        return Path(override) if os.access(override, os.X_OK) else None
    for name in names:
        found = shutil.which(name)
        if found:
            return Path(found)
    for p in extra_paths:
        if os.access(p, os.X_OK):
            return Path(p)
    return None


# The finders below are lru_cache'd: caches, owner this process (where a host program is does not
# change while it runs; tests that point CAPSEM_QEMU etc. elsewhere call .cache_clear()).
@lru_cache(maxsize=None)
def qemu() -> Program:
    path = _first_existing("CAPSEM_QEMU", ["qemu-system-x86_64"], [])
    if not path:
        raise MissingHelperError("qemu-system-x86_64 not found (Debian package qemu-system-x86)", SETUP_HINT)
    return Program("qemu-system-x86_64", path)


@lru_cache(maxsize=None)
def virtiofsd() -> Program:
    # The Rust virtiofsd (trixie+) installs to /usr/libexec; bookworm's QEMU ships the C one.
    path = _first_existing("CAPSEM_VIRTIOFSD", [], ["/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"])
    if not path:
        raise MissingHelperError("virtiofsd not found (Debian package qemu-system-common or virtiofsd)", SETUP_HINT)
    return Program("virtiofsd", path, _virtiofsd_dialect(path))


def _virtiofsd_dialect(path: Path) -> str:
    # Read the option names from the binary rather than running `--help`: the C virtiofsd calls
    # setgroups() before parsing options, so as a non-root user it fails even for --help (it runs
    # in a user namespace later, see virtiofs.py).
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MissingHelperError(f"{path} cannot be read: {exc}", SETUP_HINT) from None
    if b"shared-dir" in data:
        return "rust"
    if b"source=PATH" in data:
        return "c"
    raise MissingHelperError(f"{path} is neither the C nor the Rust virtiofsd", SETUP_HINT)


@lru_cache(maxsize=None)
def vhost_device_vsock() -> Program:
    path = _first_existing("CAPSEM_VHOST_DEVICE_VSOCK", ["vhost-device-vsock"], ["/opt/capsem/bin/vhost-device-vsock"])
    if not path:
        raise MissingHelperError(
            "vhost-device-vsock not found (needed when /dev/vhost-vsock is unusable)", SETUP_HINT)
    return Program("vhost-device-vsock", path)


@lru_cache(maxsize=None)
def unshare() -> Program:
    path = _first_existing("CAPSEM_UNSHARE", ["unshare"], [])
    if not path:
        raise MissingHelperError("unshare not found (Debian package util-linux)", SETUP_HINT)
    return Program("unshare", path)


@lru_cache(maxsize=None)
def setpriv() -> Program:
    path = _first_existing("CAPSEM_SETPRIV", ["setpriv"], [])
    if not path:
        raise MissingHelperError("setpriv not found (Debian package util-linux)", SETUP_HINT)
    return Program("setpriv", path)


def newuidmap_available() -> bool:
    """Unprivileged virtiofsd needs a full uid map (newuidmap from Debian's uidmap package)."""
    return bool(shutil.which("newuidmap") and shutil.which("newgidmap"))
