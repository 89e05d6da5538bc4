"""chmod/chown that never follow a symlink, and private directories checked before use.

Several places capsem changes modes live in directories someone else can write: a VM dir belongs
to that VM's helper uid (a subverted QEMU could replace a socket by a symlink to /etc/shadow), a
runtime or cache dir may have been pre-created by another user. Linux has no lchmod, so the path is
opened with O_PATH|O_NOFOLLOW (a symlink in the last component is opened as itself, then refused)
and the mode is changed through that fd's /proc/self/fd link, which names the very inode opened.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import CapsemError


class UnsafePathError(CapsemError):
    """A path capsem was about to change or trust is a symlink, someone else's, or too open."""


def _open_path(path: os.PathLike | str) -> tuple[int, os.stat_result]:
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    st = os.fstat(fd)
    if stat.S_ISLNK(st.st_mode):
        os.close(fd)
        raise UnsafePathError(f"refusing to change {path}: it is a symbolic link",
                              "remove the link; capsem never changes modes through links")
    return fd, st


def chmod(path: os.PathLike | str, mode: int) -> None:
    fd, _ = _open_path(path)
    try:
        os.chmod(f"/proc/self/fd/{fd}", mode)
    finally:
        os.close(fd)


def chown(path: os.PathLike | str, uid: int, gid: int) -> None:
    fd, _ = _open_path(path)
    try:
        os.chown(f"/proc/self/fd/{fd}", uid, gid)
    finally:
        os.close(fd)


def private_dir(path: os.PathLike | str) -> Path:
    """Create `path` (and parents) if missing; then insist that it is a real directory (no symlink)
    owned by us, not writable by group or others, in a parent that nobody else can rename it out
    of; finally make it mode 0700. A directory someone else made or opened up is refused, never
    adopted: they could have put things in it."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    me = os.geteuid()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if path.is_symlink():
            raise UnsafePathError(f"{path} is a symbolic link (to {os.readlink(path)})",
                                  "use a real directory of your own") from None
        raise UnsafePathError(f"{path} is not a usable directory: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != me:
            raise UnsafePathError(f"{path} is owned by uid {st.st_uid}, not by you (uid {me})",
                                  "someone else created it: remove it, or point capsem elsewhere")
        if st.st_mode & 0o022:
            raise UnsafePathError(f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})",
                                  f"check what is in it, then `chmod 0700 {path}` or remove it")
        _check_parent(path)
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    return path


def _check_parent(path: Path) -> None:
    """The parent must not let others rename `path` away and put their own in its place: owned by
    us or root, and if group/world-writable then sticky (like /tmp)."""
    parent = path.absolute().parent
    st = os.stat(parent)
    if st.st_uid not in (0, os.geteuid()) or (st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX):
        raise UnsafePathError(f"{path} is in {parent} (mode {stat.S_IMODE(st.st_mode):04o}, uid {st.st_uid}), "
                              "where others could replace it", "use a directory only you (or root) can write")
