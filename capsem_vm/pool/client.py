"""Talking to the pool service from a claimer (the kernel provisioner, `capsem pool status|stop`).

claim() returns a `Claim`: the owner end of the VM's keeper socket (holding it keeps the VM alive;
closing it tears the VM down), the agent's control connection fd, the channel streams the keeper
opened before the claim (by channel name), and what the keeper reported.
"""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass, field

from capsem_agent import protocol

from ..errors import VMError
from . import seqpacket, wire
from .service import socket_path

CLAIM_TIMEOUT = 30.0


class PoolUnavailable(VMError):
    """No pool service answers for this user."""


@dataclass
class Claim:
    owner: socket.socket
    control_fd: int
    info: dict  # the keeper's vm message: vm_dir, qemu_pid, uid, gid, hello, timings, flavour
    claim_s: float = 0.0
    channel_fds: dict[str, int] = field(default_factory=dict)  # name -> stream to guest port 5001

    def close(self) -> None:
        if self.control_fd >= 0:
            os.close(self.control_fd)
            self.control_fd = -1
        for fd in self.channel_fds.values():
            os.close(fd)
        self.channel_fds.clear()
        self.owner.close()


async def request(msg: dict, *, max_fds: int = 0, timeout: float = CLAIM_TIMEOUT) -> tuple[dict, list[int]]:
    path = socket_path()
    sock = seqpacket.new_socket()
    try:
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, str(path)), 5)
        except (OSError, asyncio.TimeoutError) as exc:
            raise PoolUnavailable(f"no capsem pool answers at {path}: {exc}", "capsem pool start") from None
        await seqpacket.send(sock, msg)
        try:
            reply, fds = await seqpacket.recv(sock, max_fds=max_fds, timeout=timeout)
        except (OSError, wire.WireError, asyncio.TimeoutError) as exc:
            raise PoolUnavailable(f"the capsem pool did not answer: {exc!r}") from None
        if reply is None:
            raise PoolUnavailable("the capsem pool closed the connection without answering "
                                  "(is it running as another user?)")
        return reply, fds
    finally:
        sock.close()


async def status() -> dict:
    reply, _ = await request({"t": "status"}, timeout=10)
    return reply


async def stop() -> None:
    await request({"t": "stop"}, timeout=10)


async def claim(flavour: wire.Flavour) -> tuple[Claim | None, str]:
    """A warm VM of `flavour` (with its reason "" ) or (None, why not). Raises PoolUnavailable."""
    t0 = asyncio.get_running_loop().time()
    reply, fds = await request({"t": "claim", "flavour": flavour.to_wire()}, max_fds=1)
    if reply["t"] != "vm" or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        return None, str(reply.get("reason") or reply.get("message") or reply["t"])[:500]
    owner = socket.socket(fileno=fds[0])
    try:
        if owner.type != socket.SOCK_SEQPACKET:
            raise VMError("the pool handed over something that is not a keeper socket")
        owner.setblocking(False)
        await seqpacket.send(owner, {"t": "handover"})
        msg, cfds = await seqpacket.recv(owner, max_fds=1 + len(protocol.KERNEL_CHANNELS),
                                         timeout=CLAIM_TIMEOUT)
        names = msg.get("channels", []) if msg is not None else []
        if (msg is None or msg["t"] != "vm" or not cfds or not isinstance(names, list)
                or not all(isinstance(n, str) and n in protocol.KERNEL_CHANNELS for n in names)
                or len(set(names)) != len(names) or len(cfds) != 1 + len(names)):
            for fd in cfds:
                os.close(fd)
            raise VMError(f"the pooled VM's keeper refused the hand-over: {str(msg)[:300]}")
    except BaseException:
        owner.close()
        raise
    return Claim(owner, cfds[0], msg, asyncio.get_running_loop().time() - t0, dict(zip(names, cfds[1:]))), ""
