"""The transport interface every vsock backend implements."""

from __future__ import annotations

import abc
import asyncio
import os
from collections.abc import Awaitable, Callable

from ..config import RuntimePaths
from .. import nofollow
from ..errors import VMError
from ..process import Identity

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
CONNECT_TIMEOUT = 30.0


class VsockTransport(abc.ABC):
    """Host end of one VM's vsock device."""

    name: str = ""

    def __init__(self, paths: RuntimePaths):
        self.paths = paths
        self.identity: Identity | None = None  # the helpers run as (set by VM when capsem is root)
        self._servers: list[asyncio.AbstractServer] = []

    @abc.abstractmethod
    def qemu_args(self) -> list[str]:
        """The QEMU -device/-chardev arguments for this backend."""

    async def start(self) -> None:
        """Start whatever runs beside QEMU (must be ready before QEMU starts)."""

    @abc.abstractmethod
    async def listen(self, port: int, handler: StreamHandler) -> None:
        """Accept guest-initiated connections to host `port`."""

    @abc.abstractmethod
    async def connect(self, port: int, timeout: float = CONNECT_TIMEOUT) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open a stream to guest `port`."""

    def helper_processes(self) -> list:
        return []

    def qemu_fds(self) -> tuple[int, ...]:
        """File descriptors QEMU must inherit for qemu_args()."""
        return ()

    def _own_socket(self, path) -> None:
        """A socket we listen on, for the helpers to connect to: 0600 and theirs when they run
        as another user (the 0700 VM dir keeps everybody else out)."""
        nofollow.chmod(path, 0o600)
        if self.identity is not None:
            nofollow.chown(path, self.identity.uid, self.identity.gid)

    async def close(self) -> None:
        await close_servers(self._servers)


async def close_servers(servers: list[asyncio.AbstractServer], wait: float = 2.0) -> None:
    """Stop every listener, then give each at most `wait` s to finish closing; empties `servers`."""
    for server in servers:
        server.close()
    for server in servers:
        try:
            await asyncio.wait_for(server.wait_closed(), wait)
        except asyncio.TimeoutError:
            pass
    servers.clear()


def vhost_vsock_usable() -> bool:
    return os.access("/dev/vhost-vsock", os.R_OK | os.W_OK)


def select_transport(kind: str, paths: RuntimePaths) -> VsockTransport:
    """kind: auto | vhost-user | kernel."""
    from .vhost_kernel import KernelTransport
    from .vhost_user import VhostUserTransport

    if kind == "auto":
        kind = "kernel" if vhost_vsock_usable() else "vhost-user"
    if kind == "kernel":
        if not vhost_vsock_usable():
            raise VMError("the kernel vsock backend needs read/write access to /dev/vhost-vsock",
                          "load vhost_vsock (modprobe vhost_vsock) or use --vsock vhost-user")
        return KernelTransport(paths)
    if kind == "vhost-user":
        return VhostUserTransport(paths)
    raise ValueError(f"vsock backend must be auto, vhost-user or kernel, not {kind!r}")
