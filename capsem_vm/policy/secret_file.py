"""Credential files (`file =` of a [[credential]]): where one may live, and reading it safely.

A secret file the guest can write lets the guest choose what the host sends as the secret; one it
can read (a share, even read-only) hands it the secret. One another local user can write, or whose
directory they can write (swap it for a symlink or another file), is theirs. So:

- at policy load / kernel start (`location_problem`, with the kernel's shares): the path must be
  absolute, not inside any folder shared with the VM (as written nor where it leads), not a
  symlink; the file (if it exists yet) and every directory above it must be owned by you or root
  and not writable by group/others (a sticky root-owned directory such as /tmp is fine);
- each time the proxy reads it (`read_secret`): opened with O_NOFOLLOW, and the open file and its
  directories checked again the same way (fstat on the fd: what is read is what was checked).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

MAX_SECRET_BYTES = 64 * 1024


class SecretFileError(Exception):
    """The credential file cannot be used; the message says why (never the secret)."""


def _owner_ok(uid: int) -> bool:
    return uid in (os.geteuid(), 0)


def _file_problem(st: os.stat_result) -> str | None:
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if not _owner_ok(st.st_uid):
        return f"is owned by uid {st.st_uid}, not by you (uid {os.geteuid()}) or root"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by other users (mode {stat.S_IMODE(st.st_mode):04o})"
    if st.st_nlink > 1:
        return f"has {st.st_nlink} hard links (another name of it may be somewhere others or the VM can reach)"
    return None


def _dir_problem(d: Path) -> str | None:
    """Every existing directory from `d` up to / is owned by you or root and writable only by its
    owner (or sticky and root-owned)."""
    for cur in (d, *d.parents):
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            continue  # not created yet: its existing parents decide who could create it
        except OSError as exc:
            return f"directory {cur} cannot be checked: {exc.strerror}"
        if not stat.S_ISDIR(st.st_mode):
            return f"{cur} is not a directory"
        if not _owner_ok(st.st_uid):
            return f"directory {cur} is owned by uid {st.st_uid}, not by you (uid {os.geteuid()}) or root"
        writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if writable and not (st.st_mode & stat.S_ISVTX and st.st_uid == 0):
            return f"directory {cur} is writable by other users (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def expand(path: str) -> Path:
    return Path(path).expanduser()


def location_problem(path: str, shares: list[str | os.PathLike] = ()) -> str | None:
    """Why `path` may not hold a secret for a VM with these shares (any mode), or None."""
    p = expand(path)
    if not p.is_absolute():
        return "is not an absolute path (write it from / or ~/)"
    real = Path(os.path.realpath(p))
    for shared in shares:
        s = Path(os.path.realpath(shared))
        for cand in (p, real):
            if cand == s or s in cand.parents:
                return f"is inside {s}, a folder shared with the VM"
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        return f"cannot be checked: {exc.strerror}"
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            return "is a symbolic link (name the file itself)"
        problem = _file_problem(st)
        if problem:
            return problem
    return _dir_problem(real.parent)


def read_secret(path: str) -> str:
    """The secret in `path`, stripped. Raises SecretFileError with the reason it cannot be used."""
    p = expand(path)
    if not p.is_absolute():
        raise SecretFileError("is not an absolute path")
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW: the last component is a symlink
            raise SecretFileError("is a symbolic link") from None
        raise SecretFileError(f"cannot be opened: {exc.strerror}") from None
    try:
        problem = _file_problem(os.fstat(fd)) or _dir_problem(Path(os.path.realpath(p.parent)))
        if problem:
            raise SecretFileError(problem)
        data = b""
        while len(data) <= MAX_SECRET_BYTES:
            chunk = os.read(fd, MAX_SECRET_BYTES + 1 - len(data))
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    if len(data) > MAX_SECRET_BYTES:
        raise SecretFileError(f"is larger than {MAX_SECRET_BYTES} bytes")
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise SecretFileError("is not UTF-8 text") from None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise SecretFileError("holds control characters (line breaks, ...) inside the secret")
    if not text:
        raise SecretFileError("is empty")
    return text
