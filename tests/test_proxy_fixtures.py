"""Real parts for the proxy tests: a test CA, upstream HTTP/HTTPS/WebSocket servers (tornado) and an
HTTP/2 server (h2, run with the proxy venv's Python), and a "guest" client that speaks the egress
protocol over the bridge's Unix sockets exactly as the guest agent will, then HTTP/TLS inside."""

from __future__ import annotations

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
