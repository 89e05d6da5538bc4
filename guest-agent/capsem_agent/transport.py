"""Where the agent's streams come from: vsock in the VM, Unix sockets in host-side tests.

Addresses are strings so tests can override them through the environment:
    vsock:<cid>:<port>    (default in the VM)
    unix:/path/to/socket
"""

from __future__ import annotations

import os
import socket
import time

from . import protocol

ENV_CONNECT = "CAPSEM_AGENT_CONNECT"
ENV_CHANNELS_LISTEN = "CAPSEM_AGENT_CHANNELS_LISTEN"

VMADDR_CID_ANY = 0xFFFFFFFF
CONNECT_TIMEOUT = 30.0  # the host starts listening before QEMU starts; 30 s covers slow TCG boots


def control_address() -> str:
    return os.environ.get(ENV_CONNECT) or f"vsock:{protocol.HOST_CID}:{protocol.PORT_CONTROL}"


def channels_address() -> str:
    return os.environ.get(ENV_CHANNELS_LISTEN) or f"vsock:{VMADDR_CID_ANY}:{protocol.PORT_CHANNELS}"


def _parse(addr: str):
    kind, _, rest = addr.partition(":")
    if kind == "unix" and rest:
        return socket.AF_UNIX, rest
    if kind == "vsock":
        cid, _, port = rest.partition(":")
        return socket.AF_VSOCK, (int(cid), int(port))
    raise ValueError(f"bad agent address {addr!r} (want unix:PATH or vsock:CID:PORT)")


def connect(addr: str, timeout: float = CONNECT_TIMEOUT) -> socket.socket:
    """Connect, retrying while the peer is not there yet (the host may still be setting up)."""
    family, target = _parse(addr)
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(0.1, min(5.0, deadline - time.monotonic())))
            sock.connect(target)
            sock.settimeout(None)
            return sock
        except OSError:
            sock.close()
            if time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.25)


def listen(addr: str, backlog: int = 64) -> socket.socket:
    family, target = _parse(addr)
    sock = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_UNIX:
        try:
            os.unlink(target)
        except FileNotFoundError:
            pass
    sock.bind(target)
    sock.listen(backlog)
    return sock
