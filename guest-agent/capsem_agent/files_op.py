"""`file` requests: read, write, list, stat, mkdir and remove beneath one root folder (the share).

The host's Sandbox.files works through these, never through host-side access to the share (the
guest controls the share's contents; the host would follow the guest's links). Every path is
resolved here one component at a time from an fd of the root with O_NOFOLLOW (what openat2's
RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV gives, portably): a symbolic link anywhere
on the path, a '..', '.' or empty component, or a directory on another mount (a bind mount the
guest put inside the share) is refused with code path_refused; a link can never be followed, even
one swapped in while the request runs. Only regular files are read or written (O_NONBLOCK, so a
FIFO never blocks the agent). Sizes are bounded per request (MAX_CHUNK); the host chunks.

Blocking I/O: the service runs handle() on an executor thread.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat

from . import protocol

MAX_CHUNK = 512 * 1024        # raw bytes per read/write request (~700 KiB of base64 < MAX_FRAME)
MAX_LIST_REPLY = 512 * 1024   # approximate bytes of entries per list reply ("more": ask again)
MAX_DIR_NAMES = 100_000       # a directory with more entries is refused (too_large)
MAX_NAME = 255
MAX_PATH = 4096
OPS = ("read", "write", "list", "stat", "mkdir", "remove")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class FileOpError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def _components(path: str, *, absolute: bool) -> list[str]:
    if absolute != path.startswith("/"):
        raise FileOpError("path_refused", f"{'root' if absolute else 'path'} must be "
                          f"{'absolute' if absolute else 'relative to the root'}")
    parts = path.split("/")[1:] if absolute else ([] if path == "" else path.split("/"))
    if absolute and parts == [""]:
        parts = []
    for p in parts:
        if p in ("", ".", ".."):
            raise FileOpError("path_refused", f"path component {p!r} is refused (no '..', '.' or empty)")
        if len(p.encode("utf-8", "surrogatepass")) > MAX_NAME:
            raise FileOpError("path_refused", "a path component is longer than 255 bytes")
    return parts


def _open_dir(parent: int, name: str, create: bool = False) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        if not create:
            raise
        try:
            os.mkdir(name, 0o755, dir_fd=parent)
        except FileExistsError:  # raced: whatever is there now is opened (and checked) below
            pass
        return os.open(name, _DIR_FLAGS, dir_fd=parent)


def _is_link(parent: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _refusal(exc: OSError, parent: int, name: str, shown: str) -> FileOpError | OSError:
    """The error for a failed open of `name` in `parent` (O_NOFOLLOW: a link fails with ELOOP, or
    ENOTDIR with O_DIRECTORY)."""
    if exc.errno in (errno.ELOOP, errno.ENOTDIR) and (exc.errno == errno.ELOOP or _is_link(parent, name)):
        return FileOpError("path_refused", f"{shown!r} is a symbolic link: links are never followed")
    if exc.errno == errno.ENOTDIR:
        return FileOpError("not_a_dir", f"{shown!r} is not a directory")
    if exc.errno == errno.ENOENT:
        return FileOpError("not_found", f"{shown!r} does not exist")
    return exc


class Walk:
    """Open the parent directory of root/path (no links) and keep the final name."""

    def __init__(self, root: str, path: str, *, create_parents: bool = False):
        root_parts = _components(root, absolute=True)
        parts = _components(path, absolute=False)
        self.name = parts[-1] if parts else None  # None: the root itself
        fd = os.open("/", _DIR_FLAGS)
        root_dev = os.fstat(fd).st_dev  # the root folder's (once walked): no mount crossed below it
        walked = ["/"]
        try:
            for i, part in enumerate(root_parts + parts[:-1]):
                walked.append(part)
                try:
                    nfd = _open_dir(fd, part, create=create_parents and i >= len(root_parts))
                except OSError as exc:
                    raise _refusal(exc, fd, part, "/".join(walked)[1:] or "/") from None
                os.close(fd)
                fd = nfd
                if i >= len(root_parts) and os.fstat(fd).st_dev != root_dev:
                    raise FileOpError("path_refused", f"{'/'.join(parts[:i - len(root_parts) + 1])!r} is "
                                      "another mount: paths stay on the root folder's file system")
                if i == len(root_parts) - 1:
                    root_dev = os.fstat(fd).st_dev
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.dev = root_dev

    def check_dev(self, fd: int, st: os.stat_result | None = None) -> None:
        """Refuse (closing fd) an opened final component on another mount."""
        if (st or os.fstat(fd)).st_dev != self.dev:
            os.close(fd)
            raise FileOpError("path_refused", f"{self.name!r} is another mount: paths stay on the root "
                              "folder's file system")

    def __enter__(self) -> "Walk":
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def _info(st: os.stat_result) -> dict:
    return {"type": _kind(st.st_mode), "size": st.st_size, "mode": stat.S_IMODE(st.st_mode),
            "mtime": int(st.st_mtime)}


def _lstat(w: Walk) -> os.stat_result:
    if w.name is None:
        return os.fstat(w.fd)
    try:
        return os.stat(w.name, dir_fd=w.fd, follow_symlinks=False)
    except OSError as exc:
        raise _refusal(exc, w.fd, w.name, w.name) from None


def _open_file(w: Walk, flags: int) -> int:
    if w.name is None:
        raise FileOpError("not_a_file", "the root folder is not a file")
    try:
        fd = os.open(w.name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644, dir_fd=w.fd)
    except OSError as exc:
        if exc.errno == errno.EISDIR:
            raise FileOpError("not_a_file", f"{w.name!r} is a directory") from None
        raise _refusal(exc, w.fd, w.name, w.name) from None
    st = os.fstat(fd)
    w.check_dev(fd, st)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise FileOpError("not_a_file", f"{w.name!r} is not a regular file")
    return fd


def _dir_fd(w: Walk) -> int:
    """An fd of root/path as a directory (the caller closes it)."""
    if w.name is None:
        return os.dup(w.fd)
    try:
        fd = os.open(w.name, _DIR_FLAGS, dir_fd=w.fd)
    except OSError as exc:
        raise _refusal(exc, w.fd, w.name, w.name) from None
    w.check_dev(fd)
    return fd


def op_read(w: Walk, msg: dict) -> dict:
    offset = protocol.req_int(msg, "offset", optional=True, lo=0, hi=2**62) or 0
    length = protocol.req_int(msg, "length", lo=0, hi=MAX_CHUNK)
    fd = _open_file(w, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        data = os.pread(fd, length, offset)
    finally:
        os.close(fd)
    return {"size": size, "data": protocol.b64(data), "eof": len(data) < length or offset + len(data) >= size}


def op_write(w: Walk, msg: dict) -> dict:
    offset = protocol.req_int(msg, "offset", optional=True, lo=0, hi=2**62) or 0
    data = protocol.req_data(msg, "data")
    if len(data) > MAX_CHUNK:
        raise FileOpError("too_large", f"at most {MAX_CHUNK} bytes per write request")
    fd = _open_file(w, os.O_WRONLY | os.O_CREAT)
    try:
        if protocol.req_bool(msg, "truncate"):
            os.ftruncate(fd, 0)
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    return {"size": size}


def op_list(w: Walk, msg: dict) -> dict:
    after = protocol.req_str(msg, "after", optional=True, max_len=MAX_NAME * 4) or ""
    fd = _dir_fd(w)
    names: list[str] = []
    try:
        with os.scandir(fd) as it:
            for entry in it:
                if len(names) >= MAX_DIR_NAMES:
                    raise FileOpError("too_large", f"the directory has more than {MAX_DIR_NAMES} entries")
                names.append(entry.name)
        entries, budget, skipped, more = [], MAX_LIST_REPLY, 0, False
        for name in sorted(n for n in names if n > after):
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:  # not UTF-8: cannot travel as JSON text; counted, not sent
                skipped += 1
                continue
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:  # removed meanwhile
                continue
            entry = {"name": name, **_info(st)}
            budget -= len(name) + 80
            if budget < 0:
                more = True
                break
            entries.append(entry)
    finally:
        os.close(fd)
    return {"entries": entries, "more": more, "skipped": skipped}


def op_stat(w: Walk, msg: dict) -> dict:
    return _info(_lstat(w))


def op_mkdir(w: Walk, msg: dict) -> dict:
    if w.name is None:
        return {"created": False}
    try:
        os.mkdir(w.name, 0o755, dir_fd=w.fd)
        return {"created": True}
    except FileExistsError:
        if not stat.S_ISDIR(_lstat(w).st_mode):
            raise FileOpError("not_a_dir", f"{w.name!r} exists and is not a directory") from None
        return {"created": False}


def op_remove(w: Walk, msg: dict) -> dict:
    if w.name is None:
        raise FileOpError("path_refused", "the root folder itself cannot be removed")
    st = _lstat(w)
    if stat.S_ISDIR(st.st_mode):  # rmtree with dir_fd works on fds and never follows a link
        shutil.rmtree(w.name, dir_fd=w.fd)
    else:  # a file, or a link itself (never its target)
        os.unlink(w.name, dir_fd=w.fd)
    return {}


HANDLERS = {"read": op_read, "write": op_write, "list": op_list, "stat": op_stat,
            "mkdir": op_mkdir, "remove": op_remove}


def handle(msg: dict) -> dict:
    """The reply fields of one `file` request (blocking). Raises FileOpError, MessageError, OSError."""
    op = msg.get("op")
    if op not in HANDLERS:
        raise protocol.MessageError(f"file: 'op' must be one of {', '.join(OPS)}", msg.get("id"))
    root = protocol.req_str(msg, "root", max_len=MAX_PATH)
    path = protocol.req_str(msg, "path", max_len=MAX_PATH)
    parents = op in ("write", "mkdir") and protocol.req_bool(msg, "parents")
    with Walk(root, path, create_parents=parents) as w:
        return HANDLERS[op](w, msg)
