"""The channel forwarder (capsem_kernel/channels.py) against a hostile guest, without a VM: a fake
vsock transport joins host-side streams to "guest" sockets on loopback. Real libzmq traffic passes
the ZMTP guard untouched; oversized or malformed frames close the stream before the host's libzmq
sees them; a flood stalls instead of growing host memory; the rate limit holds."""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import struct
import threading
import time

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from capsem_agent import protocol
from capsem_kernel.channels import ChannelForwarder
from capsem_kernel.zmtp import ZmtpGuard, ZmtpViolation, same_handshake

GREETING = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x01" + b"NULL".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31


@pytest.fixture(autouse=True, scope="module")
def threads_at_start() -> int:
    """Threads in the process when this module's first test starts."""
    return threading.active_count()


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class FakeTransport:
    """`connect(5001)` gives a stream whose far end reads the channel frame, then joins the
    "guest" endpoint chosen for that channel (host, port), like the agent's relay does."""

    def __init__(self, targets: dict[str, tuple[str, int]]):
        self.targets = targets
        self.server = None
        self.connects = 0

    async def start(self):
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def connect(self, port, timeout=30):
        assert port == protocol.PORT_CHANNELS
        self.connects += 1
        return await asyncio.open_connection("127.0.0.1", self.port)

    def early_stream(self, name: str) -> socket.socket:
        """A stream opened, named and primed ahead of time (what a pooled VM's keeper hands over:
        the "guest" gets the primer greeting now, as the agent passes it to the kernel)."""
        s = socket.create_connection(("127.0.0.1", self.port))
        s.sendall(protocol.encode({"t": "channel", "name": name, "prime": True}) + protocol.ZMTP_GREETING)
        return s

    async def _relay(self, reader, writer):
        (n,) = struct.unpack(">I", await reader.readexactly(4))
        name = protocol.decode_body(await reader.readexactly(n))["name"]
        g_reader, g_writer = await asyncio.open_connection(*self.targets[name])

        async def pump(r, w):
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
                w.write_eof()
            except (ConnectionError, OSError):
                w.close()
        await asyncio.gather(pump(reader, g_writer), pump(g_reader, writer), return_exceptions=True)
        writer.close()
        g_writer.close()

    async def close(self):
        self.server.close()


async def _forwarder(targets, **kw):
    transport = FakeTransport(targets)
    await transport.start()
    ports = dict(zip(protocol.KERNEL_CHANNELS, _free_ports(5)))
    fwd = ChannelForwarder(transport, "127.0.0.1", ports, **kw)
    await fwd.start()
    return fwd, transport, ports


async def test_real_zmq_traffic_passes_the_guard_intact():
    ctx = zmq.Context.instance()
    guest = ctx.socket(zmq.ROUTER)
    gport = guest.bind_to_random_port("tcp://127.0.0.1")
    fwd, transport, ports = await _forwarder({"shell": ("127.0.0.1", gport)})
    client = ctx.socket(zmq.DEALER)
    client.connect(f"tcp://127.0.0.1:{ports['shell']}")
    parts = [b"", b"hdr", os.urandom(5 << 20), b"x" * 300, b"end"]

    def exchange():
        client.send_multipart(parts)
        ident, *got = guest.recv_multipart()
        assert got == parts
        guest.send_multipart([ident] + got[::-1])  # the guest -> host direction, through the guard
        return client.recv_multipart()
    try:
        back = await asyncio.wait_for(asyncio.to_thread(exchange), 60)
        assert back == parts[::-1]
        assert fwd.violations == []
    finally:
        client.close(0)
        guest.close(0)
        await fwd.close()
        await transport.close()


@pytest.mark.parametrize("attack, why", [
    (GREETING + b"\x02" + struct.pack(">Q", 1 << 40), "exceeds"),            # one 1 TiB frame
    (GREETING + b"\x80\x01x", "reserved"),                                    # reserved flag bits
    (b"\xff" + b"\x00" * 8 + b"\x7f\x01\x00", "version"),                     # ZMTP 1/2 downgrade
    (b"GET / HTTP/1.1\r\n\r\n", "greeting"),                                  # not ZMTP at all
])
async def test_hostile_frames_are_cut_before_the_host_sees_them(attack, why):
    """A raw "guest" sends a hostile stream: the host client gets at most the bytes before the
    offending header, then the connection closes."""
    async def evil(reader, writer):
        writer.write(attack + b"Z" * 100000)
        await writer.drain()
        await asyncio.sleep(30)
    srv = await asyncio.start_server(evil, "127.0.0.1", 0)
    fwd, transport, ports = await _forwarder({"iopub": ("127.0.0.1", srv.sockets[0].getsockname()[1])})
    try:
        r, w = await asyncio.open_connection("127.0.0.1", ports["iopub"])
        got = b""
        while data := await asyncio.wait_for(r.read(65536), 20):
            got += data
        w.close()
        assert b"Z" not in got and len(got) <= len(GREETING)
        assert len(fwd.violations) == 1 and "iopub" in fwd.violations[0]
        assert why in fwd.violations[0] or why == "greeting"
    finally:
        srv.close()
        await fwd.close()
        await transport.close()


async def test_streams_opened_before_the_claim_are_used_first_and_still_guarded():
    """A pooled VM comes with one named stream per channel opened before the claim (keeper.py):
    the first connection on a channel takes it, later ones open their own, one the guest hung up
    is skipped, and what the guest sends on one passes the ZMTP guard like on any other."""
    ctx = zmq.Context.instance()
    guest = ctx.socket(zmq.ROUTER)
    gport = guest.bind_to_random_port("tcp://127.0.0.1")

    async def evil(reader, writer):
        writer.write(GREETING + b"\x02" + struct.pack(">Q", 1 << 40) + b"Z" * 1000)
        await writer.drain()
        await asyncio.sleep(30)
    srv = await asyncio.start_server(evil, "127.0.0.1", 0)
    fwd, transport, ports = await _forwarder({"shell": ("127.0.0.1", gport), "control": ("127.0.0.1", gport),
                                              "iopub": ("127.0.0.1", srv.sockets[0].getsockname()[1])})
    hung_up, guest_end = socket.socketpair()
    guest_end.close()
    early = {"shell": transport.early_stream("shell"), "iopub": transport.early_stream("iopub"),
             "control": hung_up}
    fwd.early_streams = lambda name: early.pop(name, None)
    clients = []

    def exchange(port):
        client = ctx.socket(zmq.DEALER)
        clients.append(client)
        client.connect(f"tcp://127.0.0.1:{port}")
        client.send_multipart([b"", b"ping"])
        ident, *got = guest.recv_multipart()
        guest.send_multipart([ident] + got + [b"pong"])
        return client.recv_multipart()
    try:
        assert await asyncio.wait_for(asyncio.to_thread(exchange, ports["shell"]), 30) == [b"", b"ping", b"pong"]
        assert (fwd.early_streams_used, transport.connects) == (1, 0)
        assert await asyncio.wait_for(asyncio.to_thread(exchange, ports["shell"]), 30) == [b"", b"ping", b"pong"]
        assert (fwd.early_streams_used, transport.connects) == (1, 1)  # the second one: its own
        assert await asyncio.wait_for(asyncio.to_thread(exchange, ports["control"]), 30) == [b"", b"ping", b"pong"]
        assert (fwd.early_streams_used, transport.connects) == (1, 2)  # the hung-up one: skipped
        r, w = await asyncio.open_connection("127.0.0.1", ports["iopub"])
        got = b""
        while data := await asyncio.wait_for(r.read(65536), 20):
            got += data
        w.close()
        assert fwd.early_streams_used == 2 and transport.connects == 2
        assert b"Z" not in got and len(got) <= len(GREETING)
        assert len(fwd.violations) == 1 and "iopub" in fwd.violations[0]
    finally:
        for c in clients:
            c.close(0)
        guest.close(0)
        srv.close()
        for s in early.values():
            s.close()
        await fwd.close()
        await transport.close()


async def test_a_front_end_that_greets_unlike_the_primer_reconnects_on_a_fresh_stream():
    """The kernel got the primer greeting on the primed stream. A front end asking for something
    else (here ZMTP 3.0) must not be spliced onto it: its connection is closed before any of its
    bytes reach the kernel; libzmq reconnects, and that connection gets a fresh stream. A front
    end whose greeting differs only in the signature's padding (libzmq: its identity's length) is
    spliced, and the kernel sees its identity."""
    ctx = zmq.Context.instance()
    guest = ctx.socket(zmq.ROUTER)
    gport = guest.bind_to_random_port("tcp://127.0.0.1")
    fwd, transport, ports = await _forwarder({"shell": ("127.0.0.1", gport), "stdin": ("127.0.0.1", gport)})
    early = {"shell": transport.early_stream("shell"), "stdin": transport.early_stream("stdin")}
    fwd.early_streams = lambda name: early.pop(name, None)
    client = ctx.socket(zmq.DEALER)
    client.setsockopt(zmq.IDENTITY, b"front-end-session-id")
    try:
        r, w = await asyncio.open_connection("127.0.0.1", ports["shell"])
        w.write(GREETING[:10] + b"\x03\x00" + GREETING[12:])
        while await asyncio.wait_for(r.read(65536), 20):
            pass  # (the kernel's greeting and READY may come first), then the close
        w.close()
        assert fwd.greeting_mismatches == 1 and fwd.early_streams_used == 1 and transport.connects == 0

        def exchange(port):
            client.connect(f"tcp://127.0.0.1:{port}")
            client.send_multipart([b"", b"ping"])
            ident, *got = guest.recv_multipart()
            guest.send_multipart([ident] + got + [b"pong"])
            return ident, client.recv_multipart()
        ident, back = await asyncio.wait_for(asyncio.to_thread(exchange, ports["stdin"]), 30)
        assert back == [b"", b"ping", b"pong"] and ident == b"front-end-session-id"
        assert fwd.early_streams_used == 2 and transport.connects == 0 and fwd.greeting_mismatches == 1
        client.disconnect(f"tcp://127.0.0.1:{ports['stdin']}")
        ident, back = await asyncio.wait_for(asyncio.to_thread(exchange, ports["shell"]), 30)
        assert back == [b"", b"ping", b"pong"] and ident == b"front-end-session-id"
        assert transport.connects == 1  # the shell's primed stream went with the mismatch
    finally:
        client.close(0)
        guest.close(0)
        for s in early.values():
            s.close()
        await fwd.close()
        await transport.close()


async def test_a_flood_to_a_stalled_client_does_not_grow_host_memory():
    """The "guest" streams 400 MB of valid frames; the host client never reads. The forwarder
    must stall (drain backpressure), not buffer."""
    sent = 0

    async def flood(reader, writer):
        nonlocal sent
        writer.write(GREETING)
        frame = b"\x02" + struct.pack(">Q", 1 << 20) + b"\x00" * (1 << 20)
        try:
            for _ in range(400):
                writer.write(frame)
                await writer.drain()
                sent += len(frame)
        except ConnectionError:
            pass
    srv = await asyncio.start_server(flood, "127.0.0.1", 0)
    fwd, transport, ports = await _forwarder({"iopub": ("127.0.0.1", srv.sockets[0].getsockname()[1])})
    try:
        rss0 = _rss_mb()
        r, w = await asyncio.open_connection("127.0.0.1", ports["iopub"], limit=1 << 16)
        w.transport.pause_reading()  # a client that never reads
        await asyncio.sleep(5)
        grown = _rss_mb() - rss0
        assert sent < 64 << 20, f"{sent} bytes left the guest while the client read nothing"
        assert grown < 64, f"host RSS grew {grown:.0f} MB"
        w.close()
    finally:
        srv.close()
        await fwd.close()
        await transport.close()


async def test_output_rate_is_capped_per_kernel():
    async def fast(reader, writer):
        writer.write(GREETING)
        frame = b"\x02" + struct.pack(">Q", 1 << 20) + b"\x00" * (1 << 20)
        try:
            for _ in range(20):
                writer.write(frame)
                await writer.drain()
        except ConnectionError:
            pass
        writer.close()
    srv = await asyncio.start_server(fast, "127.0.0.1", 0)
    fwd, transport, ports = await _forwarder({"iopub": ("127.0.0.1", srv.sockets[0].getsockname()[1])},
                                             max_rate=10 << 20, burst=1 << 20)
    try:
        r, w = await asyncio.open_connection("127.0.0.1", ports["iopub"])
        t0 = time.monotonic()
        total = 0
        while data := await asyncio.wait_for(r.read(1 << 20), 30):
            total += len(data)
        elapsed = time.monotonic() - t0
        assert total == len(GREETING) + 20 * ((1 << 20) + 9)
        assert elapsed >= 1.7, f"20 MiB at a 10 MiB/s cap took only {elapsed:.2f} s"
        w.close()
    finally:
        srv.close()
        await fwd.close()
        await transport.close()


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- the guard alone, fuzzed -------------------------------------------------------------------

def _frames(draw_parts):
    out = bytearray(GREETING)
    for more, command, body in draw_parts:
        flags = (0x01 if more and not command else 0) | (0x04 if command else 0)
        if len(body) > 255:
            out += bytes([flags | 0x02]) + struct.pack(">Q", len(body))
        else:
            out += bytes([flags, len(body)])
        out += body
    return bytes(out)


frame_parts = st.lists(st.tuples(st.booleans(), st.booleans(), st.binary(max_size=600)), max_size=20)


@settings(max_examples=300, deadline=None)
@given(frame_parts, st.lists(st.integers(min_value=0, max_value=5000), max_size=10))
def test_valid_streams_pass_however_they_are_split(parts, cuts):
    stream = _frames(parts)
    guard = ZmtpGuard()
    pos = 0
    for cut in sorted(cuts) + [len(stream)]:
        guard.feed(stream[pos:cut])
        pos = max(pos, cut)
    assert not guard.broken
    # messages: the last (no MORE) frame of each message; commands are no messages
    assert guard.messages == sum(1 for more, command, _ in parts if not command and not more)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=4000), st.lists(st.integers(min_value=0, max_value=4000), max_size=8))
def test_arbitrary_bytes_only_raise_violations_and_split_does_not_matter(data, cuts):
    def outcome(chunks):
        g = ZmtpGuard(max_frame=1000, max_message=1500)
        try:
            for c in chunks:
                g.feed(c)
        except ZmtpViolation:
            return "violation"
        return "ok"
    points = sorted(set(c for c in cuts if c <= len(data)))
    chunks, prev = [], 0
    for p in points + [len(data)]:
        chunks.append(data[prev:p])
        prev = p
    assert outcome([data]) == outcome(chunks)


@pytest.mark.parametrize("socket_type", [zmq.DEALER, zmq.SUB, zmq.REQ])
@pytest.mark.parametrize("identity", [None, b"x" * 36, b"y" * 255])
def test_real_libzmq_greetings_match_the_primer(socket_type, identity):
    """What this host's libzmq sends on connect is the primer up to the padding: a primed stream
    serves Jupyter's front ends (DEALER with the session id as identity, SUB, REQ)."""
    srv = socket.create_server(("127.0.0.1", 0))
    sock = zmq.Context.instance().socket(socket_type)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    sock.connect(f"tcp://127.0.0.1:{srv.getsockname()[1]}")
    try:
        conn, _ = srv.accept()
        conn.settimeout(10)
        conn.sendall(protocol.ZMTP_GREETING)  # libzmq sends the rest of its greeting after ours
        got = b""
        while len(got) < 64:
            got += conn.recv(64 - len(got))
        assert same_handshake(got, protocol.ZMTP_GREETING)
        conn.close()
    finally:
        sock.close(0)
        srv.close()


@given(st.binary(min_size=8, max_size=8), st.binary(min_size=31, max_size=31))
def test_greetings_differing_only_in_padding_and_filler_match(padding, filler):
    primer = protocol.ZMTP_GREETING
    assert same_handshake(primer[:1] + padding + primer[9:33] + filler, primer)


@given(st.integers(min_value=0, max_value=63), st.integers(min_value=1, max_value=255))
def test_greetings_asking_for_another_version_mechanism_or_role_do_not_match(pos, delta):
    primer = bytearray(protocol.ZMTP_GREETING)
    changed = bytearray(primer)
    changed[pos] = (changed[pos] + delta) % 256
    decisive = pos == 0 or (pos == 9 and not changed[9] & 1) or 10 <= pos < 33
    assert same_handshake(bytes(changed), bytes(primer)) is not decisive
    assert not same_handshake(bytes(primer[:63]), bytes(primer))


def test_multipart_messages_are_capped_as_a_whole():
    g = ZmtpGuard(max_frame=300, max_message=500)
    g.feed(GREETING + b"\x01\xc8" + b"a" * 200 + b"\x01\xc8" + b"b" * 200)
    with pytest.raises(ZmtpViolation, match="message exceeds"):
        g.feed(b"\x00\xc8")
    g = ZmtpGuard(max_frame=300, max_message=500)
    g.feed(GREETING + (b"\x00\xc8" + b"a" * 200) * 10)  # single-part messages: each counted alone
    assert not g.broken


def test_guard_rejects_before_the_body_arrives():
    g = ZmtpGuard(max_frame=1000)
    g.feed(GREETING)
    with pytest.raises(ZmtpViolation):
        g.feed(b"\x02" + struct.pack(">Q", 1001))
    with pytest.raises(ZmtpViolation):
        g.feed(b"\x00\x00")  # stays broken


def test_threads_are_not_leaked(threads_at_start):
    """The forwarder tests above leave no threads behind. Counted from this module's first test,
    not absolutely: threads that other test files left in the same pytest process are not this
    module's (after tests/test_agent_kernel.py there were already 56)."""
    assert threading.active_count() - threads_at_start < 10
