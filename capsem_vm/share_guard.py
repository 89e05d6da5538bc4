"""The share guard: virtiofsd may not give anything a repository's name, nor move a symlink.

seccomp-BPF cannot read path names, so the calls of virtiofsd that create a name or write a file
(open/openat with O_CREAT/O_WRONLY/O_RDWR/O_TRUNC, creat, truncate, mkdir/mkdirat,
rename/renameat/renameat2) are sent by its filter (seccomp.py, notify=True) to this supervisor
instead (seccomp user notification): one thread per virtiofsd, in the capsem process that started
it. For each call it reads the name from virtiofsd's memory (process_vm_readv), checks the
notification is still live (SECCOMP_IOCTL_NOTIF_ID_VALID), and answers EPERM for names that make a
repository (repo_names.py: `.git`, `HEAD`, `.hg` in any spelling), for targets inside a
repository (a `.git`/`.hg` component, or a directory above holding HEAD: repositories the host
user makes while the VM runs, which are not read-only mounts) and for renames whose source is a
symlink; otherwise the kernel carries the call out (SECCOMP_USER_NOTIF_FLAG_CONTINUE).

Why "inside a repository" holds although paths change: the guest can move things out of a
repository (and so break it) but never into one — every create and rename target is checked the
same way, and nothing can be given a repository's name — so a file that is outside at our check
is still outside when the kernel opens it.

Why reading the name is not a race the guest can win: the kernel reads the name again after we
answer, so whoever can write the memory between our read and its read wins (the classic
user-notification TOCTOU). Only virtiofsd's own threads can: it copies every FUSE request but
WRITE out of the guest's memory into its own buffer before handling it (fv_queue_worker in the C
virtiofsd; the Rust one reads names into its own buffers too), so the guest's vCPUs never see the
bytes we check. A guest that took over virtiofsd itself would get around this guard.

Why the symlink check of a rename source is race-free: we lstat (dirfd, name) through
/proc/PID/fd/DIRFD before the kernel renames. For the entry to be a symlink by the time the
kernel looks, something must give that name to a symlink in between; the filter refuses
symlink/symlinkat and link/linkat outright, and RENAME_EXCHANGE; the only call left that can give
a symlink a name is a rename of that symlink, which this very check refuses — so the first rename
that moved a symlink would have needed an earlier one (induction on time). Directory renames do
not change what (DIRFD, name) means (the fd pins the directory), which is why a source with more
than one component is refused: its middle directories could be swapped. virtiofsd only ever
passes single components. Only the host user can make symlinks in the folder.

If the guard dies, the listener fd is closed (finally below, or by the kernel when capsem dies):
the kernel then fails every notified call with ENOSYS, pending ones included: creating names in
the share fails (the guest sees an error), it never succeeds unchecked and never hangs.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import select
import socket
import struct
import sys
import threading
import time

from . import seccomp
from .polling import poll_until_async
from .repo_names import last_component, repository_name

log = logging.getLogger(__name__)

_SECCOMP_IOCTL_NOTIF_RECV = 0xC0502100      # _IOWR('!', 0, struct seccomp_notif)
_SECCOMP_IOCTL_NOTIF_SEND = 0xC0182101      # _IOWR('!', 1, struct seccomp_notif_resp)
_SECCOMP_IOCTL_NOTIF_ID_VALID = 0x40082102  # _IOW('!', 2, __u64)
_SECCOMP_IOCTL_NOTIF_SET_FLAGS = 0x40082104  # _IOW('!', 4, __u64), Linux 6.6+
_SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP = 1
_SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
_AT_FDCWD = -100
PATH_MAX = 4096
_PAGE = 4096
# syscall -> (argument index of the path, of its dirfd (None: AT_FDCWD), (dirfd, name) indexes of a
# rename source or None)
CREATES = {
    "open": (0, None, None), "creat": (0, None, None), "mkdir": (0, None, None), "truncate": (0, None, None),
    "openat": (1, 0, None), "mkdirat": (1, 0, None),
    "rename": (1, None, (None, 0)), "renameat": (3, 2, (0, 1)), "renameat2": (3, 2, (0, 1)),
}
_BY_NR = {seccomp.NR[name]: (name, spec) for name, spec in CREATES.items()}


class _Data(ctypes.Structure):
    _fields_ = [("nr", ctypes.c_int), ("arch", ctypes.c_uint32), ("ip", ctypes.c_uint64),
                ("args", ctypes.c_uint64 * 6)]


class _Notif(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("pid", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("data", _Data)]


class _Resp(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("val", ctypes.c_int64), ("error", ctypes.c_int32),
                ("flags", ctypes.c_uint32)]


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


assert ctypes.sizeof(_Notif) == 80 and ctypes.sizeof(_Resp) == 24

# PyDLL: these calls never block, so they keep the GIL (handing it to another thread of capsem and
# back could delay virtiofsd by a switch interval). NOTIF_RECV, which could block, releases it.
_libc = ctypes.PyDLL(None, use_errno=True)
_libc_blocking = ctypes.CDLL(None, use_errno=True)
_libc_blocking.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.process_vm_readv.restype = ctypes.c_ssize_t
_libc.process_vm_readv.argtypes = [ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong,
                                   ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.c_ulong]
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.statfs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]


class Refused(Exception):
    def __init__(self, err: int, reason: str, expected: bool = False):
        super().__init__(reason)
        self.errno = err
        self.expected = expected  # a refusal every virtiofsd start meets: logged at debug level only


def read_name(pid: int, addr: int) -> bytes:
    """The NUL-terminated string at `addr` in process `pid` (at most PATH_MAX bytes)."""
    buf = ctypes.create_string_buffer(PATH_MAX)
    first = min(PATH_MAX, _PAGE - addr % _PAGE)  # two pieces: a fault on the next page cuts only the second
    local = (_Iovec * 1)(_Iovec(ctypes.cast(buf, ctypes.c_void_p), PATH_MAX))
    remote = (_Iovec * 2)(_Iovec(addr, first), _Iovec(addr + first, PATH_MAX - first))
    got = _libc.process_vm_readv(pid, local, 1, remote, 2 if first < PATH_MAX else 1, 0)
    if got < 0:
        raise Refused(errno.EPERM, f"cannot read the name: {os.strerror(ctypes.get_errno())}")
    data = buf.raw[:got]
    end = data.find(b"\0")
    if end < 0:
        raise Refused(errno.ENAMETOOLONG if got == PATH_MAX else errno.EFAULT, "unterminated name")
    return data[:end]


def _signed32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


def _source_is_symlink(pid: int, dirfd: int | None, name: bytes) -> bool:
    if b"/" in name.rstrip(b"/"):
        raise Refused(errno.EPERM, "rename source with more than one component")
    base = f"/proc/{pid}/cwd" if dirfd is None or dirfd == _AT_FDCWD else f"/proc/{pid}/fd/{dirfd}"
    try:
        st = os.lstat(os.fsencode(base) + b"/" + name.rstrip(b"/"))
    except FileNotFoundError:
        return False  # the kernel answers ENOENT itself; no symlink can get this name meanwhile
    except OSError as exc:
        raise Refused(errno.EPERM, f"cannot check the rename source: {exc.strerror}") from None
    return (st.st_mode & 0o170000) == 0o120000


_PROC_FD = re.compile(rb"^/proc/(?:self|thread-self|[0-9]+)/fd/([0-9]+)$")
# virtiofsd probes SELinux at start by opening its thread's attr/fscreate (relative to its proc
# task dir) for writing. Refused like any write into proc (virtiofsd then runs without it), but
# expected: not worth a warning on every VM start
_FSCREATE_PROBE = re.compile(rb"^(?:[0-9]+|self|thread-self)/attr/fscreate$")
_PROC_SUPER_MAGIC = 0x9FA0


def _on_procfs(path: str) -> bool:
    buf = ctypes.create_string_buffer(120)  # struct statfs; f_type first
    if _libc.statfs(path.encode(), buf) != 0:
        raise OSError(ctypes.get_errno(), "statfs")
    return struct.unpack_from("=q", buf.raw)[0] == _PROC_SUPER_MAGIC


def _target_path(pid: int, dirfd: int | None, name: bytes) -> bytes:
    """The path (as virtiofsd sees it, from its root) of what a call on (dirfd, name) reaches.

    virtiofsd opens existing files by reopening its O_PATH fds through its own /proc/self/fd
    (openat(proc_self_fd, "N")); its proc is mounted in its namespaces and detached by pivot_root,
    so that directory is recognised by its filesystem type, not by its name, and the file is
    what the magic link N names."""
    try:
        if name.startswith(b"/"):
            reopen = _PROC_FD.match(name)
            if reopen:
                return os.readlink(f"/proc/{pid}/fd/{int(reopen.group(1))}").encode("utf-8", "surrogateescape")
            return name
        fd_dir = f"/proc/{pid}/cwd" if dirfd is None or dirfd == _AT_FDCWD else f"/proc/{pid}/fd/{dirfd}"
        if _on_procfs(fd_dir):
            link = f"{fd_dir}/{os.fsdecode(name)}"
            if not os.path.islink(link):
                raise Refused(errno.EPERM, f"writing {name!r} in proc", expected=bool(_FSCREATE_PROBE.match(name)))
            return os.readlink(link).encode("utf-8", "surrogateescape")
        return os.readlink(fd_dir).encode("utf-8", "surrogateescape").rstrip(b"/") + b"/" + name
    except OSError as exc:
        raise Refused(errno.EPERM, f"cannot resolve the target: {exc.strerror}") from None


def _inside_repository(pid: int, path: bytes) -> str | None:
    """Why `path` is inside a repository (one the host user may have made since the share started:
    those found at start are read-only mounts already), or None. Checked: every component (a
    `.git`/`.hg` anywhere above), and every directory above for a HEAD (a git directory)."""
    parts = [p for p in path.split(b"/") if p]
    for part in parts:
        reason = repository_name(part)
        if reason is not None and not reason.startswith("a bare"):
            return f"inside {part!r}: {reason}"
    root = f"/proc/{pid}/root".encode()
    for depth in range(len(parts) - 1, -1, -1):
        above = b"/".join(parts[:depth])
        if os.path.lexists(root + b"/" + above + (b"/" if above else b"") + b"HEAD"):
            return f"inside {b'/' + above!r}, which holds a HEAD (a git directory)"
    return None


def judge(nr: int, pid: int, args) -> None:
    """Raise Refused if the notified call must not happen; return to let it go on."""
    if nr not in _BY_NR:
        raise Refused(errno.EPERM, f"unexpected notified syscall {nr}")
    call, (name_arg, dirfd_arg, source) = _BY_NR[nr]
    raw = read_name(pid, args[name_arg])
    name = last_component(raw)
    reason = repository_name(name)
    if reason is not None:
        raise Refused(errno.EPERM, f"{call} {name!r}: {reason}")
    path = _target_path(pid, None if dirfd_arg is None else _signed32(args[dirfd_arg]), raw)
    reason = _inside_repository(pid, path)
    if reason is not None:
        raise Refused(errno.EPERM, f"{call} {path!r}: {reason}")
    if source is not None:
        src_dirfd_arg, src_arg = source
        src = read_name(pid, args[src_arg])
        if _source_is_symlink(pid, None if src_dirfd_arg is None else _signed32(args[src_dirfd_arg]), src):
            raise Refused(errno.EPERM, f"{call} of a symlink ({src!r})")


class ShareGuard:
    """One per virtiofsd. Give `filter` to spawn() (or `wrap(argv)` where the filter is installed
    by `python -I seccomp.py` inside the user namespace, with `pass_fds`), then `await attach(proc)`.
    The supervisor thread ends when virtiofsd is gone (or on close())."""

    def __init__(self, label: str = "share", armed: bool = True):
        self.label = label
        self._ours, self._theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.filter = seccomp.Filter(listener_to=self._theirs.fileno())
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread: threading.Thread | None = None
        self.refused = 0
        # Until armed, calls are let through unjudged: a root capsem's idmap stage (capsem's own
        # code, idmap_share.py) runs under this filter and mirrors the folder's host path on its
        # tmpfs, and a folder such as /srv/Head/nb must not be refused for its parent's name. The
        # guest cannot reach virtiofsd before start_virtiofsd returns (QEMU connects after), and
        # start_virtiofsd arms the guard before it returns (after the stage reported ready).
        self.armed = armed
        self.allowed = 0
        self._last_log = 0.0

    @property
    def pass_fds(self) -> tuple[int, ...]:
        return (self._theirs.fileno(),)

    def wrap(self, argv: list[str]) -> list[str]:
        return [sys.executable, "-I", seccomp.__file__, "--listener-to", str(self._theirs.fileno()), *argv]

    async def attach(self, proc, timeout: float = 30.0) -> None:
        """Receive the listener the confined child sent (before its exec) and start serving it.
        Raises OSError if it does not come (the child died, or never installed the filter)."""
        self._theirs.close()
        self._ours.setblocking(False)

        def no_listener(_message: str = "") -> OSError:
            self.close()
            return OSError(errno.ETIMEDOUT, f"virtiofsd[{self.label}] sent no seccomp listener")

        def received():  # (data, fds, flags, address): truthy even when no fd came (EPROTO below)
            try:
                return socket.recv_fds(self._ours, 1, 1, socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                if proc is not None and proc.popen.poll() is not None:
                    raise no_listener() from None
                return None
        _, fds, _, _ = await poll_until_async(received, what=f"virtiofsd[{self.label}]'s seccomp listener",
                                              timeout=timeout, interval=0.01, error=no_listener)
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            self.close()
            raise OSError(errno.EPROTO, f"virtiofsd[{self.label}]: no seccomp listener received")
        self._ours.close()
        self._thread = threading.Thread(target=self._serve, args=(fds[0],), daemon=True,
                                        name=f"capsem-share-guard[{self.label}]")
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self, wait: float = 5.0) -> None:
        """Stop serving: the listener closes and virtiofsd's name-creating calls fail (ENOSYS)."""
        for s in (self._ours, self._theirs):
            s.close()
        if self._stop_w >= 0:
            os.close(self._stop_w)
            self._stop_w = -1
        if self._thread is None:
            if self._stop_r >= 0:
                os.close(self._stop_r)
                self._stop_r = -1
        elif self._thread is not threading.current_thread():
            self._thread.join(wait)

    def _serve(self, listener: int) -> None:
        # the caller waits for our answer on a CPU we will run on: wake it synchronously (6.6+; an
        # older kernel says EINVAL, and the guard works the same, a little slower)
        _libc.ioctl(listener, _SECCOMP_IOCTL_NOTIF_SET_FLAGS, _SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP)
        poller = select.poll()
        poller.register(listener, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        try:
            while True:
                events = dict(poller.poll())
                if self._stop_r in events:
                    return
                ev = events.get(listener, 0)
                if ev & select.POLLIN:
                    self._one(listener)
                elif ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                    return  # no process uses the filter any more: virtiofsd is gone
        except BaseException:
            log.exception("share guard of virtiofsd[%s] failed: name-creating calls in the share now fail",
                          self.label)
        finally:
            os.close(listener)
            os.close(self._stop_r)

    def _one(self, listener: int) -> None:
        notif = _Notif()
        if _libc_blocking.ioctl(listener, _SECCOMP_IOCTL_NOTIF_RECV, ctypes.byref(notif)) != 0:
            e = ctypes.get_errno()
            if e in (errno.ENOENT, errno.EINTR):  # the caller was killed meanwhile
                return
            raise OSError(e, "SECCOMP_IOCTL_NOTIF_RECV")
        resp = _Resp(notif.id, 0, 0, _SECCOMP_USER_NOTIF_FLAG_CONTINUE)
        try:
            if self.armed:
                judge(notif.data.nr, notif.pid, notif.data.args)
            self.allowed += 1
        except Refused as refusal:
            resp.error, resp.flags = -refusal.errno, 0
            if refusal.expected:
                log.debug("share %s: refused %s (expected)", self.label, refusal)
            else:
                self.refused += 1
                self._log_refusal(str(refusal))
        except Exception as exc:  # fail closed on anything unexpected
            resp.error, resp.flags = -errno.EPERM, 0
            self.refused += 1
            self._log_refusal(f"error while checking: {exc!r}")
        # the reads above were only meaningful if the caller is still the one that asked
        nid = ctypes.c_uint64(notif.id)
        if _libc.ioctl(listener, _SECCOMP_IOCTL_NOTIF_ID_VALID, ctypes.byref(nid)) != 0:
            return
        if _libc.ioctl(listener, _SECCOMP_IOCTL_NOTIF_SEND, ctypes.byref(resp)) != 0:
            e = ctypes.get_errno()
            if e != errno.ENOENT:
                raise OSError(e, "SECCOMP_IOCTL_NOTIF_SEND")

    def _log_refusal(self, reason: str) -> None:
        now = time.monotonic()  # at most one line a second: the guest chooses how often this happens
        if now - self._last_log >= 1.0:
            self._last_log = now
            log.warning("share %s: refused %s (%d refused so far)", self.label,
                        reason.encode("unicode_escape").decode("ascii"), self.refused)
