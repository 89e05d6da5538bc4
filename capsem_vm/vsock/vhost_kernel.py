"""vsock through the host kernel's vhost-vsock: QEMU opens /dev/vhost-vsock, the host uses AF_VSOCK.

Host ports are shared by every VM on the host, so guest-initiated connections are accepted by one
listener per port in this process and dispatched by the peer's CID; a connection from any other
CID is refused (one VM must not reach another's ports).

capsem opens /dev/vhost-vsock itself and hands QEMU the descriptor (`vhostfd=`), so an unprivileged
QEMU (privsep.py) needs no access to the device node.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket

from ..config import RuntimePaths
from .base import CONNECT_TIMEOUT, StreamHandler, VsockTransport

log = logging.getLogger(__name__)

# Process-wide by necessity (owner: this process; KernelTransport.listen/close alone change them):
# an AF_VSOCK host port is one per host, so this process binds each port once and every VM's
# transport registers its CID here; a second listener on the port would fail with EADDRINUSE.
_dispatch: dict[int, dict[int, StreamHandler]] = {}  # host port -> guest CID -> handler
_listeners: dict[int, socket.socket] = {}
# the accept loops and connection handlers: asyncio keeps only weak references to tasks, so an
# unreferenced one can be garbage-collected mid-flight (owner: this module, via _keep)
_tasks: set[asyncio.Task[None]] = set()
VHOST_VSOCK = "/dev/vhost-vsock"


def _pick_cid() -> int:
    return random.randint(3, 0xFFFF_FFFE)


class KernelTransport(VsockTransport):
    name = "kernel"

    def __init__(self, paths: RuntimePaths) -> None:
        super().__init__(paths)
        self.cid = _pick_cid()
        self._ports: list[int] = []
        self._vhost_fd: int | None = None

    async def start(self) -> None:
        self._vhost_fd = os.open(VHOST_VSOCK, os.O_RDWR | os.O_CLOEXEC)

    def qemu_args(self) -> list[str]:
        fd = f",vhostfd={self._vhost_fd}" if self._vhost_fd is not None else ""
        return ["-device", f"vhost-vsock-pci,guest-cid={self.cid}{fd}"]

    def qemu_fds(self) -> tuple[int, ...]:
        return (self._vhost_fd,) if self._vhost_fd is not None else ()

    async def listen(self, port: int, handler: StreamHandler) -> None:
        loop = asyncio.get_running_loop()
        if port not in _listeners:
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            sock.bind((socket.VMADDR_CID_ANY, port))
            sock.listen(64)
            sock.setblocking(False)
            _listeners[port] = sock
            _dispatch[port] = {}
            _keep(loop.create_task(_accept_loop(port, sock)))
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
        if self._vhost_fd is not None:
            os.close(self._vhost_fd)
            self._vhost_fd = None
        await super().close()


def handler_for(port: int, peer_cid: int) -> StreamHandler | None:
    """The handler of the VM with `peer_cid` for host `port`, or None (refuse the connection)."""
    return _dispatch.get(port, {}).get(peer_cid)


async def dispatch(port: int, conn: socket.socket, peer_cid: int) -> bool:
    """Hand an accepted connection to its VM's handler; close it if no VM of ours has that CID
    (or that VM does not listen on `port`). Returns whether it was accepted."""
    handler = handler_for(port, peer_cid)
    if handler is None:
        log.info("vsock: refused a connection to port %d from CID %d", port, peer_cid)
        conn.close()
        return False
    reader, writer = await asyncio.open_connection(sock=conn)
    _keep(asyncio.get_running_loop().create_task(handler(reader, writer)))
    return True


def _keep(task: asyncio.Task[None]) -> None:
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


async def _accept_loop(port: int, sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    while True:
        try:
            conn, (peer_cid, _peer_port) = await loop.sock_accept(sock)
        except asyncio.CancelledError:
            raise
        except OSError as exc:  # EMFILE and friends: keep serving the other VMs
            log.warning("vsock accept on port %d failed: %s", port, exc)
            await asyncio.sleep(0.1)
            continue
        try:
            await dispatch(port, conn, peer_cid)
        except OSError as exc:
            log.warning("vsock: connection from CID %d to port %d failed: %s", peer_cid, port, exc)
            conn.close()
