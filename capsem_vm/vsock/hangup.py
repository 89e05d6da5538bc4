"""Ending a guest's stream so that the guest sees it end.

A plain close() is not enough with vhost-device-vsock. The backend learns of our close by reading
its end of the Unix socket; if bytes the guest sent were still unread at our end, the kernel
answers that read with ECONNRESET instead of EOF, and the backend then drops the connection
without telling the guest, whose connect or read waits forever. (Seen: the guest's probe of the
control port hung 30 s instead of getting EOF.)

So: send EOF first (shutdown for writing, which the backend reads as a clean end and passes on as a
vsock SHUTDOWN), discard whatever the guest still sends until its end closes or `linger` seconds
pass, and only then close. At most MAX_LINGERING streams linger at once, so a guest opening
connections in a loop cannot pin host sockets; past that, streams are closed at once.
"""

from __future__ import annotations

import asyncio
import contextlib

LINGER_S = 5.0
MAX_LINGERING = 32
_READ_CHUNK = 65536

# Process-wide on purpose (owner: this process, only hang_up() changes it): the bound protects the
# process's descriptors, which every VM of the process shares, from guests opening streams in a loop.
_lingering = 0


async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  linger: float = LINGER_S) -> None:
    """Close a stream from the guest so that the guest reads EOF (see the module docstring)."""
    global _lingering
    if _lingering >= MAX_LINGERING or writer.is_closing():
        writer.close()
        return
    _lingering += 1
    try:
        with contextlib.suppress(OSError, RuntimeError, asyncio.TimeoutError):
            await asyncio.wait_for(writer.drain(), linger)
            if writer.can_write_eof():
                writer.write_eof()
        with contextlib.suppress(OSError, asyncio.TimeoutError, asyncio.IncompleteReadError,
                                 asyncio.LimitOverrunError):
            await asyncio.wait_for(_discard_until_eof(reader), linger)
    finally:
        _lingering -= 1
        writer.close()


async def _discard_until_eof(reader: asyncio.StreamReader) -> None:
    while await reader.read(_READ_CHUNK):
        pass
