"""Child processes that die with us: the one place capsem starts host helper programs.

Every helper (QEMU, virtiofsd, vhost-device-vsock) gets PR_SET_PDEATHSIG=SIGKILL so that if the
capsem process dies, even by SIGKILL, its helpers die too. The kernel ties that signal to the
*thread* that forked the child, so all spawns happen on one dedicated thread that lives as long as
the process (a provisioner may be driven from short-lived threads, e.g. by nbclient's run_sync).
Exit is awaited through a pidfd, so no asyncio child watcher is needed.

Privilege separation: `spawn(..., identity=Identity(uid, gid, groups))` starts the helper as that
user (supplementary groups replaced), `seccomp=` installs a seccomp filter (seccomp.Filter) before
exec; a filter with a listener (share_guard.py) sends the listener fd to capsem and closes it there,
in the child, before Popen's close_fds and exec. Both happen before PDEATHSIG is set, because the kernel clears the parent-death signal on a
credential change; a child whose parent died before that point exits at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import os
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
# Process-wide by necessity (exempt from "owned state"): PR_SET_PDEATHSIG fires when the *thread*
# that forked the child ends, so every helper is forked by this one thread that lives as long as the
# process; an owner object with a shorter life would kill its helpers when it went.
_spawner = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="capsem-spawner")


@dataclass(frozen=True)
class Identity:
    """Who a helper runs as (only a root capsem can switch; see privsep.py)."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()


def _child_setup(parent_pid: int, seccomp_filter) -> None:
    """Runs in the child between fork and exec, after Popen switched user/group (if asked)."""
    if seccomp_filter is not None:
        seccomp_filter.install()
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the owner died before PDEATHSIG was armed
        os._exit(1)
    # New process group: a Ctrl-C in the user's terminal must not kill QEMU behind our back.
    os.setpgid(0, 0)


class ManagedProcess:
    """A helper process owned by capsem. Use `stop()` for graceful-then-forced teardown."""

    def __init__(self, name: str, popen: subprocess.Popen):
        self.name = name
        self.popen = popen
        self.pid = popen.pid
        self._pidfd = os.pidfd_open(popen.pid)
        # One reader on the pidfd, shared by every waiter (the loop allows one reader per fd: a
        # second add_reader would silently replace the first waiter's, which would then hang).
        self._exited: asyncio.Future[None] | None = None
        self._exit_loop: asyncio.AbstractEventLoop | None = None
        self.on_close: list = []  # called once, after the process is reaped (e.g. release its uid lease)
        self.stop_signal = signal.SIGTERM  # what stop() sends first (confine.py's wrapper ignores SIGTERM)

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    async def wait(self) -> int:
        """Wait for exit without blocking the loop (pidfd becomes readable when the child exits)."""
        if self.popen.poll() is not None:
            return self.popen.returncode
        await asyncio.shield(self._exit_future())
        return self.popen.wait()

    def _exit_future(self) -> asyncio.Future[None]:
        if self._exited is None:
            loop = asyncio.get_running_loop()
            self._exited, self._exit_loop = loop.create_future(), loop
            loop.add_reader(self._pidfd, self._on_exit)
        return self._exited

    def _on_exit(self) -> None:
        """The pidfd fired (or we are closing it): no reader stays behind on its number."""
        if self._exit_loop is not None:
            try:
                self._exit_loop.remove_reader(self._pidfd)
            except (RuntimeError, ValueError, OSError):  # loop closed, or another thread at exit
                pass
            self._exit_loop = None
        if self._exited is not None and not self._exited.done():
            self._exited.set_result(None)

    def send_signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            try:
                signal.pidfd_send_signal(self._pidfd, signum)
            except ProcessLookupError:
                pass

    async def stop(self, grace: float = 5.0) -> int:
        """SIGTERM, wait up to `grace` seconds, then SIGKILL. Always reaps."""
        if self.popen.poll() is None:
            self.send_signal(self.stop_signal)
            try:
                await asyncio.wait_for(self.wait(), grace)
            except asyncio.TimeoutError:
                self.send_signal(signal.SIGKILL)
                await self.wait()
        self.close()
        return self.popen.returncode

    def kill_now(self) -> None:
        """Synchronous last resort (atexit, error paths without a loop)."""
        if self.popen.poll() is None:
            self.send_signal(signal.SIGKILL)
            self.popen.wait()
        self.close()

    def close(self) -> None:
        if self._pidfd >= 0:
            self._on_exit()
            os.close(self._pidfd)
            self._pidfd = -1
        while self.on_close:
            self.on_close.pop()()

    def __repr__(self) -> str:
        return f"<ManagedProcess {self.name} pid={self.pid} rc={self.popen.returncode}>"


def _popen(argv, kwargs, identity: Identity | None = None, seccomp=None):
    if identity is not None:
        kwargs = dict(kwargs, user=identity.uid, group=identity.gid, extra_groups=list(identity.groups))
    parent = os.getpid()
    return subprocess.Popen(argv, preexec_fn=lambda: _child_setup(parent, seccomp), close_fds=True, **kwargs)


def spawn_sync(name: str, argv: Sequence[str], *, identity: Identity | None = None, seccomp=None,
               **kwargs) -> ManagedProcess:
    popen = _spawner.submit(_popen, list(argv), kwargs, identity, seccomp).result()
    return ManagedProcess(name, popen)


async def spawn(name: str, argv: Sequence[str], *, identity: Identity | None = None, seccomp=None,
                **kwargs) -> ManagedProcess:
    """Start `argv` (stdin defaults to /dev/null) on the spawner thread, optionally as `identity`
    and under a seccomp filter (both applied before exec)."""
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    loop = asyncio.get_running_loop()
    popen = await asyncio.wrap_future(_spawner.submit(_popen, list(argv), kwargs, identity, seccomp), loop=loop)
    return ManagedProcess(name, popen)
