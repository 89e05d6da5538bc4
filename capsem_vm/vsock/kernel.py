"""vsock through the host kernel's vhost-vsock: QEMU opens /dev/vhost-vsock, the host uses AF_VSOCK.

Host ports are shared by every VM on the host, so guest-initiated connections are accepted by one
listener per port in this process and dispatched by the peer's CID; a connection from any other
CID is refused (one VM must not reach another's ports).
"""

from __future__ import annotations

import asyncio
import random
import socket

from .base import CONNECT_TIMEOUT, StreamHandler, VsockTransport

_dispatch: dict[int, dict[int, StreamHandler]] = {}  # host port -> guest CID -> handler
_listeners: dict[int, socket.socket] = {}


def _pick_cid() -> int:
    return random.randint(3, 0xFFFF_FFFE)


class KernelTransport(VsockTransport):
    name = "kernel"

    def __init__(self, paths):
        super().__init__(paths)
        self.cid = _pick_cid()
        self._ports: list[int] = []

    def qemu_args(self) -> list[str]:
        return ["-device", f"vhost-vsock-pci,guest-cid={self.cid}"]

    async def listen(self, port: int, handler: StreamHandler) -> None:
        loop = asyncio.get_running_loop()
        if port not in _listeners:
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            sock.bind((socket.VMADDR_CID_ANY, port))
            sock.listen(64)
            sock.setblocking(False)
            _listeners[port] = sock
            _dispatch[port] = {}
            loop.create_task(_accept_loop(port, sock))
        _dispatch[port][self.cid] = handler
        self._ports.append(port)

    async def connect(self, port: int, timeout: float = CONNECT_TIMEOUT):
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (self.cid, port)), timeout)
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)

    async def close(self) -> None:
        for port in self._ports:
            _dispatch.get(port, {}).pop(self.cid, None)
        self._ports.clear()
        await super().close()


async def _accept_loop(port: int, sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    while True:
        conn, (peer_cid, _peer_port) = await loop.sock_accept(sock)
        handler = _dispatch.get(port, {}).get(peer_cid)
        if handler is None:  # unknown CID: not one of our VMs, or not its port
            conn.close()
            continue
        reader, writer = await asyncio.open_connection(sock=conn)
        loop.create_task(handler(reader, writer))
