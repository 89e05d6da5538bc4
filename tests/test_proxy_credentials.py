"""Credential placement end to end on the host: guest-protocol client -> EgressBridge -> the real
proxy service (mitmproxy, own venv) -> real upstream servers on 127.0.0.1 that record every byte
(HTTP/1.1) or every decoded header, data and trailer (HTTP/2) they receive.

The oracle is what the upstream got: the secret only as the declared header's value and as the
whole value of the declared query parameter, nowhere else, whatever the guest tried (issue 15
item 3). Before that fix the placeholder was replaced in every header and anywhere in the path."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
from contextlib import asynccontextmanager

import pytest

from capsem_vm.policy import parse_policy
from capsem_vm.proxy.service import find_proxy_python

from proxy_world import ProxyWorld, upstream_tls
from raw_upstream import RawUpstream
from proxy_helpers import Guest

pytestmark = pytest.mark.asyncio(loop_scope="module")

SECRET = "s3cr3t-" + os.urandom(8).hex()
FILE_SECRET = "f1le-" + os.urandom(8).hex()
PH = "capsem-placeholder-svc"
HOST = "secret.test.example"

# --- a recording HTTP/2 upstream (h2 lives in the proxy venv) ---------------------------------------

H2_RECORDER = r'''
import asyncio, json, ssl, sys
import h2.config, h2.connection, h2.events
cert, key, out = sys.argv[1], sys.argv[2], sys.argv[3]
async def handle(reader, writer):
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    conn.initiate_connection(); writer.write(conn.data_to_send())
    streams = {}
    while True:
        data = await reader.read(65536)
        if not data: break
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.RequestReceived):
                streams[ev.stream_id] = {"headers": [[k.decode(), v.decode()] for k, v in ev.headers],
                                         "data": "", "trailers": []}
            elif isinstance(ev, h2.events.DataReceived):
                streams[ev.stream_id]["data"] += ev.data.decode("latin-1")
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.TrailersReceived):
                streams[ev.stream_id]["trailers"] = [[k.decode(), v.decode()] for k, v in ev.headers]
            if getattr(ev, "stream_ended", None) is not None or isinstance(ev, h2.events.StreamEnded):
                sid = ev.stream_id
                rec = streams.pop(sid, None)
                if rec is None: continue
                with open(out, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                auth = dict((k, v) for k, v in rec["headers"]).get("authorization", "")
                body = json.dumps(rec).encode()
                conn.send_headers(sid, [(":status", "200"), ("content-length", str(len(body))), ("x-echo-auth", auth)])
                conn.send_data(sid, body, end_stream=True)
        writer.write(conn.data_to_send()); await writer.drain()
async def main():
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH); ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["h2"])
    srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    print(srv.sockets[0].getsockname()[1], flush=True)
    await srv.serve_forever()
asyncio.run(main())
'''

# the guest's HTTP/2 request: the placeholder in every place h2 has, as headers, data and trailers
H2_ATTACKER = r'''
import json, socket, ssl, struct, sys
import h2.config, h2.connection, h2.events
egress, host, port, ca, ph = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
s = socket.socket(socket.AF_UNIX); s.settimeout(20); s.connect(egress)
body = json.dumps({"t": "connect", "host": host, "port": port}).encode()
s.sendall(struct.pack(">I", len(body)) + body)
n, = struct.unpack(">I", s.recv(4, socket.MSG_WAITALL)); reply = json.loads(s.recv(n, socket.MSG_WAITALL))
ctx = ssl.create_default_context(cafile=ca); ctx.set_alpn_protocols(["h2"])
t = ctx.wrap_socket(s, server_hostname=host)
assert t.selected_alpn_protocol() == "h2"
conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
conn.initiate_connection()
sid = conn.get_next_available_stream_id()
conn.send_headers(sid, [(":method", "POST"), (":path", f"/h2/{ph}?other={ph}&api_key={ph}"), (":scheme", "https"),
                        (":authority", f"{host}:{port}"), ("x-api-key", ph), ("cookie", f"a={ph}"),
                        ("cookie", f"b={ph}"), ("authorization", f"Bearer {ph}"), ("x-split", ph[:9]),
                        ("x-split", ph[9:]), ("content-type", "application/x-www-form-urlencoded")])
conn.send_data(sid, f"api_key={ph}&x={ph}".encode())
conn.send_headers(sid, [("x-trailer", ph)], end_stream=True)
t.sendall(conn.data_to_send())
out = {"status": None, "headers": {}, "body": ""}
done = False
while not done:
    data = t.recv(65536)
    if not data: break
    for ev in conn.receive_data(data):
        if isinstance(ev, h2.events.ResponseReceived):
            out["headers"] = {k.decode(): v.decode() for k, v in ev.headers}
            out["status"] = int(out["headers"][":status"])
        elif isinstance(ev, h2.events.DataReceived):
            out["body"] += ev.data.decode("latin-1")
            conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
            done = True
    t.sendall(conn.data_to_send())
print(json.dumps(out))
'''


@asynccontextmanager
async def build_world(tmp_path_factory):
    """This module's `world` (conftest.py)."""
    tmp = tmp_path_factory.mktemp("proxy-creds")
    w = ProxyWorld(tmp, env={"CAPSEM_TEST_SECRET": SECRET})
    tls = upstream_tls(tmp, "capsem test upstream CA")
    # every byte of every HTTP/1.1 request, echoed back: the guest must still see only placeholders
    w.raw = RawUpstream("127.0.0.1", ssl_ctx=tls.server_context(), echo=True)
    w.on_close(w.raw.close)
    w.RAW = w.raw.port
    w.h2_log = tmp / "h2.jsonl"
    w.h2 = subprocess.Popen([find_proxy_python(), "-c", H2_RECORDER, tls.cert_file, tls.key_file, str(w.h2_log)],
                            stdout=subprocess.PIPE, text=True)
    w.on_close(lambda: (w.h2.kill(), w.h2.wait()))
    w.H2 = int(await asyncio.to_thread(w.h2.stdout.readline))
    conf = tmp / "conf"
    conf.mkdir(mode=0o700)
    w.secret_file = conf / "file-token"
    w.secret_file.write_text(FILE_SECRET + "\n")
    w.secret_file.chmod(0o600)
    policy_text = f"""
[[rule]]
name = "secret-api"
host = "*.test.example"
port = [{w.RAW}, {w.H2}]
addresses = ["127.0.0.1"]
action = "allow"

[[credential]]
name = "svc"
hosts = ["{HOST}"]
env = "CAPSEM_TEST_SECRET"
header = "Authorization"
format = "Bearer {{value}}"
query = "api_key"
guest_env = "SVC_TOKEN"

[[credential]]
name = "filecred"
hosts = ["file.test.example"]
file = "{w.secret_file}"
header = "X-File-Key"
"""
    w.policy = parse_policy(policy_text, "creds-policy.toml")
    assert w.policy.guest_env()["SVC_TOKEN"] == PH
    await w.start({"k-creds": w.policy}, upstream_ca=tls.ca_file, workers=1,
                  resolve={HOST: "127.0.0.1", "file.test.example": "127.0.0.1"})
    w.bridge, w.g = w.bridges["k-creds"], w.guests["k-creds"]
    yield w
    await w.close()


def exchange(g: Guest, host: str, port: int, raw: bytes) -> bytes:
    """Send raw bytes inside TLS through the guest path; everything the guest gets back."""
    s, reply = g.open(host, port)
    assert reply == {"t": "connected"}, reply
    s = g.tls(s, host)
    s.sendall(raw)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except (ConnectionError, ssl.SSLError, TimeoutError):
        pass
    s.close()
    return out


def misplaced(raw: bytes, secret: bytes, header: bytes = b"authorization", value: bytes | None = None) -> list[str]:
    """Every place of `raw` (one HTTP/1.1 request as the upstream got it) where the secret is, except
    the declared header (exactly once, exactly `value`) and whole `api_key=` query values."""
    value = value if value is not None else b"Bearer " + secret
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    target = lines[0].split(b" ")[1]
    path, _, query = target.partition(b"?")
    bad = []
    if secret in path:
        bad.append(f"path {path[:200]!r}")
    bad += [f"query parameter {p[:200]!r}" for p in query.split(b"&") if secret in p and p != b"api_key=" + secret]
    declared = 0
    for line in lines[1:]:
        name, _, v = line.partition(b":")
        if name.strip().lower() == header:
            declared += 1
            if v.strip() != value:
                bad.append(f"declared header with value {v.strip()[:200]!r}")
        elif secret in line:
            bad.append(f"header {line[:200]!r}")
    if declared != 1:
        bad.append(f"declared header sent {declared} times")
    if secret in body:
        bad.append(f"body/trailers {body[:300]!r}")
    return bad


def req(method: str, target: str, headers: list[tuple[str, str]] = (), body: bytes = b"", chunked: bytes | None = None,
        port: int = 0) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {HOST}:{port}", "Connection: close", *(f"{k}: {v}" for k, v in headers)]
    if chunked is not None:
        lines.append("Transfer-Encoding: chunked")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + chunked
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


REFUSED_AS_AMBIGUOUS = {"a path parameter"}


def spellings(port: int) -> dict[str, tuple[bytes, list[bytes]]]:
    """name -> (request, byte strings the upstream must receive as the guest sent them)."""
    enc = "%63apsem-placeholder-svc"
    boundary = "xyzBOUNDARY"
    multipart = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"api_key\"\r\n\r\n{PH}\r\n"
                 f"--{boundary}\r\nContent-Disposition: form-data; name=\"f\"; filename=\"{PH}.txt\"\r\n"
                 f"Content-Type: text/plain\r\n\r\n{PH}\r\n--{boundary}--\r\n").encode()
    r = lambda *a, **k: req(*a, port=port, **k)  # noqa: E731
    return {
        "another header": (r("GET", "/echo", [("X-Api-Key", PH)]), [f"X-Api-Key: {PH}".encode()]),
        "a cookie": (r("GET", "/echo", [("Cookie", f"session={PH}; other=1")]), [f"session={PH}".encode()]),
        "two cookies": (r("GET", "/echo", [("Cookie", f"a={PH}"), ("Cookie", f"b={PH}")]), [f"b={PH}".encode()]),
        "the path": (r("GET", f"/echo/{PH}/x"), [f"/echo/{PH}/x".encode()]),
        "a path parameter": (r("GET", f"/echo;api_key={PH}"), [f";api_key={PH}".encode()]),
        "another query parameter": (r("GET", f"/echo?other={PH}&api_key2={PH}&xapi_key={PH}"),
                                    [f"other={PH}&api_key2={PH}&xapi_key={PH}".encode()]),
        "inside the declared parameter's value": (r("GET", f"/echo?api_key=x{PH}&api_key={PH}x"),
                                                  [f"api_key=x{PH}&api_key={PH}x".encode()]),
        "a ;-joined query parameter": (r("GET", f"/echo?a=1;api_key={PH}"), [f"a=1;api_key={PH}".encode()]),
        "after a fragment": (r("GET", f"/echo?api_key={PH}#f"), []),
        "percent-encoded name or value": (r("GET", f"/echo?api%5Fkey={PH}&api_key={enc}&o={enc}"),
                                          [f"api%5Fkey={PH}&api_key={enc}".encode()]),
        # the proxy sends the canonical path (RFC 3986: unreserved escapes decoded): the placeholder
        "percent-encoded in the path": (r("GET", f"/echo/{enc}"), [f"/echo/{PH}".encode()]),
        "the body": (r("POST", "/echo", [("Content-Type", "application/x-www-form-urlencoded")],
                       f"api_key={PH}&x={PH}".encode()), [f"api_key={PH}&x={PH}".encode()]),
        "a multipart field": (r("POST", "/echo", [("Content-Type", f"multipart/form-data; boundary={boundary}")],
                                multipart), [multipart]),
        # (HTTP/1 trailers never leave: mitmproxy 11 drops such a request; the HTTP/2 test sends trailers)
        "a chunked body": (r("POST", "/echo", chunked=f"{len(PH):x}\r\n{PH}\r\n0\r\n\r\n".encode()),
                           [PH.encode()]),
        "split across headers": (r("GET", "/echo", [("X-Split", PH[:9]), ("X-Split", PH[9:]), ("X-Dup", PH),
                                                    ("X-Dup", PH)]), [f"X-Dup: {PH}".encode()]),
        "the declared header, repeated": (r("GET", "/echo", [("Authorization", f"Bearer {PH}"),
                                                             ("authorization", PH)]), []),
        "a websocket upgrade": (r("GET", "/ws", [("Upgrade", "websocket"), ("Connection", "Upgrade"),
                                                 ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                                                 ("Sec-WebSocket-Version", "13"), ("Sec-WebSocket-Protocol", PH)]),
                                [f"Sec-WebSocket-Protocol: {PH}".encode()]),
    }


async def test_the_secret_lands_only_in_the_declared_header_and_query_parameter(world):
    w = world
    secret = SECRET.encode()
    failures = []
    for name, (raw, kept) in spellings(w.RAW).items():
        w.raw.clear()
        got = await asyncio.to_thread(exchange, w.g, HOST, w.RAW, raw)
        if not w.raw.requests:
            # a ';' parameter is an ambiguous path: refused before any credential is placed
            if not (name in REFUSED_AS_AMBIGUOUS and got.startswith(b"HTTP/1.1 403")
                    and b'rule="ambiguous-path"' in got):
                failures.append(f"{name}: never reached the upstream ({got[:200]!r})")
            continue
        seen = w.raw.requests[-1]
        failures += [f"{name}: the secret is in the {where}" for where in misplaced(seen, secret)]
        failures += [f"{name}: {k[:80]!r} did not go out as the guest wrote it" for k in kept if k not in seen]
        if secret in got or SECRET.encode() in got.replace(b"\\", b""):
            failures.append(f"{name}: the guest saw the secret in the response")
    assert not failures, "\n".join(failures)


async def test_the_declared_query_parameter_gets_the_secret_and_nothing_else(world):
    w = world
    w.raw.clear()
    got = await asyncio.to_thread(exchange, w.g, HOST, w.RAW,
                                  req("GET", f"/echo/{PH}?a={PH}&api_key={PH}&b=2&api_key={PH}", port=w.RAW))
    seen = w.raw.requests[-1]
    target = seen.split(b" ")[1]
    assert target == f"/echo/{PH}?a={PH}&api_key={SECRET}&b=2&api_key={SECRET}".encode()
    assert misplaced(seen, SECRET.encode()) == []
    # the echo of the secret is scrubbed on the way back, in headers and body
    assert SECRET.encode() not in got and f"X-Echo-Auth: Bearer {PH}".encode() in got
    assert got.count(PH.encode()) >= 4
    # the audit row has the guest's URL (placeholders), never the secret
    rows = await asyncio.to_thread(w.rows, kind="http", url=lambda u: "api_key" in (u or ""))
    assert rows and all(SECRET not in json.dumps(r) for r in rows)


async def test_an_http2_request_gets_the_secret_only_in_the_declared_places(world):
    w = world
    w.h2_log.unlink(missing_ok=True)
    out = await asyncio.to_thread(subprocess.run, [find_proxy_python(), "-c", H2_ATTACKER, w.g.egress_path, HOST,
                                                   str(w.H2), w.ca_file, PH], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["status"] == 200, res
    assert SECRET not in out.stdout and res["headers"]["x-echo-auth"] == f"Bearer {PH}"
    rec = json.loads(w.h2_log.read_text().splitlines()[-1])
    headers = rec["headers"]
    auth = [v for k, v in headers if k == "authorization"]
    assert auth == [f"Bearer {SECRET}"], headers
    path = dict(headers)[":path"]
    assert path == f"/h2/{PH}?other={PH}&api_key={SECRET}", path
    rest = [(k, v) for k, v in headers if k not in ("authorization", ":path")]
    assert not [h for h in rest if SECRET in h[1]], rest
    assert ("x-api-key", PH) in [tuple(h) for h in rest] and any(PH in v for k, v in rest if k == "cookie")
    assert SECRET not in rec["data"] and PH in rec["data"]
    assert rec["trailers"] == [["x-trailer", PH]]


async def test_a_credential_file_that_became_unsafe_refuses_the_request(world):
    w = world
    w.raw.clear()
    raw = req("GET", "/echo", port=w.RAW).replace(HOST.encode(), b"file.test.example")
    got = await asyncio.to_thread(exchange, w.g, "file.test.example", w.RAW, raw)
    assert got.startswith(b"HTTP/1.1 200") and misplaced(w.raw.requests[-1], FILE_SECRET.encode(), b"x-file-key",
                                                        FILE_SECRET.encode()) == []
    # made group-writable after the kernel started: the proxy's own read refuses it, nothing is sent
    w.secret_file.chmod(0o620)
    try:
        w.raw.clear()
        got = await asyncio.to_thread(exchange, w.g, "file.test.example", w.RAW, raw)
        assert got.startswith(b"HTTP/1.1 403"), got[:300]
        assert b'rule="credential"' in got and b"writable by other users" in got and FILE_SECRET.encode() not in got
        assert w.raw.requests == []
        # swapped for a symlink to a file with the same mode bits: refused too (O_NOFOLLOW)
        w.secret_file.chmod(0o600)
        other = w.secret_file.with_name("other")
        other.write_text(FILE_SECRET)
        other.chmod(0o600)
        os.rename(w.secret_file, w.secret_file.with_name("moved"))
        os.symlink(other, w.secret_file)
        got = await asyncio.to_thread(exchange, w.g, "file.test.example", w.RAW, raw)
        assert got.startswith(b"HTTP/1.1 403") and b"symbolic link" in got and w.raw.requests == []
    finally:
        if w.secret_file.is_symlink():
            w.secret_file.unlink()
            os.rename(w.secret_file.with_name("moved"), w.secret_file)
        w.secret_file.chmod(0o600)
