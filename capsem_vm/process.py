"""Child processes that die with us: the one place capsem starts host helper programs.

Every helper (QEMU, virtiofsd, vhost-device-vsock) gets PR_SET_PDEATHSIG=SIGKILL so that if the
capsem process dies, even by SIGKILL, its helpers die too. The kernel ties that signal to the
*thread* that forked the child, so all spawns happen on one dedicated thread that lives as long as
the process (a provisioner may be driven from short-lived threads, e.g. by nbclient's run_sync).
Exit is awaited through a pidfd, so no asyncio child watcher is needed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import os
import signal
import subprocess
from collections.abc import Sequence

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
_spawner = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="capsem-spawner")


def _die_with_parent() -> None:  # runs in the child between fork and exec
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # New process group: a Ctrl-C in the user's terminal must not kill QEMU behind our back.
    os.setpgid(0, 0)


class ManagedProcess:
    """A helper process owned by capsem. Use `stop()` for graceful-then-forced teardown."""

    def __init__(self, name: str, popen: subprocess.Popen):
        self.name = name
        self.popen = popen
        self.pid = popen.pid
        self._pidfd = os.pidfd_open(popen.pid)

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    async def wait(self) -> int:
        """Wait for exit without blocking the loop (pidfd becomes readable when the child exits)."""
        if self.popen.poll() is not None:
            return self.popen.returncode
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def on_exit():
            if not done.done():
                done.set_result(None)

        loop.add_reader(self._pidfd, on_exit)
        try:
            await done
        finally:
            loop.remove_reader(self._pidfd)
        return self.popen.wait()

    def send_signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            try:
                signal.pidfd_send_signal(self._pidfd, signum)
            except ProcessLookupError:
                pass

    async def stop(self, grace: float = 5.0) -> int:
        """SIGTERM, wait up to `grace` seconds, then SIGKILL. Always reaps."""
        if self.popen.poll() is None:
            self.send_signal(signal.SIGTERM)
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
            os.close(self._pidfd)
            self._pidfd = -1

    def __repr__(self) -> str:
        return f"<ManagedProcess {self.name} pid={self.pid} rc={self.popen.returncode}>"


def _popen(argv, kwargs):
    return subprocess.Popen(argv, preexec_fn=_die_with_parent, close_fds=True, **kwargs)


def spawn_sync(name: str, argv: Sequence[str], **kwargs) -> ManagedProcess:
    popen = _spawner.submit(_popen, list(argv), kwargs).result()
    return ManagedProcess(name, popen)


async def spawn(name: str, argv: Sequence[str], **kwargs) -> ManagedProcess:
    """Start `argv` (stdin defaults to /dev/null) on the spawner thread."""
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    loop = asyncio.get_running_loop()
    popen = await asyncio.wrap_future(_spawner.submit(_popen, list(argv), kwargs), loop=loop)
    return ManagedProcess(name, popen)
