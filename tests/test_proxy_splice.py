"""The bridge's transport-level relay (capsem_vm.proxy.splice): integrity, read-ahead bytes,
half-close, backpressure, connection loss, idle timeout. Socket pairs stand in for the guest's
vsock stream and the proxy connection."""

from __future__ import annotations

import asyncio
import os
import socket
import struct

from capsem_vm.proxy.splice import splice


async def _pair():
    s1, s2 = socket.socketpair()
    outer = await asyncio.open_connection(sock=s1)
    inner = await asyncio.open_connection(sock=s2)
    return outer, inner


async def _tcp_pair():
    """(outer, inner) over loopback TCP, so the outer end can be reset."""
    lst = socket.create_server(("127.0.0.1", 0))
    s1 = socket.create_connection(lst.getsockname())
    s2, _ = lst.accept()
    lst.close()
    return await asyncio.open_connection(sock=s1), await asyncio.open_connection(sock=s2)


async def _setup(idle_timeout: float = 600.0, before=None):
    (ga_r, ga_w), (a_r, a_w) = await _pair()   # guest end, bridge's guest-side stream
    (pb_r, pb_w), (b_r, b_w) = await _tcp_pair()  # proxy end, bridge's proxy-side stream
    if before:
        await before(ga_w, pb_w, a_r, b_r)
    task = asyncio.ensure_future(splice(a_r, a_w, b_r, b_w, idle_timeout))

    async def close():
        await asyncio.wait_for(task, 5)
        a_w.close()
        b_w.close()
    return (ga_r, ga_w), (pb_r, pb_w), task, close


async def test_bytes_flow_both_ways_and_half_close_is_forwarded():
    (gr, gw), (pr, pw), task, close = await _setup()
    gw.write(b"request")
    assert await pr.readexactly(7) == b"request"
    gw.write_eof()
    assert await pr.read() == b""           # EOF reached the proxy side
    pw.write(b"response after half-close")  # the other direction still works
    assert await gr.readexactly(25) == b"response after half-close"
    assert not task.done()
    pw.write_eof()
    assert await gr.read() == b""
    await close()                           # both ended: the relay returns


async def test_bytes_read_ahead_of_the_handover_are_delivered_first():
    async def before(gw, pw, a_r, b_r):
        gw.write(b"pipelined-hello")
        pw.write(b"server-first")
        # as after the connect frame: the readers have buffered these bytes already
        for _ in range(100):
            if a_r._buffer and b_r._buffer:
                break
            await asyncio.sleep(0.01)
        assert a_r._buffer and b_r._buffer
    (gr, gw), (pr, pw), task, close = await _setup(before=before)
    assert await pr.readexactly(15) == b"pipelined-hello"
    assert await gr.readexactly(12) == b"server-first"
    gw.close()
    pw.close()
    await close()


async def test_large_transfer_is_intact_and_memory_stays_bounded_with_a_slow_reader():
    (gr, gw), (pr, pw), task, close = await _setup()
    data = os.urandom(8 << 20)
    gw.write(b"go")
    await pr.readexactly(2)

    async def send():
        for i in range(0, len(data), 1 << 16):
            pw.write(data[i:i + (1 << 16)])
            await pw.drain()
        pw.write_eof()
    sender = asyncio.ensure_future(send())
    got = bytearray()
    while len(got) < len(data):
        chunk = await gr.read(1 << 14)
        assert chunk
        got += chunk
        if len(got) < (1 << 20):
            await asyncio.sleep(0.002)      # slow guest at first: the relay must hold back
    await sender
    assert bytes(got) == data
    gw.close()
    await close()


async def test_backpressure_stops_reading_the_fast_side():
    (gr, gw), (pr, pw), task, close = await _setup()
    # the guest reads nothing: the proxy side's writes must eventually block (drain waits)
    blocked = False
    chunk = b"z" * (1 << 16)
    for _ in range(2000):  # up to 128 MiB; without backpressure all of it would be buffered
        pw.write(chunk)
        try:
            await asyncio.wait_for(pw.drain(), 0.5)
        except asyncio.TimeoutError:
            blocked = True
            break
    assert blocked, "the relay kept reading although the guest side did not drain"
    gw.close()
    pw.transport.abort()
    await close()


async def test_connection_loss_on_one_side_ends_the_relay():
    (gr, gw), (pr, pw), task, close = await _setup()
    gw.write(b"x")
    assert await pr.readexactly(1) == b"x"
    sock = pw.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    pw.transport.abort()  # the proxy connection is reset
    await close()         # the relay ends although the guest side never sent EOF
    assert await asyncio.wait_for(gr.read(), 5) == b""  # and the guest side gets closed


async def test_idle_stream_is_closed():
    (gr, gw), (pr, pw), task, close = await _setup(idle_timeout=0.3)
    await asyncio.wait_for(task, 5)
    await close()

