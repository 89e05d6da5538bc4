"""The mutual-TLS tunnel between a front end and a node: one kernel's five ZMQ channels + control.

Node side (`NodeTunnel`, in the node actor): one TCP listener per kernel. Every connection is
upgraded to TLS 1.3 with the node's identity and the front end's pinned certificate (identity.py),
within HANDSHAKE_TIMEOUT, then sends one opening frame (wire.py):
- "control": at most one at a time; the node answers with the same opening frame (so the front
  end knows it was accepted) and hands a ControlConnection to `on_control`;
- "channel": joined to the kernel's local port for that channel, set by `set_targets` once the
  kernel runs; before that, and for a channel without a target, the stream is refused (closed).

Front side (`FrontTunnel`): the control connection, plus `open_local_ports()`: one loopback
listener per channel, each accepted local TCP connection (jupyter_client's ZMQ sockets) becomes a
new TLS connection to the node opened for that channel. Raw ZMTP bytes pass unchanged both ways;
from the node they also pass the ZMTP size guard (zmtp.py), as from a local guest.

Bounds: the handshake and the opening frame within HANDSHAKE_TIMEOUT; at most `max_streams`
authenticated connections per tunnel on each side; on the node side at most `max_handshakes`
connections still in their handshake, `max_handshakes_per_ip` from one address (refused at
accept, so a stranger cannot hold every slot); copies in CHUNK reads with drain() backpressure; a stream half-closed by one side is half-closed on the other where the
transport can (TCP), fully closed where it cannot (TLS), and torn down HALF_CLOSE_GRACE later.
Every task is referenced and cancelled on close(); every socket is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from typing import Awaitable, Callable

from ..zmtp import ZmtpGuard, ZmtpViolation
from . import identity as ident
from . import wire

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0       # TCP accept -> TLS done -> opening frame read
CONNECT_TIMEOUT = 10.0         # front side: TCP connect + TLS + control acknowledgement
MAX_STREAMS = 64               # authenticated connections per tunnel side (5 channels + reconnects)
MAX_HANDSHAKES = 64            # node side: connections not yet authenticated, in all
MAX_HANDSHAKES_PER_IP = 8      # ... and from one address (a stranger cannot take all the slots)
CHUNK = 64 << 10
HALF_CLOSE_GRACE = 5.0
KEEPALIVE = (5, 2, 3)          # control connection: idle s, interval s, probes (~11 s to notice)

_ERRORS = (OSError, EOFError, ssl.SSLError, asyncio.IncompleteReadError, asyncio.TimeoutError,
           ident.IdentityError, wire.WireError, ZmtpViolation)


class ConnectionClosed(Exception):
    """The control connection is gone (peer closed, reset, protocol violation or local close)."""


class TunnelError(Exception):
    """The tunnel could not be established (refused, wrong certificate, timeout)."""


def _keepalive(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        idle, interval, count = KEEPALIVE
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)


def _abort(writer: asyncio.StreamWriter | None) -> None:
    if writer is None:
        return
    with contextlib.suppress(Exception):
        writer.close()


async def _copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                guard: ZmtpGuard | None = None) -> None:
    """Copy until EOF with backpressure, then half-close dst (or close it: TLS cannot)."""
    try:
        while data := await src.read(CHUNK):
            if guard is not None:
                guard.feed(data)
            dst.write(data)
            await dst.drain()
    except ZmtpViolation as e:
        log.warning("remote tunnel: stream from the node broke ZMTP limits: %s", e)
        _abort(dst)
        raise
    except _ERRORS:
        _abort(dst)
        return
    if dst.can_write_eof():
        with contextlib.suppress(*_ERRORS):
            dst.write_eof()
    else:
        _abort(dst)


async def _splice(a: tuple, b: tuple, guard_b_to_a: ZmtpGuard | None = None) -> None:
    """Join two streams both ways until both ends are done (or one ended HALF_CLOSE_GRACE ago)."""
    (ar, aw), (br, bw) = a, b
    tasks = [asyncio.create_task(_copy(ar, bw)), asyncio.create_task(_copy(br, aw, guard_b_to_a))]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if pending and not any(t.exception() for t in done if not t.cancelled()):
            await asyncio.wait(pending, timeout=HALF_CLOSE_GRACE)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        _abort(aw)
        _abort(bw)


def _listen(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def _accept_loop(listener: socket.socket, streams: "_Streams", serve, admit=None) -> None:
    """Accept TCP and hand (socket, address) to `serve` as a referenced task; a connection that
    `admit(address)` or the stream cap refuses is closed before it costs anything (no TLS
    handshake, no byte read)."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            conn, addr = await loop.sock_accept(listener)
        except OSError as e:                    # EMFILE and friends: back off, keep serving
            log.warning("remote tunnel: accept failed: %s", e)
            await asyncio.sleep(0.1)
            continue
        if not streams.admit() or (admit is not None and not admit(addr)):
            conn.close()
            continue
        streams.spawn(serve(conn, addr))


class _Streams:
    """The live connections of one tunnel side: a count for the cap, and the tasks to cancel."""

    def __init__(self, cap: int):
        self.cap = cap
        self.tasks: set[asyncio.Task] = set()
        self.writers: set[asyncio.StreamWriter] = set()
        self.closed = False

    def admit(self) -> bool:
        return not self.closed and len(self.tasks) < self.cap

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def close(self) -> None:
        self.closed = True
        me = asyncio.current_task()
        tasks = [t for t in self.tasks if t is not me]
        for t in tasks:
            t.cancel()
        for w in list(self.writers):
            _abort(w)
        await asyncio.gather(*tasks, return_exceptions=True)
        self.tasks.clear()
        self.writers.clear()


class ControlConnection:
    """Length-prefixed JSON messages (wire.py) over one mutual-TLS connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 peer_fingerprint: str):
        self._reader = reader
        self._writer = writer
        self._decoder = wire.MessageDecoder()
        self._inbox: list[dict] = []
        self._send_lock = asyncio.Lock()
        self._closed_reason: str | None = None
        self.peer_fingerprint = peer_fingerprint

    @property
    def closed(self) -> bool:
        return self._closed_reason is not None

    async def send(self, msg: dict) -> None:
        """Send one message (checked: wire.WireError for an invalid one, nothing is sent)."""
        data = wire.encode_message(msg)
        if self.closed:
            raise ConnectionClosed(self._closed_reason)
        async with self._send_lock:
            try:
                self._writer.write(data)
                await self._writer.drain()
            except _ERRORS as e:
                self._shut(f"send failed: {type(e).__name__}")
                raise ConnectionClosed(self._closed_reason) from None

    async def receive(self) -> dict:
        """The next message; ConnectionClosed when the peer is gone or broke the protocol.
        One receiver at a time; cancel-safe (a receive cancelled by a timeout loses nothing)."""
        while not self._inbox:
            if self.closed:
                raise ConnectionClosed(self._closed_reason)
            try:
                data = await self._reader.read(CHUNK)
            except _ERRORS as e:
                self._shut(f"receive failed: {type(e).__name__}")
                continue
            if not data:
                self._shut("closed by the peer")
                continue
            try:
                self._inbox.extend(self._decoder.feed(data))
            except wire.WireError as e:
                log.warning("remote control connection: protocol violation: %s", e)
                self._shut(f"protocol violation: {e}")
        return self._inbox.pop(0)

    def _shut(self, reason: str) -> None:
        if self._closed_reason is None:
            self._closed_reason = reason
        _abort(self._writer)

    async def close(self) -> None:
        self._shut("closed locally")
        with contextlib.suppress(*_ERRORS):
            await asyncio.wait_for(self._writer.wait_closed(), 2)


class NodeTunnel:
    """The node's end of one kernel's tunnel (see the module doc)."""

    def __init__(self, identity: ident.TlsIdentity, peer_cert_pem: bytes,
                 on_control: Callable[[ControlConnection], Awaitable[None]],
                 max_streams: int, handshake_timeout: float, max_handshakes: int,
                 max_handshakes_per_ip: int):
        self._context = ident.server_context(identity, peer_cert_pem)
        self._public = identity.public()
        self._peer_fingerprint = ident.fingerprint_of(peer_cert_pem)
        self._on_control = on_control
        # authenticated streams + connections still in their handshake (counted apart, per IP:
        # strangers can hold at most max_handshakes_per_ip slots each, for handshake_timeout)
        self._streams = _Streams(max_streams + max_handshakes)
        self._max_streams = max_streams
        self._max_handshakes = max_handshakes
        self._max_handshakes_per_ip = max_handshakes_per_ip
        self._pending: dict[str, int] = {}
        self._handshake_timeout = handshake_timeout
        self._targets: dict[str, tuple[str, int]] = {}
        self._control: ControlConnection | None = None
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task | None = None
        self.port = 0
        self.refused = 0            # connections refused (cap, handshake, pin, opening, target)

    @classmethod
    async def start(cls, host: str, identity: ident.TlsIdentity, peer_cert_pem: bytes,
                    on_control: Callable[[ControlConnection], Awaitable[None]], *, port: int = 0,
                    max_streams: int = MAX_STREAMS,
                    handshake_timeout: float = HANDSHAKE_TIMEOUT,
                    max_handshakes: int = MAX_HANDSHAKES,
                    max_handshakes_per_ip: int = MAX_HANDSHAKES_PER_IP) -> "NodeTunnel":
        self = cls(identity, peer_cert_pem, on_control, max_streams, handshake_timeout,
                   max_handshakes, max_handshakes_per_ip)
        self._listener = _listen(host, port, max_streams)
        self.port = self._listener.getsockname()[1]
        self._accept_task = asyncio.create_task(
            _accept_loop(self._listener, self._streams, self._serve, self._admit),
            name="capsem-remote-node-accept")
        return self

    def public(self) -> dict:
        """What the node may return through Ray: its certificate, fingerprint and port."""
        return {**self._public, "port": self.port}

    def _admit(self, addr) -> bool:
        ip = addr[0]
        if (sum(self._pending.values()) >= self._max_handshakes
                or self._pending.get(ip, 0) >= self._max_handshakes_per_ip):
            self.refused += 1
            return False
        self._pending[ip] = self._pending.get(ip, 0) + 1
        return True

    def _authenticated(self, ip: str) -> None:
        """Move a connection out of the handshake count (once)."""
        n = self._pending.get(ip, 0) - 1
        if n > 0:
            self._pending[ip] = n
        else:
            self._pending.pop(ip, None)

    def set_targets(self, targets: dict[str, tuple[str, int]]) -> None:
        """channel -> (host, port) of the kernel's local ZMQ port. Replaces the previous set."""
        checked = {}
        for channel, (host, port) in dict(targets).items():
            if channel not in wire.CHANNELS or not isinstance(host, str) \
                    or isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
                raise ValueError(f"bad target {channel!r}: {(host, port)!r}")
            checked[channel] = (host, port)
        self._targets = checked

    def clear_targets(self) -> None:
        """Refuse channel streams again (the kernel is being restarted or is gone)."""
        self._targets = {}

    async def _serve(self, conn: socket.socket, addr) -> None:
        loop = asyncio.get_running_loop()
        writer = None
        pending = True
        try:
            reader = asyncio.StreamReader(limit=CHUNK, loop=loop)
            protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
            transport, _ = await asyncio.wait_for(loop.connect_accepted_socket(
                lambda: protocol, conn, ssl=self._context,
                ssl_handshake_timeout=self._handshake_timeout), self._handshake_timeout)
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)
            self._streams.writers.add(writer)
            ident.check_peer(writer.get_extra_info("ssl_object"), self._peer_fingerprint)
            pending = False
            self._authenticated(addr[0])
            if len(self._streams.tasks) - sum(self._pending.values()) > self._max_streams:
                raise TunnelError(f"more than {self._max_streams} streams on this tunnel")
            opening = wire.decode_open(await asyncio.wait_for(
                reader.readexactly(wire.OPEN_SIZE), self._handshake_timeout))
            if opening.kind == "control":
                await self._serve_control(reader, writer)
            else:
                await self._serve_channel(opening.channel, reader, writer)
        except (*_ERRORS, TunnelError) as e:
            self.refused += 1
            log.info("remote tunnel: refused a connection from %s: %s: %s",
                     addr[0], type(e).__name__, e)
        except Exception:                       # a bug: log it, never leave it in the task
            self.refused += 1
            log.exception("remote tunnel: node stream failed")
        finally:
            if pending:
                self._authenticated(addr[0])
            if writer is None:
                conn.close()
            else:
                self._streams.writers.discard(writer)
                _abort(writer)

    async def _serve_control(self, reader, writer) -> None:
        if self._control is not None and not self._control.closed:
            raise TunnelError("a control connection is already open")
        _keepalive(writer)
        writer.write(wire.encode_open("control"))      # accepted
        await writer.drain()
        control = self._control = ControlConnection(reader, writer, self._peer_fingerprint)
        try:
            await self._on_control(control)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("remote tunnel: the control handler failed")
        finally:
            await control.close()

    async def _serve_channel(self, channel: str, reader, writer) -> None:
        target = self._targets.get(channel)
        if target is None:
            raise TunnelError(f"no kernel target for channel {channel} (not started)")
        k_reader, k_writer = await asyncio.wait_for(asyncio.open_connection(*target),
                                                    self._handshake_timeout)
        try:
            await _splice((reader, writer), (k_reader, k_writer))
        finally:
            _abort(k_writer)

    async def close(self) -> None:
        """Close the listener and every stream (control included); cancel every task."""
        self._targets = {}
        if self._accept_task is not None:
            self._accept_task.cancel()
            await asyncio.gather(self._accept_task, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
        await self._streams.close()


class FrontTunnel:
    """The front end's end of one kernel's tunnel (see the module doc)."""

    def __init__(self, host: str, port: int, identity: ident.TlsIdentity, peer_cert_pem: bytes,
                 max_streams: int, timeout: float):
        self._host, self._port = host, port
        self._context = ident.client_context(identity, peer_cert_pem)
        self._peer_fingerprint = ident.fingerprint_of(peer_cert_pem)
        self._streams = _Streams(max_streams)
        self._timeout = timeout
        self._listeners: list[socket.socket] = []
        self._accept_tasks: list[asyncio.Task] = []
        self._control_writer: asyncio.StreamWriter | None = None
        self.control: ControlConnection | None = None
        self.local_ports: dict[str, int] = {}

    @classmethod
    async def connect(cls, host: str, port: int, identity: ident.TlsIdentity,
                      peer_cert_pem: bytes, *, max_streams: int = MAX_STREAMS,
                      timeout: float = CONNECT_TIMEOUT) -> "FrontTunnel":
        """Open the control connection; TunnelError if the node is unreachable, presents another
        certificate, or refuses ours (it then never acknowledges the control opening)."""
        self = cls(host, port, identity, peer_cert_pem, max_streams, timeout)
        try:
            reader, writer = await asyncio.wait_for(self._open("control"), timeout)
        except _ERRORS as e:
            raise TunnelError(f"cannot open the control connection to {host}:{port}: "
                              f"{type(e).__name__}: {e}") from None
        self._control_writer = writer
        _keepalive(writer)
        self.control = ControlConnection(reader, writer, self._peer_fingerprint)
        return self

    async def _open(self, kind: str, channel: str | None = None):
        reader, writer = await asyncio.open_connection(
            self._host, self._port, ssl=self._context, server_hostname="",
            ssl_handshake_timeout=self._timeout)
        try:
            ident.check_peer(writer.get_extra_info("ssl_object"), self._peer_fingerprint)
            writer.write(wire.encode_open(kind, channel))
            await writer.drain()
            if kind == "control":
                ack = await reader.readexactly(wire.OPEN_SIZE)
                if wire.decode_open(ack) != wire.StreamOpen("control"):
                    raise wire.WireError("the node did not acknowledge the control connection")
        except BaseException:
            _abort(writer)
            raise
        return reader, writer

    async def open_local_ports(self, bind: str = "127.0.0.1",
                               ports: dict[str, int] | None = None) -> dict[str, int]:
        """One listener per channel on `bind`; channel -> port. `ports`: the ports to bind (a
        restarted kernel keeps its connection file's); a channel not in it gets one from the OS."""
        if self.local_ports:
            return dict(self.local_ports)
        try:
            for channel in wire.CHANNELS:
                listener = _listen(bind, (ports or {}).get(channel, 0), self._streams.cap)
                self._listeners.append(listener)
                self.local_ports[channel] = listener.getsockname()[1]
                self._accept_tasks.append(asyncio.create_task(
                    _accept_loop(listener, self._streams,
                                 lambda conn, addr, c=channel: self._serve_local(c, conn)),
                    name=f"capsem-remote-front-{channel}"))
        except BaseException:
            await self._close_listeners()
            self.local_ports = {}
            raise
        return dict(self.local_ports)

    async def _serve_local(self, channel: str, conn: socket.socket) -> None:
        writer = remote_writer = None
        try:
            reader, writer = await asyncio.open_connection(sock=conn, limit=CHUNK)
            self._streams.writers.add(writer)
            r_reader, remote_writer = await asyncio.wait_for(self._open("channel", channel),
                                                             self._timeout)
            self._streams.writers.add(remote_writer)
            await _splice((reader, writer), (r_reader, remote_writer), guard_b_to_a=ZmtpGuard())
        except _ERRORS as e:
            log.info("remote tunnel: %s stream to the node ended: %s: %s",
                     channel, type(e).__name__, e)
        except Exception:
            log.exception("remote tunnel: %s stream failed", channel)
        finally:
            for w in (remote_writer, writer):
                if w is not None:
                    self._streams.writers.discard(w)
                    _abort(w)
            if writer is None:
                conn.close()

    async def _close_listeners(self) -> None:
        for t in self._accept_tasks:
            t.cancel()
        await asyncio.gather(*self._accept_tasks, return_exceptions=True)
        for sock in self._listeners:
            sock.close()
        self._accept_tasks, self._listeners = [], []

    async def close(self) -> None:
        """Close the local listeners, every channel stream and the control connection."""
        await self._close_listeners()
        await self._streams.close()
        if self.control is not None:
            await self.control.close()
