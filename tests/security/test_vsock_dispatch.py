"""The kernel vhost-vsock backend: host ports are shared by all VMs, so every guest connection is
dispatched by its peer CID. /dev/vhost-vsock is absent on the CI hosts: this drives the dispatch
logic (capsem_vm/vsock/vhost_kernel.py) with socketpairs standing in for accepted AF_VSOCK sockets."""

from __future__ import annotations

import asyncio
import socket

import pytest

from capsem_vm.vsock import vhost_kernel


@pytest.fixture
def table(monkeypatch):
    monkeypatch.setattr(vhost_kernel, "_dispatch", {})
    return vhost_kernel._dispatch


async def _roundtrip(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    try:
        await loop.sock_sendall(sock, b"ping")
        return await asyncio.wait_for(loop.sock_recv(sock, 100), 5)
    except ConnectionError:  # refused: the far end was closed at once
        return b""


async def test_connections_reach_only_the_vm_with_that_cid(table):
    seen = []

    def handler_for(cid):
        async def handler(reader, writer):
            seen.append((cid, await reader.read(4)))
            writer.write(b"vm%d" % cid)
            await writer.drain()
            writer.close()
        return handler

    table[5000] = {7: handler_for(7), 9: handler_for(9)}
    table[5002] = {7: handler_for(7)}
    results = {}
    for port, cid in [(5000, 7), (5000, 9), (5000, 8), (5002, 9), (5001, 7), (5003, 7)]:
        ours, theirs = socket.socketpair()
        accepted = await vhost_kernel.dispatch(port, theirs, cid)
        results[(port, cid)] = (accepted, await _roundtrip(ours))
        ours.close()
    assert results == {
        (5000, 7): (True, b"vm7"), (5000, 9): (True, b"vm9"),
        (5000, 8): (False, b""),   # a CID that is not one of our VMs
        (5002, 9): (False, b""),   # VM 9 does not listen on 5002: VM 7's port is not its port
        (5001, 7): (False, b""), (5003, 7): (False, b""),  # ports nobody listens on
    }
    assert sorted(seen) == [(7, b"ping"), (9, b"ping")]


async def test_a_closed_vm_no_longer_receives_connections(table, tmp_path):
    from capsem_vm.config import RuntimePaths
    t = vhost_kernel.KernelTransport(RuntimePaths(tmp_path))
    t._ports.append(5000)

    async def handler(reader, writer):
        writer.close()
    table[5000] = {t.cid: handler}
    await t.close()
    ours, theirs = socket.socketpair()
    assert await vhost_kernel.dispatch(5000, theirs, t.cid) is False
    ours.close()


async def test_accept_loop_survives_accept_errors_and_keeps_dispatching(table, monkeypatch):
    """EMFILE on accept (a guest flooding connections) must not stop the shared listener."""
    got = asyncio.Event()

    async def handler(reader, writer):
        got.set()
        writer.close()
    table[5000] = {3: handler}
    ours, theirs = socket.socketpair()
    events = [OSError(24, "Too many open files"), (theirs, (3, 1234))]

    class FakeLoop:
        def __getattr__(self, name):
            return getattr(real, name)

        async def sock_accept(self, sock):
            if not events:
                await asyncio.sleep(3600)
            item = events.pop(0)
            if isinstance(item, Exception):
                raise item
            return item

    real = asyncio.get_running_loop()
    monkeypatch.setattr(vhost_kernel.asyncio, "get_running_loop", lambda: FakeLoop())
    task = real.create_task(vhost_kernel._accept_loop(5000, None))
    try:
        await asyncio.wait_for(got.wait(), 5)
    finally:
        task.cancel()
        ours.close()
