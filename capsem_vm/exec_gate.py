"""The exec gate: a helper may exec once (its launch), never again.

A seccomp filter that refuses execve cannot be installed before the exec that starts the program
it confines. So the filter (seccomp.VSOCK_RULES) sends execve/execveat to a listener instead
(seccomp user notification), installed by the launcher just before it execs the program. The gate
receives the listener (sent over a socketpair, as for the share guard), lets the first exec through
(at that moment only the launcher, our own code, runs under the filter), and closes the listener:
from then on the kernel fails every execve/execveat of the program and its threads with ENOSYS.
The filter cannot be removed, and a filter stacked on top cannot allow what ours refuses (the
most restrictive answer wins).

Fail closed: if the gate never answers (it timed out, capsem died), the listener closes and the
launch itself fails with ENOSYS; the program never runs unfiltered.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import errno
import os
import socket
import sys
import threading

from . import seccomp
from .fds import readable as fds_readable
from .share_guard import _SECCOMP_IOCTL_NOTIF_RECV, _SECCOMP_IOCTL_NOTIF_SEND, _SECCOMP_USER_NOTIF_FLAG_CONTINUE, \
    _Notif, _Resp, _libc_blocking

_EXECS = (seccomp.NR["execve"], seccomp.NR["execveat"])
MIN_FD = 10  # above the fds confine.py's shell script uses (3)


class ExecGate:
    """One per confined launch. Give `filter` to spawn() (the filter goes in before exec), or use
    `wrap(argv)` + `pass_fds` where `python -I seccomp.py` installs it (after confine.py's
    wrapper); call start() before spawning, close_ours() after, and `await done()` when the
    program should be running."""

    def __init__(self, label: str, rules_name: str = "vsock", timeout: float = 60.0):
        self.label, self.rules_name, self.timeout = label, rules_name, timeout
        rules = seccomp.RULE_SETS[rules_name]  # by name: the script mode (wrap) picks the same set
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._ours = ours
        fd = fcntl.fcntl(theirs.fileno(), fcntl.F_DUPFD_CLOEXEC, MIN_FD)  # a number the wrapper leaves alone
        theirs.close()
        self._theirs = socket.socket(fileno=fd)
        self.filter = seccomp.Filter(listener_to=fd, rules=rules)
        self.error: str | None = None
        self.passed = False
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"capsem-exec-gate[{label}]")

    @property
    def pass_fds(self) -> tuple[int, ...]:
        return (self._theirs.fileno(),)

    def wrap(self, argv: list[str]) -> list[str]:
        return [sys.executable, "-I", seccomp.__file__, "--listener-to", str(self._theirs.fileno()),
                "--rules", self.rules_name, *argv]

    def start(self) -> None:
        self._thread.start()

    def close_ours(self) -> None:
        """After spawn: the child has its copy of the socket (or has already used it)."""
        self._theirs.close()

    async def done(self) -> None:
        """Wait for the gate to have let the launch through; raise OSError if it did not."""
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, self.timeout + 5)
        if not self.passed:
            raise OSError(errno.EPERM, f"exec gate of {self.label}: {self.error or 'no exec seen'}")

    def _run(self) -> None:
        listener = -1
        try:
            self._ours.settimeout(self.timeout)
            try:
                _, fds, _, _ = socket.recv_fds(self._ours, 1, 1, socket.MSG_CMSG_CLOEXEC)
            except (TimeoutError, socket.timeout):
                self.error = "no seccomp listener received"
                return
            for extra in fds[1:]:
                os.close(extra)
            if not fds:
                self.error = "no seccomp listener received"
                return
            listener = fds[0]
            if not fds_readable(listener, self.timeout):  # poll: the number may be above 1023
                self.error = "the launch did not exec in time"
                return
            notif = _Notif()
            if _libc_blocking.ioctl(listener, _SECCOMP_IOCTL_NOTIF_RECV, ctypes.byref(notif)) != 0:
                self.error = "SECCOMP_IOCTL_NOTIF_RECV failed"
                return
            if notif.data.nr not in _EXECS:  # cannot happen with VSOCK_RULES: refuse, fail closed
                resp = _Resp(notif.id, 0, -errno.EPERM, 0)
                _libc_blocking.ioctl(listener, _SECCOMP_IOCTL_NOTIF_SEND, ctypes.byref(resp))
                self.error = f"unexpected notified syscall {notif.data.nr}"
                return
            resp = _Resp(notif.id, 0, 0, _SECCOMP_USER_NOTIF_FLAG_CONTINUE)
            if _libc_blocking.ioctl(listener, _SECCOMP_IOCTL_NOTIF_SEND, ctypes.byref(resp)) != 0:
                self.error = "SECCOMP_IOCTL_NOTIF_SEND failed"
                return
            self.passed = True
        except Exception as exc:  # fail closed: the listener closes below, the exec fails
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            if listener >= 0:
                os.close(listener)  # every later exec: ENOSYS
            self._ours.close()

