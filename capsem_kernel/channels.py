"""Carry a kernel's five ZMQ channels from host TCP ports to the guest over vsock.

The front end connects to the ports of the connection info, on the host's loopback. Each TCP
connection becomes one vsock stream to guest port 5001 whose first frame names the channel; the
agent joins it to the kernel's socket for that channel. ZMQ reconnects are just new connections.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from capsem_agent import protocol

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
PORT_KEYS = {"shell": "shell_port", "iopub": "iopub_port", "stdin": "stdin_port",
             "control": "control_port", "hb": "hb_port"}


class ChannelForwarder:
    def __init__(self, transport, ip: str, ports: dict[str, int]):
        self.transport = transport
        self.ip = ip
        self.ports = ports  # channel name -> host TCP port
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        for name in protocol.KERNEL_CHANNELS:
            server = await asyncio.start_server(
                lambda r, w, name=name: self._on_client(name, r, w), host=self.ip, port=self.ports[name],
                reuse_address=True)
            self._servers.append(server)

    async def _on_client(self, name: str, reader, writer) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        _nodelay(writer)
        g_writer = None
        try:
            g_reader, g_writer = await self.transport.connect(protocol.PORT_CHANNELS, timeout=30)
            g_writer.write(protocol.encode({"t": "channel", "name": name}))
            await asyncio.gather(_pipe(reader, g_writer), _pipe(g_reader, writer))
        except (OSError, asyncio.TimeoutError) as exc:
            log.warning("cannot carry channel %s to the guest: %s", name, exc)
        except asyncio.CancelledError:
            pass  # the forwarder is closing: this connection ends with it
        finally:
            for w in (writer, g_writer):
                if w is not None:
                    w.close()
            self._tasks.discard(task)

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        for server in self._servers:
            try:
                await asyncio.wait_for(server.wait_closed(), 2)
            except asyncio.TimeoutError:
                pass
        self._servers.clear()


def _nodelay(writer) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF, with backpressure (drain), then half-close the far side."""
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()
