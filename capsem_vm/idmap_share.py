"""Serve a folder to virtiofsd through an idmapped mount, then become the leased uid.

Run by a root capsem as the first stage of virtiofsd's command line:

    python -I idmap_share.py SOURCE BASE OWNER_UID OWNER_GID LEASED_ID READY_FD RDONLY -- ARGV...

In a mount namespace of its own (created here, private: nothing propagates to the host), it clones
SOURCE's mount tree (open_tree), maps it (mount_setattr MOUNT_ATTR_IDMAP, plus nosuid, nodev and
rdonly for a read-only share) so that the on-disk owner OWNER_UID/OWNER_GID appears as LEASED_ID
(and what LEASED_ID creates belongs to the owner), and attaches it (move_mount) at BASE + SOURCE on
a fresh 0755 tmpfs mounted over BASE (a root-owned empty directory): any uid can reach it, whatever
the modes of SOURCE's real ancestors (pytest's /tmp/pytest-of-root is 0700), and `ps` still shows
which folder a virtiofsd serves. It then drops to
LEASED_ID (no supplementary groups, no capabilities), re-arms the parent-death signal (a credential
change clears it), reports "ok" or "error: ..." on READY_FD and execs ARGV (unshare ... virtiofsd
with BASE + SOURCE as its source). So virtiofsd never runs as root nor as the owner, while files the guest
creates belong to the folder's owner on the host.

Why a stage of its own rather than the spawn's preexec: creating the user namespace that carries
the map needs a fork, which is unsafe in a child of the multi-threaded capsem process.
Self-contained (no capsem imports): it runs with `python -I`. Linux x86_64 only (syscall numbers).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import stat
import sys

NR_OPEN_TREE, NR_MOVE_MOUNT, NR_MOUNT_SETATTR = 428, 429, 442
CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x8, 0x4000, 1 << 18
OPEN_TREE_CLONE, OPEN_TREE_CLOEXEC = 1, os.O_CLOEXEC
AT_FDCWD, AT_EMPTY_PATH, AT_RECURSIVE = -100, 0x1000, 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV, MOUNT_ATTR_IDMAP = 0x1, 0x2, 0x4, 0x00100000
PR_SET_PDEATHSIG = 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


class StageError(Exception):
    pass


def _check(ret: int, what: str) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise StageError(f"{what}: {os.strerror(e)} (errno {e})")
    return ret


def userns_fd(uid_map: str, gid_map: str) -> int:
    """An fd of a new user namespace with these maps (a child creates it and waits)."""
    ready_r, ready_w = os.pipe()
    hold_r, hold_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(ready_r)
            os.close(hold_w)
            ok = _libc.unshare(CLONE_NEWUSER) == 0
            os.write(ready_w, b"1" if ok else b"0")
            os.read(hold_r, 1)  # until the parent has opened our namespace
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(hold_r)
    try:
        if os.read(ready_r, 1) != b"1":
            raise StageError("cannot create a user namespace for the idmapped mount")
        for name, text in (("uid_map", uid_map), ("gid_map", gid_map)):
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write(text)
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(ready_r)
        os.close(hold_w)
        os.waitpid(pid, 0)


def open_source(source: str, owner_uid: int) -> int:
    """O_PATH fd of the folder, checked to be the very directory capsem vetted (no symlink swapped
    in since) and still owned by the owner we map."""
    fd = os.open(source, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    real = os.readlink(f"/proc/self/fd/{fd}")
    st = os.fstat(fd)
    if real != source or st.st_uid != owner_uid:
        os.close(fd)
        raise StageError(f"{source} changed since it was checked (now {real!r}, owner uid {st.st_uid})")
    return fd


def check_base(base: str) -> None:
    st = os.lstat(base)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise StageError(f"mount point {base} is not a root-owned directory writable by root only")


def target_for(base: str, source: str) -> str:
    return base.rstrip("/") + source


def idmap_mount(source: str, base: str, owner_uid: int, owner_gid: int, leased: int, rdonly: bool) -> str:
    """Returns where the mapped folder is, in this (new) mount namespace."""
    check_base(base)
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(_libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "making the mount namespace private")
    _check(_libc.mount(b"tmpfs", base.encode(), b"tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                       b"mode=0755,size=64k,nr_inodes=256"), f"tmpfs on {base}")
    target = target_for(base, source)
    os.umask(0o022)
    os.makedirs(target, 0o755)
    ns = userns_fd(f"{owner_uid} {leased} 1\n", f"{owner_gid} {leased} 1\n")
    src = open_source(source, owner_uid)
    try:
        tree = _check(_libc.syscall(NR_OPEN_TREE, src, b"", OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_EMPTY_PATH
                                    | AT_RECURSIVE), f"open_tree({source})")
        attr = MountAttr(MOUNT_ATTR_IDMAP | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
                         | (MOUNT_ATTR_RDONLY if rdonly else 0), 0, 0, ns)
        _check(_libc.syscall(NR_MOUNT_SETATTR, tree, b"", AT_EMPTY_PATH | AT_RECURSIVE, ctypes.byref(attr),
                             ctypes.sizeof(attr)),
               f"idmapped mount of {source} (mount_setattr MOUNT_ATTR_IDMAP; needs Linux 5.12+ and a "
               "filesystem that supports idmapped mounts)")
        _check(_libc.syscall(NR_MOVE_MOUNT, tree, b"", AT_FDCWD, target.encode(), MOVE_MOUNT_F_EMPTY_PATH),
               f"move_mount to {target}")
        os.close(tree)
    finally:
        os.close(src)
        os.close(ns)
    return target


def become(leased: int, parent: int) -> None:
    """Drop to the leased uid/gid for good, then re-arm the parent-death signal."""
    os.setgroups([])
    os.setresgid(leased, leased, leased)
    os.setresuid(leased, leased, leased)
    if os.getresuid() != (leased,) * 3 or os.getgroups():
        raise StageError("could not drop to the leased uid")
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # capsem died while we were setting up
        os._exit(1)


def main(argv: list[str]) -> None:
    if "--" not in argv or argv.index("--") != 7 or len(argv) < 9:
        sys.exit("usage: idmap_share.py SOURCE BASE OWNER_UID OWNER_GID LEASED_ID READY_FD RDONLY -- ARGV...")
    source, base, owner_uid, owner_gid, leased, ready, rdonly = argv[:7]
    ready_fd = int(ready)
    parent = os.getppid()
    # Resolved now: after the drop, this Python's own files may be out of reach (a venv in root's home)
    program = shutil.which(argv[8]) or argv[8]
    try:
        if int(leased) == 0:
            raise StageError("the leased id must not be 0")
        idmap_mount(source, base, int(owner_uid), int(owner_gid), int(leased), rdonly == "1")
        become(int(leased), parent)
    except (StageError, OSError) as exc:
        os.write(ready_fd, f"error: {exc}\n".encode())
        os._exit(1)
    os.write(ready_fd, b"ok\n")
    os.close(ready_fd)
    os.execv(program, argv[8:])


if __name__ == "__main__":
    main(sys.argv[1:])
