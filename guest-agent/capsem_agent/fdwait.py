"""Wait on the running asyncio loop, without a thread, until a file descriptor is readable: a socket
with data, a pidfd whose process exited. Stdlib only: the guest agent and the host both use it."""

from __future__ import annotations

import asyncio


async def readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(fd)
