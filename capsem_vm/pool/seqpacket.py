"""Async send/receive of one wire message per SOCK_SEQPACKET datagram, with optional fds
(SCM_RIGHTS). Receiving never trusts the peer: size bounded by wire.MAX_MESSAGE, at most
`max_fds` descriptors kept (any extra or unexpected ones are closed), a timeout on every wait."""

from __future__ import annotations

import array
import asyncio
import os
import socket

from capsem_agent.fdwait import readable

from . import wire

SO_PEERCRED_FMT = "3i"


def new_socket() -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.setblocking(False)
    return s


def peer_uid(sock: socket.socket) -> int:
    import struct
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(SO_PEERCRED_FMT))
    _pid, uid, _gid = struct.unpack(SO_PEERCRED_FMT, creds)
    return uid


async def recv(sock: socket.socket, *, max_fds: int = 0, timeout: float | None = None) -> tuple[dict | None, list[int]]:
    """One message and its fds; (None, []) at EOF. Raises wire.WireError, asyncio.TimeoutError."""
    async def once():
        while True:
            try:
                return sock.recvmsg(wire.MAX_MESSAGE + 1, socket.CMSG_SPACE(max(1, max_fds) * 4))
            except (BlockingIOError, InterruptedError):
                await readable(sock.fileno())

    data, ancdata, flags, _ = await asyncio.wait_for(once(), timeout)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % 4])
            fds.extend(arr)
    keep, extra = fds[:max_fds], fds[max_fds:]
    for fd in extra:
        os.close(fd)
    if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
        for fd in keep:
            os.close(fd)
        raise wire.WireError("message or its descriptors were truncated")
    if not data and not keep:
        return None, []
    try:
        return wire.decode(data), keep
    except wire.WireError:
        for fd in keep:
            os.close(fd)
        raise


async def send(sock: socket.socket, msg: dict, fds: tuple[int, ...] = (), timeout: float = 10.0) -> None:
    data = wire.encode(msg)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []

    async def once():
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock.sendmsg([data], anc)
                return
            except (BlockingIOError, InterruptedError):
                fut = loop.create_future()
                loop.add_writer(sock.fileno(), lambda: fut.done() or fut.set_result(None))
                try:
                    await fut
                finally:
                    loop.remove_writer(sock.fileno())

    await asyncio.wait_for(once(), timeout)


async def wait_closed(sock: socket.socket) -> None:
    """Wait until the peer closes (messages that arrive meanwhile are dropped, their fds closed)."""
    while True:
        try:
            msg, fds = await recv(sock, max_fds=0)
        except wire.WireError:
            continue
        except OSError:
            return
        if msg is None:
            return
