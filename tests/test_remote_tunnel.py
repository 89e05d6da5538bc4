"""The mutual-TLS tunnel (capsem_kernel/remote/tunnel.py) on loopback, with real TLS and a real
ipykernel on this host as the kernel behind the node side, driven by jupyter_client through the
front side's local ports.

Security tests put a "canary" (a recording TCP listener) where the kernel's ports would be, so
"no byte reaches the kernel" is measured, and each has a positive control (the legitimate client
does reach it) so the detection itself is shown to work. REMOTE_TEST_BREAK=pinning runs the module
with pinning disabled (no client cert requested, any server cert accepted, no fingerprint check):
the refusal tests then fail, as they must; REMOTE_TEST_BREAK=fingerprint keeps the handshake's
chain check and drops only the exact fingerprint check, REMOTE_TEST_BREAK=chain drops the front's
chain check and keeps the fingerprint check: all tests still pass in both (each layer alone
refuses every case here: a self-signed cert is looked up by exact match in the trust store).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import queue
import socket
import ssl
import subprocess
import sys
import time
import uuid

import pytest
import zmq
from jupyter_client import BlockingKernelClient
from jupyter_client.connect import write_connection_file

from capsem_kernel.remote import identity as ident
from capsem_kernel.remote import tunnel, wire
from capsem_kernel.remote.identity import TlsIdentity
from capsem_kernel.remote.tunnel import ConnectionClosed, FrontTunnel, NodeTunnel, TunnelError
from kernel_helpers import execute, stdout_of

MARKER = "capsem-remote-marker-7d3f1e"
PORTS = {ch: f"{ch}_port" for ch in wire.CHANNELS}


# ---- the break switch (see the module doc)

@pytest.fixture(autouse=True)
def _maybe_break_pinning(monkeypatch):
    mode = os.environ.get("REMOTE_TEST_BREAK")
    if mode == "fingerprint":           # chain check only: a twin cert over the same key passes
        monkeypatch.setattr(ident, "check_peer", lambda ssl_object, fp: None)
    if mode not in ("pinning", "chain"):
        return

    def loose(purpose):
        def make(identity, peer_cert_pem):
            ctx = ssl.SSLContext(purpose)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            ident._load_chain(ctx, identity)
            return ctx
        return make
    monkeypatch.setattr(ident, "client_context", loose(ssl.PROTOCOL_TLS_CLIENT))
    if mode == "pinning":
        monkeypatch.setattr(ident, "server_context", loose(ssl.PROTOCOL_TLS_SERVER))
        monkeypatch.setattr(ident, "check_peer", lambda ssl_object, fp: None)


# ---- the kernel, the canary, the relay

@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """A real ipykernel on loopback; its connection info (with a known key)."""
    d = tmp_path_factory.mktemp("kernel")
    key = uuid.uuid4().hex
    cf = str(d / "kernel.json")
    _, info = write_connection_file(cf, ip="127.0.0.1", key=key.encode())
    env = {**os.environ, "IPYTHONDIR": str(d / "ipython")}
    log = open(d / "kernel.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "ipykernel_launcher", "-f", cf], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    kc = BlockingKernelClient()
    kc.load_connection_info(info)
    kc.start_channels()
    try:
        wait_ready(kc, 60)
    except TimeoutError:
        raise AssertionError(f"the local ipykernel did not start (exit {proc.poll()}): "
                             f"{(d / 'kernel.log').read_text()[-2000:]}") from None
    finally:
        kc.stop_channels()
        log.close()
    info = dict(info, key=key)
    yield info
    proc.terminate()
    proc.wait(10)


class Canary:
    """A TCP listener standing in for a kernel's ports: records connections and bytes."""

    def __init__(self):
        self.connections = 0
        self.data = bytearray()
        self.eof = asyncio.Event()
        self.server = None
        self.port = 0

    async def start(self):
        self.server = await asyncio.start_server(self._on, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _on(self, reader, writer):
        self.connections += 1
        try:
            while chunk := await reader.read(65536):
                self.data += chunk
            self.eof.set()
            writer.write(b"bye")
            await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    def targets(self):
        return {ch: ("127.0.0.1", self.port) for ch in wire.CHANNELS}

    async def close(self):
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 2)


class Relay:
    """A real TCP relay that logs every byte both ways (the capture on the cluster network)."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.captured = bytearray()
        self.tasks: set = set()

    async def start(self):
        self.server = await asyncio.start_server(self._on, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _on(self, reader, writer):
        self.tasks.add(asyncio.current_task())
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return

        async def pump(src, dst):
            try:
                while chunk := await src.read(65536):
                    self.captured += chunk
                    dst.write(chunk)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.close()
        await asyncio.gather(pump(reader, uw), pump(ur, writer))
        self.tasks.discard(asyncio.current_task())

    async def close(self):
        self.server.close()
        for t in list(self.tasks):
            t.cancel()


def start_msg(key: str) -> dict:
    return {"op": "start", "kernel_id": "k1", "key": key.encode().hex(),
            "signature_scheme": "hmac-sha256", "policy": None, "folder": None, "cwd": None,
            "env": {}, "extra": {}}


class Pair:
    """A node tunnel whose control handler answers "start" by setting `targets`, and its front."""

    def __init__(self, targets, front=None, node=None, **node_kw):
        self.targets = targets
        self.front_id = front or TlsIdentity.generate("front")
        self.node_id = node or TlsIdentity.generate("node")
        self.node_kw = node_kw
        self.received: list[dict] = []
        self.controls = 0
        self.node = self.front = None

    async def on_control(self, control):
        self.controls += 1
        while True:
            try:
                msg = await control.receive()
            except ConnectionClosed:
                return
            self.received.append(msg)
            if msg["op"] == "start":
                self.node.set_targets(self.targets)
                await control.send({"op": "ready", "node": "n1", "info": {}})

    async def start_node(self, front_pin=None):
        self.node = await NodeTunnel.start("127.0.0.1", self.node_id,
                                           (front_pin or self.front_id).cert_pem,
                                           self.on_control, **self.node_kw)
        return self

    async def connect(self, key: str, port=None, node_pin=None, started=True):
        self.front = await FrontTunnel.connect("127.0.0.1", port or self.node.port, self.front_id,
                                               (node_pin or self.node_id).cert_pem)
        if started:
            await self.front.control.send(start_msg(key))
            assert (await asyncio.wait_for(self.front.control.receive(), 10))["op"] == "ready"
        return self

    async def client_info(self, info):
        ports = await self.front.open_local_ports()
        return {**info, **{PORTS[ch]: p for ch, p in ports.items()}}

    async def close(self):
        if self.front is not None:
            await self.front.close()
        if self.node is not None:
            await self.node.close()


def kernel_targets(info):
    return {ch: ("127.0.0.1", info[PORTS[ch]]) for ch in wire.CHANNELS}


def wait_ready(kc, timeout: float) -> None:
    """kernel_info until shell answers and iopub delivers (jupyter_client's wait_for_ready takes a
    heartbeat not yet seen for a dead kernel: wrong under a loaded machine's slow start)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg_id = kc.kernel_info()
        try:
            while kc.get_shell_msg(timeout=1)["parent_header"].get("msg_id") != msg_id:
                pass
            kc.get_iopub_msg(timeout=1)
        except queue.Empty:
            continue
        while True:                      # flush what the probes left on iopub
            try:
                kc.get_iopub_msg(timeout=0.2)
            except queue.Empty:
                return
    raise TimeoutError("the kernel did not answer kernel_info")


def client(info) -> BlockingKernelClient:
    kc = BlockingKernelClient()
    kc.load_connection_info(info)
    kc.start_channels()
    wait_ready(kc, 30)
    return kc


async def client_tls_stream(port, identity, peer_pem, opening: bytes, payload: bytes = b""):
    """A hand-made TLS client stream to a node port: (bytes read back, error or None)."""
    ctx = ident.client_context(identity, peer_pem) if identity is not None else _no_cert_ctx(peer_pem)
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname=""), 5)
    except (OSError, ssl.SSLError, asyncio.TimeoutError) as e:
        return b"", e
    try:
        w.write(opening + payload)
        await w.drain()
        got = await asyncio.wait_for(r.read(100), 3)   # b"" (or an error): refused
        return got, None
    except (OSError, ssl.SSLError, asyncio.TimeoutError) as e:
        return b"", e
    finally:
        w.close()


def _no_cert_ctx(peer_pem):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE        # the stranger does not even check the server
    return ctx


ZMTP_GREETING = b"\xff" + b"\x00" * 8 + b"\x7f\x03\x00NULL" + b"\x00" * 16 + b"\x00" + b"\x00" * 31


# ---- it works

async def test_execute_iopub_stdin_control_and_heartbeat_through_the_tunnel(kernel):
    pair = await (await Pair(kernel_targets(kernel)).start_node()).connect(kernel["key"])
    try:
        assert pair.received[0] == start_msg(kernel["key"])
        info = await pair.client_info(kernel)
        assert all(info[PORTS[ch]] != kernel[PORTS[ch]] for ch in wire.CHANNELS)

        def drive():
            kc = client(info)
            try:
                out = []
                for i in range(5):        # several round trips on the same streams
                    reply, outputs = execute(kc, f"print('{MARKER}', {i})", timeout=30)
                    assert reply["content"]["status"] == "ok"
                    out.append(stdout_of(outputs))
                reply, outputs = execute(kc, "x = input('q? '); print('got', x)", timeout=30,
                                         allow_stdin=True, stdin_reply=lambda req: "abc")
                assert reply["content"]["status"] == "ok"
                out.append(stdout_of(outputs))
                msg = kc.session.msg("kernel_info_request")
                kc.control_channel.send(msg)
                ctl = kc.control_channel.get_msg(timeout=10)
                assert ctl["parent_header"]["msg_id"] == msg["header"]["msg_id"]
                assert ctl["content"]["status"] == "ok"
                time.sleep(1.5)
                beating = kc.hb_channel.is_beating()
            finally:
                kc.stop_channels()
            # the heartbeat port echoes raw ZMQ frames through the tunnel
            ctx = zmq.Context()
            s = ctx.socket(zmq.REQ)
            s.linger = 0
            s.connect(f"tcp://127.0.0.1:{info['hb_port']}")
            s.send(b"ping-through-tunnel")
            echoed = s.recv() if s.poll(10_000) else None
            s.close()
            ctx.term()
            return out, beating, echoed
        out, beating, echoed = await asyncio.to_thread(drive)
        assert out[:5] == [f"{MARKER} {i}\n" for i in range(5)]
        assert out[5] == "q? got abc\n" or out[5].endswith("got abc\n")
        assert beating and echoed == b"ping-through-tunnel"
        assert pair.node.refused == 0
    finally:
        await pair.close()


async def test_control_messages_both_ways_and_a_violation_closes_only_that_connection(kernel):
    pair = await (await Pair(kernel_targets(kernel)).start_node()).connect(kernel["key"])
    try:
        for _ in range(3):          # receive() cancelled by timeouts loses nothing
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(pair.front.control.receive(), 0.05)
        await pair.front.control.send({"op": "start", **{k: v for k, v in start_msg("ab").items()
                                                        if k != "op"}})
        assert (await asyncio.wait_for(pair.front.control.receive(), 5))["op"] == "ready"
        pair.received.clear()
        pair.received.append(start_msg(kernel["key"]))
        await pair.front.control.send({"op": "ping", "seq": 3})
        await pair.front.control.send({"op": "shutdown", "restart": False})
        for _ in range(50):
            if len(pair.received) == 3:
                break
            await asyncio.sleep(0.05)
        assert [m["op"] for m in pair.received] == ["start", "ping", "shutdown"]
        with pytest.raises(wire.WireError):
            await pair.front.control.send({"op": "start", "key": "x"})  # never sent
        # a second control connection while one is open is refused
        with pytest.raises(TunnelError):
            await FrontTunnel.connect("127.0.0.1", pair.node.port, pair.front_id,
                                      pair.node_id.cert_pem, timeout=3)
        # an authenticated peer breaking the wire format loses its control connection
        pair.front.control._writer.write(b"\xff\xff\xff\xff")
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(pair.front.control.receive(), 5)
        assert pair.controls == 1
    finally:
        await pair.close()


# ---- who may connect

async def test_channel_streams_are_refused_before_start_and_reach_the_target_after():
    canary = await Canary().start()
    pair = await Pair(canary.targets()).start_node()
    try:
        await pair.connect("ab", started=False)
        ports = await pair.front.open_local_ports()
        for ch in wire.CHANNELS:            # every channel, before "start"
            r, w = await asyncio.open_connection("127.0.0.1", ports[ch])
            w.write(ZMTP_GREETING + b"before-start")
            await w.drain()
            assert await asyncio.wait_for(r.read(10), 5) == b""      # closed by the tunnel
            w.close()
        assert canary.connections == 0 and not canary.data
        assert pair.node.refused == len(wire.CHANNELS)
        # positive control: after "start" the same bytes reach the target
        await pair.front.control.send(start_msg("ab"))
        await asyncio.wait_for(pair.front.control.receive(), 10)
        r, w = await asyncio.open_connection("127.0.0.1", ports["shell"])
        w.write(ZMTP_GREETING + b"after-start")
        await w.drain()
        for _ in range(100):
            if b"after-start" in canary.data:
                break
            await asyncio.sleep(0.05)
        assert b"after-start" in canary.data and b"before-start" not in canary.data
        w.close()
        pair.node.clear_targets()
        r, w = await asyncio.open_connection("127.0.0.1", ports["iopub"])
        w.write(ZMTP_GREETING + b"after-clear")
        assert await asyncio.wait_for(r.read(10), 5) == b""
        w.close()
        assert b"after-clear" not in canary.data
    finally:
        await pair.close()
        await canary.close()


async def test_a_stranger_without_a_certificate_reaches_nothing():
    canary = await Canary().start()
    pair = await (await Pair(canary.targets()).start_node()).connect("ab")
    try:
        for ch in wire.CHANNELS:
            got, _ = await client_tls_stream(pair.node.port, None, pair.node_id.cert_pem,
                                            wire.encode_open("channel", ch), ZMTP_GREETING + b"stranger")
            assert got == b""
        got, _ = await client_tls_stream(pair.node.port, None, pair.node_id.cert_pem,
                                        wire.encode_open("control"), wire.encode_message({"op": "interrupt"}))
        assert got == b""
        assert canary.connections == 0 and not canary.data
        assert [m["op"] for m in pair.received] == ["start"]
        assert pair.node.refused == len(wire.CHANNELS) + 1
        # positive control: the front's own certificate reaches the target
        got, err = await client_tls_stream(pair.node.port, pair.front_id, pair.node_id.cert_pem,
                                           wire.encode_open("channel", "shell"), b"legit")
        assert isinstance(err, asyncio.TimeoutError)          # held open, not refused
        assert b"legit" in canary.data and canary.connections == 1
    finally:
        await pair.close()
        await canary.close()


async def test_another_kernels_valid_certificate_is_refused():
    canary = await Canary().start()
    pair = await (await Pair(canary.targets()).start_node()).connect("ab")
    other = await (await Pair(canary.targets()).start_node()).connect("cd")   # a second kernel
    try:
        # kernel 2's front identity (valid, pinned by its own node) against kernel 1's node
        for ch in wire.CHANNELS:
            got, _ = await client_tls_stream(pair.node.port, other.front_id, pair.node_id.cert_pem,
                                            wire.encode_open("channel", ch), b"other-kernel")
            assert got == b""
        with pytest.raises(TunnelError):
            await FrontTunnel.connect("127.0.0.1", pair.node.port, other.front_id,
                                      pair.node_id.cert_pem, timeout=3)
        # same key, a second cert with the same names: passes the chain check, not the pin
        twin = _twin_cert(pair.front_id)
        got, _ = await client_tls_stream(pair.node.port, twin, pair.node_id.cert_pem,
                                        wire.encode_open("channel", "shell"), b"twin")
        assert got == b""
        assert b"other-kernel" not in canary.data and b"twin" not in canary.data
        assert canary.connections == 0
        assert pair.controls == 1
    finally:
        await other.close()
        await pair.close()
        await canary.close()


def _twin_cert(identity: TlsIdentity) -> TlsIdentity:
    """Another certificate over the same key and names (valid for the chain check)."""
    import datetime
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    key = serialization.load_pem_private_key(identity.key_pem, None)
    old = x509.load_pem_x509_certificate(identity.cert_pem)
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(old.subject).issuer_name(old.issuer)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    return TlsIdentity(pem, identity.key_pem, ident.fingerprint_of(pem))


async def test_the_front_refuses_a_server_with_the_wrong_certificate():
    canary = await Canary().start()
    pair = await Pair(canary.targets()).start_node()
    try:
        impostor = TlsIdentity.generate("node")
        with pytest.raises(TunnelError):
            await pair.connect("ab", node_pin=impostor)
        # the same key under another cert is refused too (exact pin)
        with pytest.raises(TunnelError):
            await pair.connect("ab", node_pin=_twin_cert(pair.node_id))
        assert pair.controls == 0 and pair.received == []       # "start" (the key) never sent
        # positive control
        await pair.connect("ab")
        assert pair.controls == 1
    finally:
        await pair.close()
        await canary.close()


async def test_plain_tcp_bytes_reach_nothing():
    canary = await Canary().start()
    pair = await (await Pair(canary.targets(), handshake_timeout=1.0).start_node()).connect("ab")
    try:
        payloads = [wire.encode_open("channel", "shell") + ZMTP_GREETING, ZMTP_GREETING,
                    wire.encode_open("control") + wire.encode_message({"op": "shutdown", "restart": False}),
                    b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x00\x05hello", b""]
        for p in payloads:
            r, w = await asyncio.open_connection("127.0.0.1", pair.node.port)
            if p:
                w.write(p)
                await w.drain()
            t = time.monotonic()
            with contextlib.suppress(OSError):
                got = await asyncio.wait_for(r.read(4096), 5)
                assert not got.startswith(b"bye")
            assert time.monotonic() - t < 3          # closed: bad TLS at once, silence at 1 s
            w.close()
        assert canary.connections == 0 and not canary.data
        assert [m["op"] for m in pair.received] == ["start"]
        # positive control: the same bytes inside the front's TLS reach the canary
        _, err = await client_tls_stream(pair.node.port, pair.front_id, pair.node_id.cert_pem,
                                         wire.encode_open("channel", "shell"), ZMTP_GREETING)
        assert bytes(canary.data) == ZMTP_GREETING, err
    finally:
        await pair.close()
        await canary.close()


async def test_tls_below_1_3_is_refused_both_ways_even_with_the_right_certificates():
    canary = await Canary().start()
    pair = await (await Pair(canary.targets()).start_node()).connect("ab")
    try:
        ctx = ident.client_context(pair.front_id, pair.node_id.cert_pem)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises((ssl.SSLError, OSError)):
            r, w = await asyncio.wait_for(asyncio.open_connection(
                "127.0.0.1", pair.node.port, ssl=ctx, server_hostname=""), 5)
            w.write(wire.encode_open("channel", "shell") + b"downgraded")
            await w.drain()
            assert await asyncio.wait_for(r.read(10), 5) == b""
            raise OSError("refused after the handshake")
        # a node (or impostor) that speaks only TLS 1.2 with the pinned cert: the front refuses
        sctx = ident.server_context(pair.node_id, pair.front_id.cert_pem)
        sctx.minimum_version = ssl.TLSVersion.TLSv1_2
        sctx.maximum_version = ssl.TLSVersion.TLSv1_2
        seen = []

        async def old_server(r, w):
            seen.append(await r.read(100))
            w.close()
        srv = await asyncio.start_server(old_server, "127.0.0.1", 0, ssl=sctx)
        port = srv.sockets[0].getsockname()[1]
        with pytest.raises(TunnelError):
            await FrontTunnel.connect("127.0.0.1", port, pair.front_id, pair.node_id.cert_pem,
                                      timeout=3)
        srv.close()
        assert not any(seen) and b"downgraded" not in canary.data
    finally:
        await pair.close()
        await canary.close()


async def test_each_channel_stream_reaches_only_its_own_target():
    canaries = {ch: await Canary().start() for ch in wire.CHANNELS}
    targets = {ch: ("127.0.0.1", c.port) for ch, c in canaries.items()}
    pair = await (await Pair(targets).start_node()).connect("ab")
    try:
        ports = await pair.front.open_local_ports()
        writers = []
        for ch in wire.CHANNELS:
            r, w = await asyncio.open_connection("127.0.0.1", ports[ch])
            w.write(f"for-{ch}".encode())
            await w.drain()
            writers.append(w)
        for _ in range(100):
            if all(c.data for c in canaries.values()):
                break
            await asyncio.sleep(0.05)
        assert {ch: bytes(c.data) for ch, c in canaries.items()} == \
            {ch: f"for-{ch}".encode() for ch in wire.CHANNELS}
        for w in writers:
            w.close()
    finally:
        await pair.close()
        for c in canaries.values():
            await c.close()


async def test_the_front_cuts_a_zmtp_frame_over_the_size_limit_from_the_node():
    """Bytes from the node come from a guest kernel: the front applies the same ZMTP size guard
    as for a local VM (a frame announcing 1 TiB is never passed to the client's libzmq)."""
    async def hostile_kernel(r, w):
        w.write(ZMTP_GREETING + b"\x02" + (1 << 40).to_bytes(8, "big") + b"x" * 1000)
        await w.drain()
        await r.read()
        w.close()
    srv = await asyncio.start_server(hostile_kernel, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    pair = await (await Pair({ch: ("127.0.0.1", port) for ch in wire.CHANNELS}).start_node()).connect("ab")
    try:
        ports = await pair.front.open_local_ports()
        r, w = await asyncio.open_connection("127.0.0.1", ports["iopub"])
        w.write(ZMTP_GREETING)
        await w.drain()
        got = b""
        with contextlib.suppress(OSError):
            while chunk := await asyncio.wait_for(r.read(65536), 5):
                got += chunk
        assert got in (b"", ZMTP_GREETING)            # nothing of the frame (its chunk is cut)
        w.close()
    finally:
        await pair.close()
        srv.close()


# ---- what crosses the network and what crosses Ray

async def test_a_capture_between_front_and_node_shows_no_marker_and_no_key(kernel):
    pair = await Pair(kernel_targets(kernel)).start_node()
    relay = await Relay(pair.node.port).start()
    try:
        await pair.connect(kernel["key"], port=relay.port)
        info = await pair.client_info(kernel)
        code = f"print('{MARKER}' + '-out')  # {MARKER}-code"

        def drive(info):
            kc = client(info)
            try:
                reply, outputs = execute(kc, code, timeout=30)
                return stdout_of(outputs)
            finally:
                kc.stop_channels()
        assert await asyncio.to_thread(drive, info) == f"{MARKER}-out\n"
        captured = bytes(relay.captured)
        assert len(captured) > 2000                      # the session did cross the relay
        key = kernel["key"].encode()
        for secret in (MARKER.encode(), key, key.hex().encode(), MARKER.encode().hex().encode()):
            assert secret not in captured
        # control run, without the tunnel: the same relay in front of the kernel's own shell and
        # iopub ports shows the marker (so this test can see plaintext when there is some)
        plain = await Relay(kernel["shell_port"]).start()
        plain_iopub = await Relay(kernel["iopub_port"]).start()
        try:
            direct = {**kernel, "shell_port": plain.port, "iopub_port": plain_iopub.port}
            assert await asyncio.to_thread(drive, direct) == f"{MARKER}-out\n"
            assert f"{MARKER}-code".encode() in bytes(plain.captured)
            assert f"{MARKER}-out".encode() in bytes(plain_iopub.captured)
        finally:
            await plain.close()
            await plain_iopub.close()
    finally:
        await pair.close()
        await relay.close()


async def test_the_node_returns_only_public_material(kernel):
    pair = await (await Pair(kernel_targets(kernel)).start_node()).connect(kernel["key"])
    try:
        returned = pair.node.public()
        assert set(returned) == {"cert_pem", "fingerprint", "port"}
        blob = pickle.dumps(returned)
        assert returned["fingerprint"] == ident.fingerprint_of(returned["cert_pem"])
        for secret in (pair.node_id.key_pem, pair.front_id.key_pem, kernel["key"].encode(),
                       kernel["key"].encode().hex().encode(), b"PRIVATE KEY"):
            assert secret not in blob
        for secret_holder in (pair.node_id, pair.front_id):
            with pytest.raises(TypeError):
                pickle.dumps(secret_holder)
        # the front's side of the exchange: only its public() crosses
        assert b"PRIVATE" not in pickle.dumps(pair.front_id.public())
    finally:
        await pair.close()


# ---- bounds and cleanup

async def _idle_from(source_ip: str, port: int):
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source_ip, 0))


async def _closed_within(r, seconds: float) -> bool:
    try:
        return await asyncio.wait_for(r.read(10), seconds) == b""
    except OSError:
        return True
    except asyncio.TimeoutError:
        return False


async def test_handshake_caps_per_address_and_in_all_and_the_handshake_timeout():
    canary = await Canary().start()
    pair = await Pair(canary.targets(), max_handshakes=3, max_handshakes_per_ip=2,
                      handshake_timeout=1.5).start_node()
    try:
        a = [await _idle_from("127.0.0.2", pair.node.port) for _ in range(2)]
        await asyncio.sleep(0.2)
        r, w = await _idle_from("127.0.0.2", pair.node.port)      # 3rd from one address
        assert await _closed_within(r, 0.5)
        w.close()
        await pair.connect("ab")       # the front, from another address, still gets in
        b = [await _idle_from("127.0.0.3", pair.node.port)]
        await asyncio.sleep(0.2)
        r, w = await _idle_from("127.0.0.4", pair.node.port)      # 4th in all
        assert await _closed_within(r, 0.5)
        w.close()
        t = time.monotonic()
        for r, w in a + b:                                          # silent: closed at 1.5 s
            assert await _closed_within(r, 5)
            w.close()
        assert time.monotonic() - t < 3
        assert pair.controls == 1 and canary.connections == 0
    finally:
        await pair.close()
        await canary.close()


async def test_a_stranger_flood_does_not_stop_a_running_session(kernel):
    pair = await (await Pair(kernel_targets(kernel), handshake_timeout=1.0).start_node()).connect(kernel["key"])
    info = await pair.client_info(kernel)
    stop = asyncio.Event()

    async def stranger(source_ip):
        while not stop.is_set():
            try:
                r, w = await _idle_from(source_ip, pair.node.port)
                w.write(b"\x16\x03\x01junk" * 50)
                await asyncio.sleep(0.05)
                w.close()
            except OSError:
                await asyncio.sleep(0.05)
    flood = [asyncio.create_task(stranger(f"127.0.0.{10 + i % 5}")) for i in range(40)]
    try:
        def drive():
            kc = client(info)
            try:
                return [stdout_of(execute(kc, f"print({i} * 2)", timeout=30)[1]) for i in range(10)]
            finally:
                kc.stop_channels()
        assert await asyncio.to_thread(drive) == [f"{i * 2}\n" for i in range(10)]
        assert pair.node.refused > 40
    finally:
        stop.set()
        await asyncio.gather(*flood, return_exceptions=True)
        await pair.close()


async def test_authenticated_stream_cap():
    canary = await Canary().start()
    pair = await (await Pair(canary.targets(), max_streams=2).start_node()).connect("ab")
    try:
        ports = await pair.front.open_local_ports()
        r1, w1 = await asyncio.open_connection("127.0.0.1", ports["shell"])   # control + 1
        w1.write(b"one")
        await w1.drain()
        for _ in range(100):
            if canary.connections == 1:
                break
            await asyncio.sleep(0.05)
        r2, w2 = await asyncio.open_connection("127.0.0.1", ports["iopub"])   # over the cap
        w2.write(b"two")
        await w2.drain()
        assert await _closed_within(r2, 5)
        assert canary.connections == 1 and b"two" not in canary.data
        for w in (w1, w2):
            w.close()
    finally:
        await pair.close()
        await canary.close()


async def test_half_close_reaches_the_kernel_side_and_the_stream_ends():
    canary = await Canary().start()
    pair = await (await Pair(canary.targets()).start_node()).connect("ab")
    try:
        ports = await pair.front.open_local_ports()
        r, w = await asyncio.open_connection("127.0.0.1", ports["stdin"])
        w.write(ZMTP_GREETING + b"last words")
        await w.drain()
        w.write_eof()
        await asyncio.wait_for(canary.eof.wait(), 5)       # the target saw EOF after the data
        assert canary.data == ZMTP_GREETING + b"last words"
        assert await asyncio.wait_for(r.read(), tunnel.HALF_CLOSE_GRACE + 5) in (b"", b"bye")
        w.close()
    finally:
        await pair.close()
        await canary.close()


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


async def test_close_leaves_no_fd_and_no_task(kernel):
    await asyncio.sleep(0)
    before = _fds()
    tasks_before = asyncio.all_tasks()
    pair = await (await Pair(kernel_targets(kernel)).start_node()).connect(kernel["key"])
    info = await pair.client_info(kernel)
    # streams open and in use when the tunnels close
    socks = []
    for ch in ("shell", "iopub", "hb"):
        r, w = await asyncio.open_connection("127.0.0.1", info[PORTS[ch]])
        w.write(ZMTP_GREETING)
        await w.drain()
        socks.append(w)
    # and refused ones: a stranger's TLS, plain bytes, a wrong certificate
    await client_tls_stream(pair.node.port, None, pair.node_id.cert_pem,
                            wire.encode_open("channel", "shell"))
    await client_tls_stream(pair.node.port, TlsIdentity.generate("x"), pair.node_id.cert_pem,
                            wire.encode_open("channel", "shell"))
    r, w = await asyncio.open_connection("127.0.0.1", pair.node.port)
    w.write(b"plain")
    socks.append(w)
    with pytest.raises(TunnelError):
        await FrontTunnel.connect("127.0.0.1", pair.node.port, pair.front_id,
                                  TlsIdentity.generate("y").cert_pem, timeout=3)
    await asyncio.sleep(0.5)
    assert len(_fds()) > len(before) + 10
    await pair.close()
    for w in socks:
        w.close()
    await asyncio.sleep(0.2)
    leftover = _fds() - before
    assert not leftover, [os.readlink(f"/proc/self/fd/{fd}") for fd in leftover
                          if os.path.exists(f"/proc/self/fd/{fd}")]
    assert asyncio.all_tasks() - tasks_before - {asyncio.current_task()} == set()
