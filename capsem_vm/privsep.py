"""Who the helper programs run as when capsem itself runs as root.

A capsem started by a normal user runs its helpers as that user: they have no privilege to drop.
A capsem started as root (a Jupyter server run by root, `sudo capsem vm run`) never runs them as
root:

- QEMU and vhost-device-vsock of each VM run as a uid/gid of their own, leased from a range no
  account uses (HELPER_UID_BASE .. +HELPER_UID_COUNT, no supplementary groups but `kvm` when QEMU
  needs /dev/kvm). One VM's helpers therefore cannot signal, ptrace or read the memory of another
  VM's helpers, nor touch any file but the VM's own runtime dir (mode 0700, owned by that uid).
  Why per VM rather than one shared `capsem-vm` account: a guest that escaped into its QEMU would
  otherwise share a uid with every other VM's QEMU on the host.
- each virtiofsd runs as a uid leased for it alone too, serving its folder through an idmapped mount
  that maps the folder's owner to that uid (virtiofs.py, idmap_share.py): files the guest creates
  belong to the owner, while virtiofsd is neither root nor the owner (whose other files it could
  otherwise reach if it were subverted).

Leases are files in LEASE_DIR (root only) created with O_EXCL and naming the owner process; a lease
whose owner died is taken over.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import secrets
import stat
from pathlib import Path

from . import nofollow
from .errors import VMError
from .process import Identity

log = logging.getLogger(__name__)

HELPER_UID_BASE = int(os.environ.get("CAPSEM_HELPER_UID_BASE", "2091188224"))  # 0x7CA50000
HELPER_UID_COUNT = 65536
LEASE_DIR = Path(os.environ.get("CAPSEM_UID_LEASE_DIR", "/run/capsem-uids"))


def privileged() -> bool:
    return os.geteuid() == 0


def _start_time(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _lease_dir() -> Path:
    LEASE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = LEASE_DIR.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
        raise VMError(f"{LEASE_DIR} is not a directory owned by root")
    nofollow.chmod(LEASE_DIR, 0o700)
    return LEASE_DIR


def _stale(path: Path) -> bool:
    try:
        pid, start = path.read_text().split()
    except (OSError, ValueError):
        return True
    return not pid.isdigit() or _start_time(int(pid)) != start


def _account_exists(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        pass
    try:
        grp.getgrgid(uid)
        return True
    except KeyError:
        return False


class Lease:
    """One VM's helper uid (== gid). release() when the VM is gone."""

    def __init__(self, uid: int, path: Path):
        self.uid = uid
        self.path = path

    def release(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def lease_uid() -> Lease:
    d = _lease_dir()
    me = f"{os.getpid()} {_start_time(os.getpid())}\n"
    for _ in range(256):
        uid = HELPER_UID_BASE + secrets.randbelow(HELPER_UID_COUNT)
        if _account_exists(uid):
            continue
        path = d / str(uid)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            if _stale(path):
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return Lease(uid, path)
    raise VMError(f"no free helper uid in {HELPER_UID_BASE}..{HELPER_UID_BASE + HELPER_UID_COUNT - 1}")


def kvm_groups(accel: str) -> tuple[int, ...]:
    """Supplementary groups QEMU needs: the group of /dev/kvm when KVM is used."""
    if accel != "kvm":
        return ()
    try:
        st = os.stat("/dev/kvm")
    except OSError:
        return ()
    if st.st_mode & 0o006 == 0o006:
        return ()
    if st.st_mode & 0o060 == 0o060 and st.st_gid != 0:
        return (st.st_gid,)
    raise VMError("QEMU runs as an unprivileged user, but /dev/kvm is accessible to root only",
                  "give /dev/kvm to group kvm with mode 0660 (Debian's udev rules do), or use --accel tcg")


def helper_identity(lease: Lease, accel: str) -> Identity:
    return Identity(lease.uid, lease.uid, kvm_groups(accel))
