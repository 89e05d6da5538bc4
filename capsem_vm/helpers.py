"""Find the host programs capsem drives. Each comes from a Debian package (`capsem setup`: capsem_vm/setup/hostos.py)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from functools import wraps
from pathlib import Path

from .errors import MissingHelperError

SETUP_HINT = "run `capsem setup` as root to install it (in a source checkout: `make system`)"


@dataclass(frozen=True)
class Program:
    name: str
    path: Path
    dialect: str = ""  # virtiofsd: "c" (QEMU's, bookworm) or "rust" (trixie and later)


def _first_existing(env_var: str, names: list[str], extra_paths: list[str]) -> Path | None:
    override = os.environ.get(env_var)
    if override:
        return Path(override) if os.path.isfile(override) and os.access(override, os.X_OK) else None
    for name in names:
        found = shutil.which(name)
        if found:
            return Path(found)
    for p in extra_paths:
        if os.access(p, os.X_OK):
            return Path(p)
    return None


def _identity(path: Path) -> tuple | None:
    """What tells an installed program apart from the one an upgrade put in its place (or removed)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size) if os.access(path, os.X_OK) else None


def revalidated(env_var: str):
    """Cache a finder's Program while its file stays the same one. Why not lru_cache: a Jupyter
    server (or the warm pool) outlives package upgrades, and an upgrade may remove the program,
    move it (bookworm's C virtiofsd in /usr/lib/qemu, trixie's Rust one in /usr/libexec) or change
    its flag dialect: a cached stale path would fail every later VM with a bare ENOENT, or run the
    new binary with the old flags. One stat per call; a changed `env_var` override is looked up
    again too; `.cache_clear()` as with lru_cache."""
    def wrap(find):
        cache: dict = {}

        @wraps(find)
        def finder() -> Program:
            key = os.environ.get(env_var)
            hit = cache.get("program")
            if hit is not None and cache.get("key") == (key, _identity(hit.path)):
                return hit
            cache.clear()
            program = find()
            cache.update(program=program, key=(key, _identity(program.path)))
            return program

        finder.cache_clear = cache.clear
        return finder
    return wrap


def _find(name: str, env_var: str, names: list[str], extra_paths: list[str], missing: str) -> Program:
    path = _first_existing(env_var, names, extra_paths)
    if not path:
        override = os.environ.get(env_var)
        if override:
            raise MissingHelperError(f"{env_var}={override} is not an executable file (removed or moved by an "
                                     f"upgrade?): {missing}",
                                     f"point {env_var} at the installed program, or unset it; {SETUP_HINT}")
        raise MissingHelperError(missing, SETUP_HINT)
    return Program(name, path)


@revalidated("CAPSEM_QEMU")
def qemu() -> Program:
    return _find("qemu-system-x86_64", "CAPSEM_QEMU", ["qemu-system-x86_64"], [],
                 "qemu-system-x86_64 not found (Debian package qemu-system-x86)")


@revalidated("CAPSEM_VIRTIOFSD")
def virtiofsd() -> Program:
    # The Rust virtiofsd (trixie+) installs to /usr/libexec; bookworm's QEMU ships the C one.
    found = _find("virtiofsd", "CAPSEM_VIRTIOFSD", [], ["/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"],
                  "virtiofsd not found (Debian package qemu-system-common or virtiofsd)")
    return Program(found.name, found.path, _virtiofsd_dialect(found.path))


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


@revalidated("CAPSEM_VHOST_DEVICE_VSOCK")
def vhost_device_vsock() -> Program:
    return _find("vhost-device-vsock", "CAPSEM_VHOST_DEVICE_VSOCK", ["vhost-device-vsock"],
                 ["/opt/capsem/bin/vhost-device-vsock"],
                 "vhost-device-vsock not found (needed when /dev/vhost-vsock is unusable)")


@revalidated("CAPSEM_UNSHARE")
def unshare() -> Program:
    return _find("unshare", "CAPSEM_UNSHARE", ["unshare"], [], "unshare not found (Debian package util-linux)")


@revalidated("CAPSEM_SETPRIV")
def setpriv() -> Program:
    return _find("setpriv", "CAPSEM_SETPRIV", ["setpriv"], [], "setpriv not found (Debian package util-linux)")


def newuidmap_available() -> bool:
    """Unprivileged virtiofsd needs a full uid map (newuidmap from Debian's uidmap package)."""
    return bool(shutil.which("newuidmap") and shutil.which("newgidmap"))
