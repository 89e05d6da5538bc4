"""What a cold VM (vm.py) and a claimed pooled VM (pool/claimed.py) do alike: relay the agent's and
QEMU's events, set up the guest's egress, the graceful part of stop(), closing the per-VM helpers,
and watching the helpers the VM cannot live without.
The contract they fulfil for KernelVM is vm_protocol.GuestVM.

A helper that exits while the VM runs (virtiofsd: the guest's next file access would wait forever
on a FUSE request nobody answers; the vsock backend: the agent is cut off) makes the VM dead: its
exit is awaited on a pidfd the way QEMU's is, `death_reason` names it, a {"t": "vm_died"} event
goes out first, then the whole VM is torn down (QEMU killed, no graceful power-off: a guest stuck
on a dead share would not finish one). QEMU's own exit once booted counts the same (a claimed VM:
its keeper's, pool/claimed.py), and a helper that exits because QEMU went first (virtiofsd and the
vsock backend end when QEMU hangs up on them) reports QEMU's reason, not its own."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import VMError
from .process import ManagedProcess
from .qmp import Monitor
from .vm_protocol import OnEvent, QemuWatch

if TYPE_CHECKING:
    from .config import VMConfig
    from .control import ControlConnection
    from .egress import Egress
    from .vsock import VsockTransport

log = logging.getLogger(__name__)


def exit_description(returncode: int | None) -> str:
    """'signal 9', 'code 1' (Popen's returncode: negative for a signal)."""
    if returncode is None:
        return "unknown status"
    return f"signal {-returncode}" if returncode < 0 else f"code {returncode}"

SHUTDOWN_REQUEST_TIMEOUT = 5.0  # s for the agent to acknowledge the power-off request
QUIT_WAIT = 3.0  # s for QEMU to exit after QMP quit


class VMBase:
    config: VMConfig
    control: ControlConnection | None
    qemu: QemuWatch | None
    monitor: Monitor | None
    egress: Egress | None
    transport: VsockTransport | None
    helpers: list[ManagedProcess]
    timings: dict[str, float]
    on_event: OnEvent | None
    shutdown_reason: str | None
    death_reason: str | None = None  # a helper the VM cannot live without exited (set once)
    _helper_watches: list[asyncio.Task[None]] | None = None
    _death_teardown: asyncio.Task[None] | None = None
    _stopping: asyncio.Future[None] | None = None  # the one teardown (stop() awaits it)
    _stop_began = False  # from then on helpers exiting is expected
    _started = False  # start() returned

    def alive(self) -> bool:
        return bool(self.death_reason is None and self.qemu and self.qemu.alive() and self.control and not self.control.closed.is_set())

    def _on_event(self, msg: dict[str, Any]) -> None:
        if self.on_event:
            self.on_event(msg)

    async def _setup_egress(self) -> None:
        if self.egress is not None and self.control is not None:
            t = time.monotonic()
            await self.egress.setup_guest(self.control)
            self.timings["egress_s"] = time.monotonic() - t

    async def _open_monitor(self, path: Path) -> None:
        self.monitor = await Monitor.connect(str(path), on_event=self._on_monitor_event)

    def _on_monitor_event(self, name: str, data: Mapping[str, Any]) -> None:
        """QEMU says the guest is gone (it powered off, reset, panicked, or the host stopped it)."""
        reason = data.get("reason")
        self.shutdown_reason = reason if isinstance(reason, str) else name.lower()
        log.info("QEMU: %s (%s)", name, self.shutdown_reason)
        self._on_event({"t": "vm_shutdown", "event": name, "reason": self.shutdown_reason})

    async def _shut_down(self, grace: float) -> None:
        """The graceful part of stop(): ask the agent to power the guest off (the guest flushes what
        it wrote to the shares) and wait up to `grace` s for QEMU to exit; failing that (no agent,
        or it did not answer), ask QEMU to quit over QMP. The caller then forces what is left."""
        if self.qemu is None or not self.qemu.alive() or self.death_reason is not None:
            return
        if self.control is not None and not self.control.closed.is_set():
            try:
                await asyncio.wait_for(self.control.shutdown(), SHUTDOWN_REQUEST_TIMEOUT)
                await asyncio.wait_for(self.qemu.wait(), grace)
                return
            except (asyncio.TimeoutError, VMError, OSError):
                log.info("graceful guest shutdown did not finish; asking QEMU to quit")
        if self.monitor is not None and await self.monitor.quit():
            try:
                await asyncio.wait_for(self.qemu.wait(), QUIT_WAIT)
            except asyncio.TimeoutError:
                log.info("QEMU did not quit within %.0f s; forcing", QUIT_WAIT)

    async def _close_monitor(self) -> None:
        if self.monitor is not None:
            await self.monitor.close()

    async def _close_helpers(self) -> None:
        """virtiofsd (and for a cold VM the vsock backend), the egress bridge, the vsock listeners."""
        for proc in self.helpers:
            await proc.stop(grace=3)
        if self.egress:
            await self.egress.close()
        if self.transport:
            await self.transport.close()

    # --- helpers the VM cannot live without -------------------------------------------------

    def _watch_helper(self, proc: ManagedProcess | QemuWatch, what: str,
                      describe: Callable[[int | None], str] | None = None) -> None:
        """From now on, `proc` exiting (before stop() began) kills the VM; `what` names it, or
        `describe(returncode)` says why (a pooled VM's keeper reports its own reason)."""
        if self._helper_watches is None:
            self._helper_watches = []
        self._helper_watches.append(asyncio.ensure_future(self._await_helper(proc, what, describe)))

    async def _await_helper(self, proc: ManagedProcess | QemuWatch, what: str,
                            describe: Callable[[int | None], str] | None) -> None:
        code = await proc.wait()
        if self._stop_began:
            return
        reason = describe(code) if describe else f"{what} exited ({exit_description(code)})"
        cause = await self._qemu_went_first(proc)
        if not self._stop_began:
            self._helper_died(cause or reason)

    async def _qemu_went_first(self, proc: ManagedProcess | QemuWatch) -> str | None:
        """Why QEMU ended, if it did before `proc`: virtiofsd and the vsock backend exit when QEMU
        hangs up on them, and the cause is what the user needs to see, not its echo."""
        qemu = self.qemu
        if proc is qemu or not isinstance(qemu, ManagedProcess) or qemu.alive():
            return None
        return self._qemu_exit_reason(qemu.returncode)

    def _helper_died(self, reason: str) -> None:
        if self.death_reason is not None:
            return
        self.death_reason = reason
        log.error("the VM is dead: %s", reason)
        self._on_event({"t": "vm_died", "reason": reason})
        self._kill_guest()  # the guest stops at once (nothing to flush: see above)
        if self._started:  # while booting, start()'s own failure path tears down (QEMU's exit ends the wait)
            self._death_teardown = asyncio.ensure_future(self.stop(grace=0))

    def _qemu_exit_reason(self, code: int | None) -> str:
        after = f", after {self.shutdown_reason}" if self.shutdown_reason else ""
        return f"QEMU exited ({exit_description(code)}{after})"

    def _kill_guest(self) -> None:
        """SIGKILL QEMU (a claimed VM asks its keeper to: pool/claimed.py)."""
        if isinstance(self.qemu, ManagedProcess):
            self.qemu.send_signal(signal.SIGKILL)

    async def _end_helper_watches(self) -> None:
        """First thing in stop(): the helpers are about to be stopped on purpose. Awaited, so no
        watch is still registered on a helper's pidfd when stop() waits on it."""
        watches = [t for t in self._helper_watches or () if t is not asyncio.current_task()]
        for task in watches:
            task.cancel()
        await asyncio.gather(*watches, return_exceptions=True)

    async def stop(self, grace: float = 10.0) -> None:
        """Idempotent teardown. Every caller waits for the one teardown to end (a dead helper
        starts it on its own), even if that caller is cancelled."""
        if self._stopping is None:
            self._stop_began = True
            self._stopping = asyncio.ensure_future(self._stop(grace))
        await asyncio.shield(self._stopping)

    async def _stop(self, grace: float) -> None:
        raise NotImplementedError
