"""Held shell requests of a preinit kernel started with hold (kernel_start {hold}).

Until the release, every shell handler but kernel_info's waits; the kernel handles one shell
message at a time, so the held ones run in order once released. Futures are woken on their own
loop, whichever thread releases (the release comes from the kernel's loop, but nothing here
depends on that).
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from typing import Any, Callable

NOT_HELD = frozenset({"kernel_info_request"})


class HeldRequests:
    def __init__(self) -> None:
        self._open = True
        self._waiting: list[asyncio.Future] = []
        self._lock = threading.Lock()

    def hold(self, handlers: dict[str, Callable[..., Any]]) -> None:
        """Close the gate and wrap every handler in `handlers` (msg_type -> handler, changed in
        place) but NOT_HELD's so that it waits for the release."""
        with self._lock:
            self._open = False
        for msg_type, handler in list(handlers.items()):
            if msg_type not in NOT_HELD:
                handlers[msg_type] = self.wrap(handler)

    def wrap(self, handler: Callable[..., Any]) -> Callable[..., Any]:
        async def handle(*args):
            await self.passed()
            result = handler(*args)
            if inspect.isawaitable(result):
                await result
        return handle

    async def passed(self) -> None:
        """Return at once while open, else once released."""
        with self._lock:
            if self._open:
                return
            fut = asyncio.get_running_loop().create_future()
            self._waiting.append(fut)
        await fut

    def release(self) -> None:
        with self._lock:
            self._open = True
            waiting, self._waiting = self._waiting, []
        for fut in waiting:
            fut.get_loop().call_soon_threadsafe(_wake, fut)


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
