"""hang_up(): the host ends a guest's stream so that the other end of the Unix socket (where
vhost-device-vsock sits) reads EOF, not ECONNRESET, even when the guest's bytes were never read."""

import asyncio
import socket
import time

import pytest

from capsem_vm.vsock import hangup
from capsem_vm.vsock.hangup import hang_up


async def _serve_once(tmp_path, on_connection):
    """A Unix listener like the transport's; returns (backend-side socket, server)."""
    path = str(tmp_path / "port_5000")
    server = await asyncio.start_unix_server(on_connection, path=path)
    backend = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    backend.connect(path)
    # The guest's bytes: more than asyncio's stream reader takes in before it pauses, so some
    # stay unread in the kernel at our end, as when the host closes before its first read.
    backend.setblocking(False)
    for _ in range(3):
        try:
            while True:
                backend.send(b"\x00" * 65536)
        except BlockingIOError:
            await asyncio.sleep(0.05)
        except BrokenPipeError:  # the host has already closed (the capped path)
            break
    return backend, server


def _timed_hang_up(linger: float, delay: float = 0.0):
    """A connection handler that hangs up (after `delay`) and an Event set when hang_up returned,
    carrying how long it took (`elapsed`)."""
    done = asyncio.Event()

    async def refuse(reader, writer):
        await asyncio.sleep(delay)
        t = time.monotonic()
        await hang_up(reader, writer, linger=linger)
        done.elapsed = time.monotonic() - t
        done.set()
    return refuse, done


async def _recv(sock, timeout=10.0):
    return await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 100), timeout)


async def test_plain_close_with_unread_bytes_reads_as_reset(tmp_path):
    """Why hang_up exists: the kernel turns our close into ECONNRESET at the backend's end."""
    closed = asyncio.Event()

    async def close_at_once(reader, writer):
        await asyncio.sleep(0.2)
        writer.close()
        closed.set()

    backend, server = await _serve_once(tmp_path, close_at_once)
    try:
        await asyncio.wait_for(closed.wait(), 10)
        with pytest.raises(ConnectionResetError):
            await _recv(backend)
    finally:
        backend.close()
        server.close()


async def test_hang_up_reads_as_eof_and_ends_when_the_peer_closes(tmp_path):
    refuse, done = _timed_hang_up(linger=30, delay=0.2)
    backend, server = await _serve_once(tmp_path, refuse)
    try:
        assert await _recv(backend) == b""  # EOF, not ECONNRESET
        backend.close()  # the backend passes EOF on; the guest closes; the backend drops its end
        await asyncio.wait_for(done.wait(), 10)
        assert done.elapsed < 5, "hang_up should end as soon as the peer closes, not after linger"
        assert hangup._lingering == 0
    finally:
        backend.close()
        server.close()


async def test_hang_up_gives_up_after_linger_when_the_peer_never_closes(tmp_path):
    refuse, done = _timed_hang_up(linger=0.5)
    backend, server = await _serve_once(tmp_path, refuse)
    try:
        assert await _recv(backend) == b""
        backend.setblocking(True)
        backend.sendall(b"x" * 1000)  # a guest that keeps talking and never closes
        await asyncio.wait_for(done.wait(), 10)
        assert 0.4 < done.elapsed < 3
        assert hangup._lingering == 0
    finally:
        backend.close()
        server.close()


async def test_past_the_cap_streams_are_closed_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(hangup, "_lingering", hangup.MAX_LINGERING)
    refuse, done = _timed_hang_up(linger=30)
    backend, server = await _serve_once(tmp_path, refuse)
    try:
        await asyncio.wait_for(done.wait(), 10)
        assert done.elapsed < 1
        assert hangup._lingering == hangup.MAX_LINGERING  # untouched by the capped path
    finally:
        backend.close()
        server.close()
