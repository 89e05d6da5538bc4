"""A VM's QEMU monitor: one QMP connection (qemu.qmp's QMPClient) held for the VM's life, for
runtime changes (VirtioFS hot-plug), `quit`, and the events that end a guest (SHUTDOWN, RESET).

QEMU runs two QMP monitors (qemu.py): `paths.qmp_owner`, which the VM's owner holds (vm.py), and
`paths.qmp`, for whoever claims a pooled VM (pool/claimed.py) or a person debugging it; a QMP
monitor serves one client at a time.

QEMU is the peer, and the guest decides some of what it says: lines are bounded (MAX_LINE), every
wait has a timeout, and only the events named in EVENTS are kept (qemu.qmp queues and remembers
every event it accepts, so an unfiltered listener would grow with each event a guest can cause,
e.g. RTC_CHANGE).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from qemu.qmp import EventListener, ExecInterruptedError, QMPClient, QMPError

from .errors import VMError

log = logging.getLogger(__name__)

MAX_LINE = 1 << 20
# SHUTDOWN: the guest powered off, reset or panicked (QEMU runs with -no-reboot: a reset ends it
# too), or the host asked QEMU to quit; RESET: the guest's state is gone (system_reset).
EVENTS = ("SHUTDOWN", "RESET")

OnEvent = Callable[[str, Mapping[str, Any]], None]


class Monitor:
    def __init__(self, client: QMPClient, on_event: OnEvent | None = None):
        self.client = client
        self.on_event = on_event
        self._events = asyncio.ensure_future(self._read_events())

    @classmethod
    async def connect(cls, path: str, *, on_event: OnEvent | None = None, timeout: float = 10.0) -> Monitor:
        client = QMPClient(readbuflen=MAX_LINE)
        client.events.names = set(EVENTS)  # the default listener (it cannot be removed) keeps only these
        # why negotiate ourselves: qemu.qmp's built-in negotiation reads one message and asserts it is
        # the answer, but QEMU can emit an event between entering command mode and answering
        # qmp_capabilities (CI, under load: "Negotiation failed: AssertionError"). Once connected, the
        # reader routes events to listeners and the answer to execute() by its id.
        client.negotiate = False
        try:
            await asyncio.wait_for(client.connect(path), timeout)  # greeting (checked by qemu.qmp)
            await asyncio.wait_for(client.execute("qmp_capabilities"), timeout)
        except BaseException as exc:  # also cancelled: leave no connection behind
            await _disconnect(client)
            if isinstance(exc, (QMPError, OSError, asyncio.TimeoutError)):
                raise VMError(f"could not connect to QEMU's monitor {path}: {exc or type(exc).__name__}") from None
            raise
        return cls(client, on_event)

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None,
                      timeout: float = 30.0) -> object:
        try:
            return await asyncio.wait_for(self.client.execute(command, arguments), timeout)
        except asyncio.TimeoutError:
            raise VMError(f"QMP {command}: no answer from QEMU within {timeout:.0f} s") from None
        except QMPError as exc:  # ExecuteError (QEMU said no), ExecInterruptedError, StateError
            raise VMError(f"QMP {command} failed: {exc}") from None

    async def quit(self, timeout: float = 5.0) -> bool:
        """Ask QEMU to exit now; False if it could not be asked. (QEMU may close the connection
        before its reply arrives: that is a quit too.)"""
        try:
            await asyncio.wait_for(self.client.execute("quit"), timeout)
        except ExecInterruptedError:
            pass
        except (QMPError, asyncio.TimeoutError) as exc:
            log.info("QMP quit: %s", exc or type(exc).__name__)
            return False
        return True

    async def _read_events(self) -> None:
        listener: EventListener = self.client.events
        async for event in listener:
            name, data = event.get("event"), event.get("data")
            if self.on_event is not None and isinstance(name, str):
                try:
                    self.on_event(name, data if isinstance(data, dict) else {})
                except Exception:  # noqa: BLE001 - a failing handler must not end the event stream
                    log.exception("QMP event %s: handler failed", name)

    async def close(self) -> None:
        self._events.cancel()
        await asyncio.gather(self._events, return_exceptions=True)
        await _disconnect(self.client)


async def _disconnect(client: QMPClient) -> None:
    try:
        await asyncio.wait_for(client.disconnect(), 5)
    except Exception as exc:  # noqa: BLE001 - it re-raises what ended the session (QEMU gone: EOFError)
        log.debug("QMP disconnect: %s", exc or type(exc).__name__)
