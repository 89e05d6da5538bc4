"""Relay bytes between two asyncio streams at the transport level (the bridge's guest <-> proxy copy).

Why not two `read()`/`write()`/`drain()` loops: each chunk then costs several coroutine steps and
futures in the VM owner's event loop (the Jupyter server's), a good part of the bridge's CPU per
request. Here both transports get a small protocol whose data_received writes straight into the
other transport. Guarantees kept from the loop version:
- backpressure: when one side's write buffer passes its high-water mark, the other side stops
  reading until it drains (bounded memory for a slow guest or a huge download);
- half-close: EOF on one side is forwarded as EOF to the other; the relay ends when both sides
  have ended, or at once when either connection is lost;
- bytes already buffered in the StreamReaders (read ahead of the handover) are delivered first;
- a stream with no byte in either direction for `idle_timeout` seconds is closed.
"""

from __future__ import annotations

import asyncio


class _Side(asyncio.Protocol):
    """Reads one transport, writes into the other (`peer`)."""

    def __init__(self, relay: "_Relay"):
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.peer: asyncio.Transport | None = None
        self.other: "_Side | None" = None
        self.ended = False  # this side sent EOF (or is gone)

    def data_received(self, data: bytes) -> None:
        self.relay.active = True
        if not self.peer.is_closing():
            self.peer.write(data)

    def eof_received(self) -> bool:
        self.ended = True
        if not self.peer.is_closing() and self.peer.can_write_eof():
            self.peer.write_eof()
        self.relay.check_done()
        return True  # keep our write half open for the other direction

    def connection_lost(self, exc) -> None:
        self.ended = True
        self.relay.finish()

    # flow control of OUR transport's write buffer: stop reading the side that fills it
    def pause_writing(self) -> None:
        self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if not self.other.transport.is_closing():
            self.other.transport.resume_reading()


class _Relay:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.done = loop.create_future()
        self.active = False

    def check_done(self) -> None:
        if self.a.ended and self.b.ended:
            self.finish()

    def finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


def _take_over(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, side: _Side) -> tuple[bytes, bool]:
    """Point the stream's transport at `side`; return what the reader already buffered and
    whether it had seen EOF."""
    transport = writer.transport
    pending = bytes(reader._buffer)  # read ahead of the handover (e.g. a pipelined ClientHello)
    reader._buffer.clear()
    eof = reader.at_eof() or reader._eof
    side.transport = transport
    transport.set_protocol(side)
    return pending, eof


async def splice(ra: asyncio.StreamReader, wa: asyncio.StreamWriter, rb: asyncio.StreamReader,
                 wb: asyncio.StreamWriter, idle_timeout: float) -> None:
    """Relay a <-> b until both ends are done, either connection is lost, or the stream idles.
    The caller closes both writers afterwards."""
    loop = asyncio.get_running_loop()
    relay = _Relay(loop)
    a, b = _Side(relay), _Side(relay)
    relay.a, relay.b = a, b
    a.other, b.other = b, a
    pend_a, eof_a = _take_over(ra, wa, a)
    pend_b, eof_b = _take_over(rb, wb, b)
    a.peer, b.peer = b.transport, a.transport
    for side, pending, eof in ((a, pend_a, eof_a), (b, pend_b, eof_b)):
        if side.transport.is_closing():
            relay.finish()
        if pending:
            side.data_received(pending)
        if eof:
            side.eof_received()
    for side in (a, b):
        if not side.transport.is_closing() and not side.transport.is_reading():
            side.transport.resume_reading()  # the StreamReader may have paused it (full buffer)
    tick = min(30.0, idle_timeout)
    quiet = 0.0
    while not relay.done.done():
        try:
            await asyncio.wait_for(asyncio.shield(relay.done), tick)
        except asyncio.TimeoutError:
            quiet = 0.0 if relay.active else quiet + tick
            relay.active = False
            if quiet >= idle_timeout:
                break
