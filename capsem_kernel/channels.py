"""Carry a kernel's five ZMQ channels from host TCP ports to the guest over vsock.

The front end connects to the ports of the connection info, on the host's loopback. Each TCP
connection becomes one vsock stream to guest port 5001 whose first frame names the channel; the
agent joins it to the kernel's socket for that channel. ZMQ reconnects are just new connections.
A pooled VM comes with one such stream per channel opened before the claim (`early_streams`,
see capsem_vm.pool.keeper): the first connection on each channel takes it instead of a new one.
Those streams are primed: the keeper sent the kernel a front end's ZMTP greeting
(protocol.ZMTP_GREETING), and the kernel's greeting and READY wait in the stream. The front end
gets them at once; its own greeting is consumed here (checked to ask for the same: else the
connection is closed and ZMQ reconnects on a fresh stream), and its READY (with its identity)
and everything after pass to the kernel. The front end's handshake thus needs no round trip
through the emulated guest (four before: 35-85 ms for the five channels).

With `ready` set (an asyncio.Event the owner sets once the guest kernel listens), a connection is
held on the host until then, its first bytes kept, and one that the front end gives up on before
(jupyter_client's heartbeat reconnects every second while unanswered; ZMQ drops a handshake after
30 s) never reaches the guest: under a slow guest those used to pile up as relay streams polling
for the kernel's port, starving its start of CPU and filling the relay's stream slots. Listening
from the start (rather than only once the kernel listens) keeps the ports ours: refused connects
from the ephemeral range can TCP-self-connect and take a port before we bind it.

What the guest sends is hostile: guest -> host bytes pass a ZMTP size guard (zmtp.py: no frame or
message the host's libzmq would allocate beyond the limits) and a per-kernel rate limit (bytes/s,
token bucket shared by all its channels: one kernel cannot monopolise the host loop). Both
directions copy with drain() backpressure, so a flood stalls the guest instead of growing host
buffers.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time

from capsem_agent import protocol
from capsem_vm import fds
from capsem_vm.rate import TokenBucket
from capsem_vm.vsock.base import close_servers

from .shell_requests import ShellRequests
from .zmtp import ZmtpGuard, ZmtpViolation, same_handshake

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
HOLD_LIMIT = 64 * 1024  # bytes kept per connection while waiting for the kernel (a ZMTP greeting is 64)
GREETING_WAIT = 30.0  # s for a front end's ZMTP greeting on a primed stream (libzmq's handshake limit)
OUTPUT_RATE = 64 << 20     # bytes/s from one guest kernel to the host, all channels together
OUTPUT_BURST = 16 << 20
PORT_KEYS = {"shell": "shell_port", "iopub": "iopub_port", "stdin": "stdin_port",
             "control": "control_port", "hb": "hb_port"}


class GreetingMismatch(Exception):
    """A front end's ZMTP greeting asks for something else than the primer the kernel got."""


class RateLimit:
    """Token bucket over bytes; `await take(n)` waits until n bytes may pass."""

    def __init__(self, rate: float, burst: float):
        self.bucket = TokenBucket(rate, burst)
        self.waited = 0.0  # seconds spent throttled (diagnostics, tests)

    async def take(self, n: int) -> None:
        delay = self.bucket.debit(time.monotonic(), n)
        if delay > 0:
            self.waited += delay
            await asyncio.sleep(delay)


class ChannelForwarder:
    def __init__(self, transport, ip: str, ports: dict[str, int], *, max_rate: float = OUTPUT_RATE,
                 burst: float = OUTPUT_BURST, early_streams=None, listeners=None):
        self.transport = transport
        self.listeners = listeners  # name -> a socket listening on that port already (port_hold.py)
        self.early_streams = early_streams  # (name) -> socket | None: a primed stream, named and open already
        self.early_streams_used = 0
        self.greeting_mismatches = 0  # front ends that greeted unlike the primer (closed: they reconnect)
        self.ip = ip
        self.ports = ports  # channel name -> host TCP port
        self.ready: asyncio.Event | None = None  # see the module doc; None: forward at once
        self.rate = RateLimit(max_rate, burst)
        self.violations: list[str] = []  # ZMTP guard rejections (what the guest did)
        self.shell_replied = asyncio.Event()  # the kernel sent its first shell message (a reply)
        # the front end sent a shell request other than kernel_info (shell_requests.py)
        self.shell_requested = asyncio.Event()
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        for name in protocol.KERNEL_CHANNELS:
            serve = lambda r, w, name=name: self._on_client(name, r, w)  # noqa: E731
            if self.listeners:  # adopted: held since the ports were chosen; closed with the server
                server = await asyncio.start_server(serve, sock=self.listeners[name])
            else:
                server = await asyncio.start_server(serve, host=self.ip, port=self.ports[name], reuse_address=True)
            self._servers.append(server)

    async def _on_client(self, name: str, reader, writer) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        _nodelay(writer)
        g_writer = None
        try:
            held = await self._hold(reader)
            if held is None:
                return  # the front end hung up before the kernel listened: nothing for the guest
            g_reader, g_writer, primed = await self._open_stream(name)
            tap = self._request_watch() if name == "shell" else None
            if primed:
                upstream = self._after_greeting(name, held, reader, g_writer, tap)
            else:
                if tap is not None:
                    tap(held)
                g_writer.write(held)
                upstream = _pipe(reader, g_writer, tap=tap)
            guard = ZmtpGuard()
            seen = self.shell_replied.set if name == "shell" else None
            await _both(upstream, _pipe(g_reader, writer, guard, self.rate, seen))
        except ZmtpViolation as exc:
            if len(self.violations) < 100:
                self.violations.append(f"{name}: {exc}")
            log.warning("closing the %s channel: the guest broke ZMTP limits: %s", name, exc)
        except (OSError, asyncio.TimeoutError) as exc:
            log.warning("cannot carry channel %s to the guest: %s", name, exc)
        except (asyncio.IncompleteReadError, GreetingMismatch):
            pass  # the front end left during its handshake, or must reconnect (logged)
        except asyncio.CancelledError:
            pass  # the forwarder is closing: this connection ends with it
        finally:
            for w in (writer, g_writer):
                if w is not None:
                    w.close()
            self._tasks.discard(task)

    async def _open_stream(self, name: str):
        """A vsock stream to the guest's relay, its first frame (the channel's name) sent, and
        whether it is a primed one."""
        sock = self.early_streams(name) if self.early_streams else None
        if sock is not None:
            if not _hung_up(sock):
                self.early_streams_used += 1
                return *await asyncio.open_connection(sock=sock), True
            sock.close()
        g_reader, g_writer = await self.transport.connect(protocol.PORT_CHANNELS, timeout=30)
        g_writer.write(protocol.encode({"t": "channel", "name": name}))
        return g_reader, g_writer, False

    def _request_watch(self):
        """A tap for the front end's shell bytes that sets shell_requested once a request other
        than kernel_info went by (None once it is set: nothing to watch)."""
        if self.shell_requested.is_set():
            return None
        watch = ShellRequests()

        def tap(data) -> None:
            if not self.shell_requested.is_set() and watch.feed(data):
                self.shell_requested.set()
        return tap

    async def _after_greeting(self, name: str, held: bytes, reader, g_writer, tap=None) -> None:
        """Front end -> primed stream: the front end's greeting is consumed (the kernel got the
        primer in its place), the rest is carried."""
        size = len(protocol.ZMTP_GREETING)
        data = held
        if len(data) < size:
            data += await asyncio.wait_for(reader.readexactly(size - len(data)), GREETING_WAIT)
        if not same_handshake(data[:size], protocol.ZMTP_GREETING):
            self.greeting_mismatches += 1
            log.warning("the %s channel's front end greets unlike ZMQ 4 with the NULL mechanism (%r): closing "
                        "its connection, it reconnects on a fresh stream", name, bytes(data[10:33]))
            raise GreetingMismatch()
        if tap is not None:
            tap(data)
        g_writer.write(data[size:])
        await _pipe(reader, g_writer, tap=tap)

    async def _hold(self, reader: asyncio.StreamReader) -> bytes | None:
        """Wait for `ready`, keeping what the front end sends meanwhile (its ZMTP greeting).
        None if it closed the connection first (or sent implausibly much for a handshake)."""
        if self.ready is None or self.ready.is_set():
            return b""
        held = bytearray()
        ready = asyncio.ensure_future(self.ready.wait())
        try:
            while not ready.done():
                read = asyncio.ensure_future(reader.read(HOLD_LIMIT))
                await asyncio.wait({ready, read}, return_when=asyncio.FIRST_COMPLETED)
                if not read.done():
                    read.cancel()  # nothing was consumed: a cancelled read loses no bytes
                    break
                data = read.result()
                if not data or len(held) + len(data) > HOLD_LIMIT:
                    return None
                held += data
        finally:
            ready.cancel()
        return bytes(held)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await close_servers(self._servers)


async def _both(*coros) -> None:
    """Run the two directions; the first error ends both (and is raised)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            if t.exception() is not None:
                raise t.exception()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _hung_up(sock: socket.socket) -> bool:
    """The peer closed its side (readable, and nothing but EOF). Bytes waiting are no hang-up."""
    try:
        return fds.readable(sock) and not sock.recv(1, socket.MSG_PEEK)
    except OSError:
        return True


def _nodelay(writer) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                guard: ZmtpGuard | None = None, rate: RateLimit | None = None, on_message=None,
                tap=None) -> None:
    """Copy until EOF, with backpressure (drain), then half-close the far side. With a guard,
    bytes that break the ZMTP limits are never written: ZmtpViolation closes the stream.
    on_message: called once, when the guard has seen the first whole message header.
    tap: called with each chunk before it is written (the front end's shell requests)."""
    try:
        while data := await reader.read(CHUNK):
            if tap is not None:
                tap(data)
            if guard is not None:
                guard.feed(data)
                if on_message is not None and guard.messages:
                    on_message()
                    on_message = None
            if rate is not None:
                await rate.take(len(data))
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()
