"""Real parts for the proxy tests: a test CA, upstream HTTP/HTTPS/WebSocket servers (tornado) and an
HTTP/2 server (h2, run with the proxy venv's Python), and a "guest" client that speaks the egress
protocol over the bridge's Unix sockets exactly as the guest agent will, then HTTP/TLS inside."""

from __future__ import annotations

import asyncio
import datetime
import http.client
import ipaddress
import json
import os
import socket
import ssl
import struct
import time
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from capsem_agent import protocol
from capsem_vm.proxy import dns


# --- the vsock ports as the host sees them ---------------------------------------------------------

class FakeTransport:
    """listen(port, handler) on a Unix socket per port, as vhost-user vsock delivers them (what
    Egress.start needs of a VM's transport)."""

    def __init__(self, d):
        self.d = d
        self.servers = []

    def path(self, port: int) -> str:
        return str(self.d / f"v.sock_{port}")

    async def listen(self, port, handler):
        self.servers.append(await asyncio.start_unix_server(handler, path=self.path(port)))

    async def close(self):
        for s in self.servers:
            s.close()


# --- certificates ---------------------------------------------------------------------------------

def make_ca(cn: str):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_leaf(ca_key, ca_cert, names: list[str], ips: list[str]):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    san = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def write_pem(path, *, cert=None, key=None) -> str:
    data = b""
    if key is not None:
        data += key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    if cert is not None:
        data += cert.public_bytes(serialization.Encoding.PEM)
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


# --- the guest side -------------------------------------------------------------------------------

def recv_exact(sock, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def recv_frame(sock) -> dict:
    (n,) = struct.unpack(">I", recv_exact(sock, 4))
    return json.loads(recv_exact(sock, n))


@dataclass
class Resp:
    reply: dict
    status: int | None = None
    headers: dict | None = None
    body: bytes = b""

    @property
    def policy(self) -> str:
        return (self.headers or {}).get("x-capsem-policy", "")


class Guest:
    """What the guest agent does, from the host's point of view (blocking; run in a thread)."""

    def __init__(self, egress_path: str, dns_path: str, ca_file: str):
        self.egress_path, self.dns_path, self.ca_file = egress_path, dns_path, ca_file

    def open(self, host: str, port: int, timeout: float = 20.0, early: bytes = b""):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(self.egress_path)
        s.sendall(protocol.encode({"t": "connect", "host": host, "port": port}) + early)
        return s, recv_frame(s)

    def tls(self, sock, server_hostname: str, alpn=None):
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if alpn:
            ctx.set_alpn_protocols(alpn)
        return ctx.wrap_socket(sock, server_hostname=server_hostname)

    def http(self, method: str, host: str, port: int, path: str = "/", *, tls: bool = False, sni: str | None = None,
             headers: dict | None = None, body: bytes | None = None, connect_host: str | None = None,
             timeout: float = 20.0, read_body: bool = True) -> Resp:
        s, reply = self.open(connect_host or host, port, timeout)
        if reply.get("t") != "connected":
            s.close()
            return Resp(reply)
        if tls:
            s = self.tls(s, sni or host)
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        conn.sock = s
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read() if read_body else b""
        result = Resp(reply, r.status, {k.lower(): v for k, v in r.getheaders()}, data)
        if not read_body:
            result.body = r  # caller streams it
            result.conn = conn
        else:
            conn.close()
        return result

    def dns(self, name: str, qtype: int = dns.TYPE_A, sock=None):
        own = sock is None
        if own:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(10)
            sock.connect(self.dns_path)
        try:
            sock.sendall(protocol.encode({"t": "dns", "data": protocol.b64(dns.build_query(name, qtype))}))
            reply = recv_frame(sock)
            if reply.get("drop"):
                return None
            return dns.parse_response(protocol.req_data(reply, "data"))[1:]
        finally:
            if own:
                sock.close()

    def websocket(self, host: str, port: int, path: str = "/ws", message: bytes = b"hello", *, tls=True) -> Resp | str:
        s, reply = self.open(host, port)
        if reply.get("t") != "connected":
            return Resp(reply)
        if tls:
            s = self.tls(s, host)
        s.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                break
            head += chunk
        status = int(head.split(b" ", 2)[1])
        if status != 101:
            return Resp(reply, status, {k.strip().lower(): v.strip() for k, _, v in
                                        (l.decode().partition(":") for l in head.split(b"\r\n\r\n")[0].split(b"\r\n")[1:])},
                        head.split(b"\r\n\r\n", 1)[1])
        mask = os.urandom(4)
        s.sendall(bytes([0x81, 0x80 | len(message)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(message)))
        b0, b1 = recv_exact(s, 2)
        payload = recv_exact(s, b1 & 0x7F)
        s.sendall(bytes([0x88, 0x80]) + mask)  # close
        s.close()
        return payload.decode()


# --- the HTTP/2 server (h2 lives in the proxy venv, like mitmproxy) --------------------------------

H2_SERVER = r'''
import asyncio, ssl, sys
import h2.config, h2.connection, h2.events
cert, key = sys.argv[1], sys.argv[2]
async def handle(reader, writer):
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    conn.initiate_connection(); writer.write(conn.data_to_send())
    while True:
        data = await reader.read(65536)
        if not data: break
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.RequestReceived):
                path = dict(ev.headers)[b":path"].decode()
                body = f"h2 ok {path}".encode()
                conn.send_headers(ev.stream_id, [(":status", "200"), ("content-length", str(len(body)))])
                conn.send_data(ev.stream_id, body, end_stream=True)
        writer.write(conn.data_to_send()); await writer.drain()
async def main():
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH); ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["h2"])
    srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    print(srv.sockets[0].getsockname()[1], flush=True)
    await srv.serve_forever()
asyncio.run(main())
'''

H2_CLIENT = r'''
import json, socket, ssl, struct, sys
import h2.config, h2.connection, h2.events
egress, host, port, ca = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
paths = sys.argv[5:]
s = socket.socket(socket.AF_UNIX); s.settimeout(20); s.connect(egress)
body = json.dumps({"t": "connect", "host": host, "port": port}).encode()
s.sendall(struct.pack(">I", len(body)) + body)
n, = struct.unpack(">I", s.recv(4, socket.MSG_WAITALL)); reply = json.loads(s.recv(n, socket.MSG_WAITALL))
if reply["t"] != "connected":
    print(json.dumps({"reply": reply})); sys.exit(0)
ctx = ssl.create_default_context(cafile=ca); ctx.set_alpn_protocols(["h2"])
t = ctx.wrap_socket(s, server_hostname=host)
assert t.selected_alpn_protocol() == "h2", t.selected_alpn_protocol()
conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
conn.initiate_connection()
streams = {}
for p in paths:
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(":method", "GET"), (":path", p), (":scheme", "https"), (":authority", f"{host}:{port}")],
                      end_stream=True)
    streams[sid] = {"path": p, "body": ""}
t.sendall(conn.data_to_send())
done = set()
while len(done) < len(streams):
    data = t.recv(65536)
    if not data: break
    for ev in conn.receive_data(data):
        if isinstance(ev, h2.events.ResponseReceived):
            h = {k.decode(): v.decode() for k, v in ev.headers}
            streams[ev.stream_id].update(status=int(h[":status"]), policy=h.get("x-capsem-policy", ""))
        elif isinstance(ev, h2.events.DataReceived):
            streams[ev.stream_id]["body"] += ev.data.decode()
            conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
            done.add(ev.stream_id)
    t.sendall(conn.data_to_send())
print(json.dumps({"reply": reply, "alpn": t.selected_alpn_protocol(), "streams": list(streams.values())}))
'''


def wait_for(pred, timeout: float = 10.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            return v
        time.sleep(interval)


# --- the "edge": a fronting server that records exactly what it received ---------------------------

# One process (the proxy venv's Python: it needs h2) standing in for a CDN edge that serves many
# names on one address, as domain fronting needs. It prints one JSON line per request it receives:
# the raw HTTP/1 request line and every header, or the HTTP/2 header list as sent (pseudo headers
# included, inbound validation off), and "after-101" lines for bytes that arrive after a protocol
# switch. Three listeners: TLS offering h2 and http/1.1 ("tls"), TLS with http/1.1 only ("tls1"),
# plain ("plain"). Paths: */force101 answers 101 Upgrade: websocket to anything, */force101-raw
# answers 101 Upgrade: x-raw, */ws* answers a request with a websocket Upgrade token with a 101;
# everything else gets 200 and the record as JSON.
EDGE_SERVER = r'''
import asyncio, base64, hashlib, itertools, json, ssl, sys
import h2.config, h2.connection, h2.events
cert, key = sys.argv[1], sys.argv[2]
ids = itertools.count(1)
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
def report(rec):
    sys.stdout.write(json.dumps(rec) + "\n"); sys.stdout.flush()
async def h1(reader, writer, cid, listener):
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            break
        lines = head[:-4].split(b"\r\n")
        hdrs = [(k.strip().decode("latin-1"), v.strip().decode("latin-1"))
                for k, _, v in (l.partition(b":") for l in lines[1:])]
        get = lambda n: [v for k, v in hdrs if k.lower() == n]
        line = lines[0].decode("latin-1")
        rec = {"proto": "http/1.1", "listener": listener, "conn": cid, "line": line, "headers": hdrs}
        report(rec)
        n = get("content-length")
        if n and n[0].isdigit():
            await reader.readexactly(int(n[0]))
        target = line.split(" ")[1] if line.count(" ") == 2 else ""
        ws = any(t.split("/")[0].strip().lower() == "websocket" for v in get("upgrade") for t in v.split(","))
        if target.endswith(("/force101", "/force101-raw")) or (ws and "/ws" in target):
            k = (get("sec-websocket-key") or [""])[0].encode()
            accept = base64.b64encode(hashlib.sha1(k + GUID).digest()).decode()
            proto = "x-raw" if target.endswith("-raw") else "websocket"
            writer.write((f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: {proto}\r\nConnection: Upgrade\r\n"
                          f"Sec-WebSocket-Accept: {accept}\r\n\r\n").encode())
            await writer.drain()
            while True:
                try:
                    data = await reader.read(65536)
                except ConnectionError:
                    break
                if not data:
                    break
                report({"event": "after-101", "listener": listener, "conn": cid, "bytes": len(data)})
                writer.write(b"\x81\x04echo"); await writer.drain()
            break
        body = json.dumps(rec).encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        await writer.drain()
    writer.close()
async def h2srv(reader, writer, cid, listener):
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=False, validate_inbound_headers=False, normalize_inbound_headers=False))
    conn.initiate_connection(); writer.write(conn.data_to_send())
    while True:
        try:
            data = await reader.read(65536)
        except ConnectionError:
            break
        if not data: break
        try:
            events = conn.receive_data(data)
        except Exception as exc:
            report({"event": "h2-error", "listener": listener, "conn": cid, "error": str(exc)[:200]}); break
        for ev in events:
            if isinstance(ev, h2.events.RequestReceived):
                hdrs = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in ev.headers]
                rec = {"proto": "h2", "listener": listener, "conn": cid, "headers": hdrs}
                report(rec)
                body = json.dumps(rec).encode()
                conn.send_headers(ev.stream_id, [(":status", "200"), ("content-length", str(len(body)))])
                conn.send_data(ev.stream_id, body, end_stream=True)
        writer.write(conn.data_to_send()); await writer.drain()
    writer.close()
def serve(listener):
    async def handle(reader, writer):
        cid = next(ids)
        sslobj = writer.get_extra_info("ssl_object")
        if sslobj is not None and sslobj.selected_alpn_protocol() == "h2":
            await h2srv(reader, writer, cid, listener)
        else:
            await h1(reader, writer, cid, listener)
    return handle
def tls_ctx(alpn):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH); ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(alpn)
    return ctx
async def main():
    ports = {}
    for name, ctx in (("tls", tls_ctx(["h2", "http/1.1"])), ("tls1", tls_ctx(["http/1.1"])), ("plain", None)):
        srv = await asyncio.start_server(serve(name), "127.0.0.1", 0, ssl=ctx, limit=1 << 20)
        ports[name] = srv.sockets[0].getsockname()[1]
    print(json.dumps(ports), flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
'''


class Edge:
    """The EDGE_SERVER process; `records` fills as it reports (a thread reads its stdout)."""

    def __init__(self, python: str, cert_file: str, key_file: str):
        import subprocess
        import threading
        self.proc = subprocess.Popen([python, "-c", EDGE_SERVER, cert_file, key_file],
                                     stdout=subprocess.PIPE, text=True)
        ports = json.loads(self.proc.stdout.readline())
        self.TLS, self.TLS1, self.PLAIN = ports["tls"], ports["tls1"], ports["plain"]
        self.records: list[dict] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.records.append(json.loads(line))

    def requests(self) -> list[dict]:
        return [r for r in self.records if "event" not in r]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def header_values(rec: dict, name: str) -> list[str]:
    return [v for k, v in rec["headers"] if k.lower() == name]


def routed_name(rec: dict) -> str:
    """The host a fronting server routes a recorded request to: an absolute-form target's authority
    (RFC 9112 3.2.2: it overrides Host), else :authority, else Host; lowercased, without port,
    userinfo or trailing dot, IDNA-encoded."""
    if rec["proto"] == "h2":
        target = dict((k, v) for k, v in rec["headers"] if k.startswith(":")).get(":path", "")
        auth = (header_values(rec, ":authority") or header_values(rec, "host") or [""])[0]
    else:
        parts = rec["line"].split(" ")
        target = parts[1] if len(parts) == 3 else ""
        auth = (header_values(rec, "host") or [""])[0]
    if "://" in target:
        auth = target.split("://", 1)[1].split("/", 1)[0]
    auth = auth.rpartition("@")[2]
    name = auth[1:auth.find("]")] if auth.startswith("[") else (auth.rsplit(":", 1)[0] if auth.count(":") == 1 else auth)
    try:
        name = name.encode("idna").decode("ascii")
    except UnicodeError:
        pass
    return name.lower().rstrip(".")


def read_http_response(sock, limit: int = 1 << 20) -> tuple[int | None, dict, bytes]:
    """(status, headers, body) of one HTTP/1 response read from `sock` (Content-Length bodies, or
    up to close); status None if the connection ended (or was reset) before a whole head."""
    buf = b""
    try:
        while b"\r\n\r\n" not in buf and len(buf) < limit:
            chunk = sock.recv(65536)
            if not chunk:
                return None, {}, buf
            buf += chunk
    except (ConnectionError, OSError):
        return None, {}, buf
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ")[1])
    except (IndexError, ValueError):
        return None, {}, buf
    headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
    n = int(headers["content-length"]) if headers.get("content-length", "").isdigit() else None
    try:
        while (n is None or len(body) < n) and len(body) < limit and status != 101:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    except (ConnectionError, OSError):
        pass
    return status, headers, body


# An HTTP/2 client that sends header lists exactly as given (outbound validation off), one
# connection per request: argv egress_path host port ca_file, stdin a JSON list of requests, each
# {"headers": [[name, value], ...]}. Prints a JSON list: per request {"status", "body", "policy"} or
# {"closed": why} when the stream was reset or the connection ended first.
H2_RAW_CLIENT = r'''
import json, socket, ssl, struct, sys
import h2.config, h2.connection, h2.events, h2.exceptions
egress, host, port, ca = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
out = []
for req in json.load(sys.stdin):
    s = socket.socket(socket.AF_UNIX); s.settimeout(20); s.connect(egress)
    body = json.dumps({"t": "connect", "host": host, "port": port}).encode()
    s.sendall(struct.pack(">I", len(body)) + body)
    n, = struct.unpack(">I", s.recv(4, socket.MSG_WAITALL)); reply = json.loads(s.recv(n, socket.MSG_WAITALL))
    if reply["t"] != "connected":
        out.append({"closed": "refused " + json.dumps(reply)}); continue
    ctx = ssl.create_default_context(cafile=ca); ctx.set_alpn_protocols(["h2"])
    t = ctx.wrap_socket(s, server_hostname=req.get("sni", host))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False,
        validate_inbound_headers=False))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(k, v) for k, v in req["headers"]], end_stream=req.get("end_stream", True))
    t.sendall(conn.data_to_send())
    res = {"body": ""}
    try:
        while True:
            data = t.recv(65536)
            if not data:
                res.setdefault("closed", "eof"); break
            done = False
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    h = {k.decode(): v.decode() for k, v in ev.headers}
                    res.update(status=int(h[":status"]), policy=h.get("x-capsem-policy", ""))
                elif isinstance(ev, h2.events.DataReceived):
                    res["body"] += ev.data.decode(errors="replace")
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    done = True
                elif isinstance(ev, h2.events.StreamReset):
                    res["closed"] = f"reset {ev.error_code}"; done = True
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    res["closed"] = f"goaway {ev.error_code} {ev.additional_data!r}"; done = True
            t.sendall(conn.data_to_send())
            if done:
                break
    except (OSError, h2.exceptions.ProtocolError) as exc:
        res.setdefault("closed", f"{type(exc).__name__}: {exc}")
    t.close()
    out.append(res)
print(json.dumps(out))
'''
