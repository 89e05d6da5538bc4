"""End to end on the host: guest-protocol client -> EgressBridge (Unix sockets, as vhost-user vsock
delivers them) -> proxy service process (mitmproxy, own venv) -> real servers on 127.0.0.1.

Everything is real: the service process, TLS with our own CA on both sides, HTTP/1.1, HTTP/2,
WebSocket, the SQLite audit log. Needs the proxy venv (`make proxy-venv`); without it the tests
fail (never skip)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sqlite3
import ssl
import subprocess
import time
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import tornado.httpserver
import tornado.netutil
import tornado.web
import tornado.websocket

from capsem_vm.policy import parse_policy
from capsem_vm.proxy import ca_cert_pem, read_events
from capsem_vm.proxy import dns
from capsem_vm.proxy.service import find_proxy_python

from proxy_helpers import H2_CLIENT, H2_SERVER, make_ca, make_leaf, wait_for, write_pem
from proxy_world import ProxyWorld

pytestmark = pytest.mark.asyncio(loop_scope="module")

SECRET = "s3cr3t-" + os.urandom(8).hex()
HEADER_TIMEOUT = 3.0


# --- upstream servers -----------------------------------------------------------------------------

SEEN: list[dict] = []


class Echo(tornado.web.RequestHandler):
    SUPPORTED_METHODS = ("GET", "POST", "PUT", "DELETE", "HEAD")

    def _do(self):
        info = {"method": self.request.method, "path": self.request.uri,
                "headers": dict(self.request.headers), "body_len": len(self.request.body)}
        SEEN.append(info)
        self.set_header("Content-Type", "application/json")
        self.set_header("X-Echo-Auth", self.request.headers.get("Authorization", ""))
        self.write(json.dumps(info))

    get = post = put = delete = _do


class Big(tornado.web.RequestHandler):
    async def get(self):
        n = int(self.get_argument("n"))
        self.set_header("Content-Length", str(n))
        chunk = b"x" * 262144
        while n > 0:
            part = chunk[:n]
            self.write(part)
            await self.flush()
            n -= len(part)


class WsEcho(tornado.websocket.WebSocketHandler):
    def on_message(self, message):
        self.write_message("echo:" + message)


def app():
    return tornado.web.Application([(r"/big", Big), (r"/ws.*", WsEcho), (r"/.*", Echo)])


def start_server(ssl_ctx=None):
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    server = tornado.httpserver.HTTPServer(app(), ssl_options=ssl_ctx, max_header_size=1 << 20)
    server.add_sockets(sockets)
    return server, sockets[0].getsockname()[1]


# --- the world ------------------------------------------------------------------------------------

@asynccontextmanager
async def build_world(tmp_path_factory):
    """This module's `world` (conftest.py)."""
    tmp = tmp_path_factory.mktemp("proxy")
    w = ProxyWorld(tmp, env={"CAPSEM_TEST_SECRET": SECRET})

    ca_key, ca_cert = make_ca("capsem test upstream CA")
    w.upstream_ca = write_pem(tmp / "upstream-ca.pem", cert=ca_cert)
    leaf_key, leaf = make_leaf(ca_key, ca_cert, ["*.test.example", "test.example"], ["127.0.0.1"])
    cert_file, key_file = write_pem(tmp / "leaf.pem", cert=leaf), write_pem(tmp / "leaf.key", key=leaf_key)
    sctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    sctx.load_cert_chain(cert_file, key_file)
    # an HTTPS server whose certificate nobody trusts
    bad_key, bad_ca = make_ca("untrusted CA")
    bleaf_key, bleaf = make_leaf(bad_key, bad_ca, ["untrusted.test.example"], ["127.0.0.1"])
    bctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    bctx.load_cert_chain(write_pem(tmp / "b.pem", cert=bleaf), write_pem(tmp / "b.key", key=bleaf_key))

    w.http_srv, w.HTTP = start_server()
    w.https_srv, w.HTTPS = start_server(sctx)
    w.bad_srv, w.BAD = start_server(bctx)
    proxy_py = find_proxy_python()
    w.h2 = subprocess.Popen([proxy_py, "-c", H2_SERVER, cert_file, key_file], stdout=subprocess.PIPE, text=True)
    w.on_close(lambda: (w.h2.kill(), w.h2.wait()))
    for srv in (w.http_srv, w.https_srv, w.bad_srv):
        w.on_close(srv.stop)
    w.H2 = int(await asyncio.to_thread(w.h2.stdout.readline))

    w.policy_text = f"""
[[rule]]
name = "admin"
host = "api.test.example"
paths = ["/admin*"]
action = "deny"
reason = "admin is off limits"

[[rule]]
name = "api"
host = "api.test.example"
port = [{w.HTTP}, {w.HTTPS}]
methods = ["GET", "POST"]
paths = ["/echo*", "/big*", "/ws*", "/dns-query*"]
addresses = ["127.0.0.1"]
action = "allow"
reason = "the test API"

[[rule]]
name = "no-websockets"
host = "nows.test.example"
scheme = ["ws", "wss"]
action = "deny"
reason = "no websockets here"

[[rule]]
name = "nows"
host = "nows.test.example"
port = {w.HTTPS}
addresses = ["127.0.0.1"]
action = "allow"

[[rule]]
name = "secret-api"
host = "secret.test.example"
port = [{w.HTTPS}, {w.HTTP}]
addresses = ["127.0.0.1"]
action = "allow"

[[rule]]
name = "jupyter"
host = "jupyter.test.example"
port = {w.HTTP}
action = "allow"
reason = "allowed by name, but it resolves to loopback"

[[rule]]
name = "metadata"
host = "metadata.test.example"
port = 80
action = "allow"

[[rule]]
name = "loop-ip"
host = "127.0.0.1"
port = {w.HTTP}
action = "allow"
reason = "this loopback address is named explicitly"

[[rule]]
name = "untrusted"
host = "untrusted.test.example"
port = {w.BAD}
addresses = ["127.0.0.1"]
action = "allow"

[[rule]]
name = "h2"
host = "h2.test.example"
port = {w.H2}
paths = ["/h2/*"]
addresses = ["127.0.0.1"]
action = "allow"

[[credential]]
name = "svc"
hosts = ["secret.test.example"]
env = "CAPSEM_TEST_SECRET"
header = "Authorization"
format = "Bearer {{value}}"
query = "key"
guest_env = "SVC_TOKEN"
"""
    w.policy = parse_policy(w.policy_text, "test-policy.toml")
    w.open_policy = parse_policy(f'[[rule]]\nname = "all"\nhost = "*"\nport = [80, {w.HTTP}]\naction = "allow"\n',
                                 "open.toml")
    resolve = {n: "127.0.0.1" for n in ("api.test.example", "nows.test.example", "secret.test.example",
                                         "jupyter.test.example", "untrusted.test.example", "h2.test.example")}
    resolve["metadata.test.example"] = "169.254.169.254"
    await w.start({"k-test": w.policy, "k-open": w.open_policy}, upstream_ca=w.upstream_ca, resolve=resolve,
                  header_timeout=HEADER_TIMEOUT, workers=2)
    w.g = w.guests["k-test"]
    yield w
    await w.close()


def run(fn, *a, **kw):
    return asyncio.to_thread(fn, *a, **kw)


def rows(w, **match):
    w.audit.flush()

    def find():
        return [r for r in read_events(w.audit_db) if all(
            (v(r[k]) if callable(v) else r[k] == v) for k, v in match.items())]
    return wait_for(find, 10)


async def arows(w, **match):
    return await run(rows, w, **match)


# --- allowed ---------------------------------------------------------------------------------------

async def test_allowed_http_get_and_post(world):
    w = world
    r = await run(w.g.http, "GET", "api.test.example", w.HTTP, "/echo?q=1")
    assert r.reply == {"t": "connected"} and r.status == 200
    assert json.loads(r.body)["method"] == "GET"
    r = await run(w.g.http, "POST", "api.test.example", w.HTTP, "/echo", body=b"x" * 5000)
    assert r.status == 200 and json.loads(r.body)["body_len"] == 5000
    got = await arows(w, kind="http", method="POST", rule="api", kernel="k-test",
                      url=f"http://api.test.example:{w.HTTP}/echo")
    assert got and got[0]["status"] == 200 and got[0]["bytes_out"] == 5000 and got[0]["decision"] == "allow"
    assert got[0]["bytes_in"] > 0 and got[0]["duration_ms"] >= 0
    assert await arows(w, kind="connect", decision="allow", rule="api", host="api.test.example")


async def test_allowed_https_via_dns_synthetic_address(world):
    w = world
    rcode, ips = await run(w.g.dns, "api.test.example")
    assert rcode == dns.NOERROR and ips[0].startswith("198.18.")
    assert await run(w.g.dns, "api.test.example", dns.TYPE_AAAA) == (dns.NOERROR, [])
    # the guest connects to the synthetic address; TLS SNI and Host carry the name
    r = await run(w.g.http, "GET", "api.test.example", w.HTTPS, "/echo/tls", tls=True, connect_host=ips[0])
    assert r.status == 200, r
    assert json.loads(r.body)["path"] == "/echo/tls"
    assert await arows(w, kind="dns", url="api.test.example", decision="allow", kernel="k-test")
    assert await arows(w, kind="http", url=f"https://api.test.example:{w.HTTPS}/echo/tls", status=200)


async def test_dns_denied_name_is_nxdomain(world):
    w = world
    assert (await run(w.g.dns, "evil.example.org"))[0] == dns.NXDOMAIN
    assert (await run(w.g.dns, "dns.google"))[0] == dns.NXDOMAIN
    assert await arows(w, kind="dns", url="evil.example.org", decision="deny", status=dns.NXDOMAIN)


async def test_explicitly_named_loopback_ip_is_allowed(world):
    r = await run(world.g.http, "GET", "127.0.0.1", world.HTTP, "/echo")
    assert r.status == 200


async def test_websocket_allowed(world):
    w = world
    assert await run(w.g.websocket, "api.test.example", w.HTTPS, "/ws") == "echo:hello"
    assert await arows(w, kind="websocket", rule="api", status=101,
                       url=f"wss://api.test.example:{w.HTTPS}/ws", bytes_out=5, bytes_in=10)


async def test_http2_streams_each_judged(world):
    w = world
    out = await asyncio.to_thread(subprocess.run, [find_proxy_python(), "-c", H2_CLIENT, w.g.egress_path,
                                                   "h2.test.example", str(w.H2), w.ca_file, "/h2/one", "/admin"],
                                  capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["alpn"] == "h2"
    one, admin = res["streams"]
    assert one["status"] == 200 and one["body"] == "h2 ok /h2/one"
    assert admin["status"] == 403 and 'rule="default"' in admin["policy"]
    assert await arows(w, kind="http", url=f"https://h2.test.example:{w.H2}/admin", status=403)


async def test_credentials_injected_never_seen_by_guest(world):
    w = world
    SEEN.clear()
    placeholder = w.policy.guest_env()["SVC_TOKEN"]
    r = await run(w.g.http, "GET", "secret.test.example", w.HTTPS, f"/echo?key={placeholder}", tls=True,
                  headers={"X-Api-Key": placeholder})
    assert r.status == 200
    # the server got the real secret in the declared header and query parameter only; the placeholder
    # in another header goes out as is (before issue 15 it was replaced there too: changed on purpose)
    seen = SEEN[-1]
    assert seen["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert seen["headers"]["X-Api-Key"] == placeholder and seen["path"] == f"/echo?key={SECRET}"
    # the guest sees only placeholders, even though the server echoed the secret back
    assert SECRET.encode() not in r.body and SECRET not in json.dumps(r.headers)
    assert placeholder in r.headers["x-echo-auth"] and b"capsem-placeholder" in r.body
    # plaintext HTTP to the same host: never injected
    SEEN.clear()
    r = await run(w.g.http, "GET", "secret.test.example", w.HTTP, "/echo", headers={"X-Api-Key": placeholder})
    assert r.status == 200 and "Authorization" not in SEEN[-1]["headers"]
    assert SEEN[-1]["headers"]["X-Api-Key"] == placeholder
    row = await arows(w, kind="http", rule="secret-api", reason=lambda v: "credential injected" in (v or ""))
    assert row
    # the secret is nowhere in the audit DB
    con = sqlite3.connect(w.audit_db)
    dump = "\n".join(con.iterdump())
    con.close()
    assert SECRET not in dump


# --- denied ----------------------------------------------------------------------------------------

async def test_denied_host_is_refused_and_audited(world):
    w = world
    r = await run(w.g.http, "GET", "evil.example.org", 443, "/", tls=True)
    assert r.reply["t"] == "refused" and r.reply["rule"] == "default"
    assert await arows(w, kind="connect", url="evil.example.org:443", decision="deny", rule="default")


async def test_denied_method_and_path_get_403_with_header(world):
    w = world
    r = await run(w.g.http, "DELETE", "api.test.example", w.HTTPS, "/echo", tls=True)
    assert r.status == 403 and 'rule="default"' in r.policy
    r = await run(w.g.http, "GET", "api.test.example", w.HTTPS, "/admin/users", tls=True)
    assert r.status == 403
    assert r.policy == 'deny; rule="admin"; reason="admin is off limits"'
    assert b"admin is off limits" in r.body and b"rule: admin" in r.body
    assert await arows(w, kind="http", method="DELETE", status=403, decision="deny", rule="default")
    assert await arows(w, kind="http", rule="admin", status=403)


async def test_denied_large_upload_is_reset_not_buffered(world):
    w = world
    SEEN.clear()

    def upload():
        s, reply = w.g.open("api.test.example", w.HTTP)
        assert reply["t"] == "connected"
        start = time.monotonic()
        s.sendall(f"PUT /echo HTTP/1.1\r\nHost: api.test.example:{w.HTTP}\r\nContent-Length: {64 << 20}\r\n\r\n".encode())
        got = b""
        try:
            for _ in range(64 * 16):
                s.sendall(b"x" * 65536)
        except OSError:
            pass
        s.settimeout(10)
        try:
            while chunk := s.recv(65536):
                got += chunk
        except OSError:
            pass
        return got, time.monotonic() - start
    got, took = await run(upload)
    assert not got.startswith(b"HTTP/1.1 200")
    assert took < 15
    assert not any(x["method"] == "PUT" for x in SEEN)  # never reached the server
    assert await arows(w, kind="http", method="PUT", decision="deny", reason=lambda v: "reset" in (v or ""))


async def test_denied_port(world):
    r = await run(world.g.http, "GET", "api.test.example", 8443, "/echo")
    assert r.reply["t"] == "refused" and r.reply["rule"] == "default"


async def test_ip_literals_denied(world):
    g = world.g
    for host in ("93.184.216.34", "::1", "[::1]", "2606:4700::1"):
        s, reply = await run(g.open, host, 80)
        s.close()
        assert reply["t"] == "refused", host
    s, reply = await run(world.guests["k-open"].open, "198.18.200.200", 80)  # never handed out
    s.close()
    assert reply["t"] == "refused" and "synthetic" in reply["reason"]


async def test_host_loopback_service_not_named_is_refused(world):
    w = world
    # allowed by name, but resolves to 127.0.0.1 and the rule does not name that address
    r = await run(w.g.http, "GET", "jupyter.test.example", w.HTTP, "/api")
    assert r.reply["t"] == "refused"
    assert await arows(w, kind="connect", host="jupyter.test.example", rule="address", decision="deny")
    # a catch-all allow still never reaches loopback or link-local
    og = w.guests["k-open"]
    for host in ("127.0.0.1", "169.254.169.254", "localhost"):
        r = await run(og.http, "GET", host, w.HTTP if host != "169.254.169.254" else 80, "/")
        assert r.reply["t"] == "refused", host
    assert await arows(w, kernel="k-open", kind="connect", host="169.254.169.254", rule="address")
    assert await arows(w, kernel="k-open", kind="connect", host="localhost", rule="address")


async def test_metadata_by_name_is_refused(world):
    r = await run(world.g.http, "GET", "metadata.test.example", 80, "/latest/meta-data/")
    assert r.reply["t"] == "refused"
    assert await arows(world, kind="connect", host="metadata.test.example", rule="address")


async def test_sni_host_mismatch(world):
    w = world
    # TLS SNI names another host than the destination
    r = await run(w.g.http, "GET", "api.test.example", w.HTTPS, "/echo", tls=True, sni="other.test.example",
                  headers={"Host": f"api.test.example:{w.HTTPS}"})
    assert r.status == 403 and 'rule="sni-mismatch"' in r.policy
    # Host header names another host than the destination (plain HTTP)
    r = await run(w.g.http, "GET", "api.test.example", w.HTTP, "/echo", headers={"Host": "evil.example.org"})
    assert r.status == 403 and 'rule="host-mismatch"' in r.policy
    assert await arows(w, kind="http", rule="sni-mismatch")
    assert await arows(w, kind="http", rule="host-mismatch")


async def test_doh_denied(world):
    w = world
    r = await run(w.g.http, "GET", "dns.google", 443, "/dns-query?dns=AAAB", tls=True)
    assert r.reply["t"] == "refused" and r.reply["rule"] == "doh"
    # the DoH path on an otherwise allowed host
    r = await run(w.g.http, "POST", "api.test.example", w.HTTPS, "/dns-query", tls=True, body=b"\x00" * 30,
                  headers={"Content-Type": "application/dns-message"})
    assert r.status == 403 and 'rule="doh-path"' in r.policy


async def test_websocket_denied(world):
    w = world
    r = await run(w.g.websocket, "nows.test.example", w.HTTPS, "/ws")
    assert r.status == 403 and 'rule="no-websockets"' in r.policy
    r = await run(w.g.websocket, "denied.example.org", 443, "/ws")
    assert r.reply["t"] == "refused"
    assert await arows(w, kind="websocket", rule="no-websockets", status=403)


async def test_upstream_certificate_is_verified(world):
    w = world
    try:
        r = await run(w.g.http, "GET", "untrusted.test.example", w.BAD, "/echo", tls=True)
    except (ssl.SSLError, ConnectionError, OSError):
        r = None
    assert r is None or r.status in (502, 503)
    assert await arows(w, host="untrusted.test.example", decision=lambda v: v in ("error", "deny")) or \
        await arows(w, kind="connect", host="untrusted.test.example")


async def test_oversized_headers_rejected(world):
    w = world
    r = await run(w.g.http, "GET", "api.test.example", w.HTTP, "/echo", headers={"X-Big": "a" * 200_000})
    assert r.status == 431


async def test_slow_loris_is_closed(world):
    w = world

    def slow():
        s, reply = w.g.open("api.test.example", w.HTTP)
        assert reply["t"] == "connected"
        start = time.monotonic()
        s.sendall(b"GET /echo HTTP/1.1\r\nHost: api.test.example\r\n")
        try:
            for _ in range(40):
                time.sleep(0.5)
                s.sendall(b"X-Slow: 1\r\n")
                s.settimeout(0.01)
                try:
                    if s.recv(1) == b"":
                        break
                except socket.timeout:
                    pass
                s.settimeout(20)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return time.monotonic() - start
    took = await run(slow)
    assert HEADER_TIMEOUT - 0.5 < took < HEADER_TIMEOUT + 6
    assert await arows(w, kind="connect", rule="header-timeout", host="api.test.example")


async def test_large_download_streams_without_memory_growth(world):
    w = world
    pids = w.service.pids
    assert len(pids) == 2  # every worker serves every kernel

    def rss():
        total = 0
        for pid in pids:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        return total

    def download(n):
        r = w.g.http("GET", "api.test.example", w.HTTPS, f"/big?n={n}", tls=True, read_body=False, timeout=120)
        total = 0
        while chunk := r.body.read(1 << 20):
            total += len(chunk)
        r.conn.close()
        return r.status, total
    await run(download, 8 << 20)  # warm up
    before = rss()
    n = 256 << 20
    status, total = await run(download, n)
    after = rss()
    assert status == 200 and total == n
    assert after - before < 48 << 20, f"proxy RSS grew by {(after - before) >> 20} MiB for a {n >> 20} MiB body"
    assert await arows(w, kind="http", url=f"https://api.test.example:{w.HTTPS}/big?n={n}", bytes_in=n)


# --- the listener is not an open proxy -----------------------------------------------------------

def socks_try(host, port, greeting: bytes) -> bytes:
    s = socket.create_connection((host, port), timeout=5)
    try:
        s.sendall(greeting)
        out = b""
        while True:
            try:
                chunk = s.recv(100)
            except (socket.timeout, ConnectionError):
                break
            if not chunk:
                break
            out += chunk
        return out
    finally:
        s.close()


async def test_proxy_listener_requires_kernel_credentials(world):
    host, port = world.service.socks
    connect = b"\x05\x01\x00\x03\x10api.test.example" + world.HTTP.to_bytes(2, "big")
    # no authentication offered
    assert (await run(socks_try, host, port, b"\x05\x01\x00" + connect)).startswith(b"\x05\xff")
    # right user, wrong password; and another kernel's user with a guessed password
    for user, pw in ((b"k-test", b"guess"), (b"k-open", b"x" * 43), (b"nobody", b"x")):
        out = await run(socks_try, host, port, b"\x05\x01\x02\x01" + bytes([len(user)]) + user + bytes([len(pw)]) + pw + connect)
        assert out.startswith(b"\x05\x02\x01\x01"), out
    # plain HTTP proxy requests are not understood either
    out = await run(socks_try, host, port, b"GET http://api.test.example/ HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"200" not in out


async def test_ca_key_is_private(world):
    from capsem_vm.proxy.ca import ensure_ca
    ca = ensure_ca()
    assert oct(ca.key_and_cert.stat().st_mode & 0o777) == "0o600"
    assert oct(ca.confdir.stat().st_mode & 0o777) == "0o700"
    pem = ca_cert_pem()
    assert b"PRIVATE KEY" not in pem and pem.startswith(b"-----BEGIN CERTIFICATE-----")


async def test_audit_cli_reads_rows(world, capsys):
    from capsem_vm.proxy.cli import main as proxy_main
    # a row of k-open's own (the test does not depend on the others having run), then wait for it
    for n in range(201, 207):  # six rows, so --limit 5 has more than it shows
        s, reply = await run(world.guests["k-open"].open, f"198.18.200.{n}", 80)  # never handed out: refused
        s.close()
        assert reply["t"] == "refused"
    assert await arows(world, kernel="k-open", host="198.18.200.206")
    assert proxy_main(["audit", "--db", str(world.audit_db), "--kernel", "k-open", "--json"]) == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert lines and all(l["kernel"] == "k-open" for l in lines)
    assert proxy_main(["audit", "--db", str(world.audit_db), "--limit", "5"]) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 5


@pytest.mark.slow  # a silent client is dropped only after the bridge's 10 s first-frame timeout
async def test_malformed_egress_frames_are_refused(world):
    import struct as _struct
    path = world.g.egress_path

    def send_raw(data: bytes, wait: float = 5.0) -> bytes:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(wait + 10)
        s.connect(path)
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(4096):
                out += chunk
        except OSError:
            pass
        s.close()
        return out

    # an oversized first frame: refused from its header alone (the body is never read)
    out = await run(send_raw, _struct.pack(">I", 1 << 20) + b"x" * 100)
    assert b'"refused"' in out and b'"protocol"' in out
    # not JSON / wrong type / bad fields: a refused frame
    for body in (b"not json", json.dumps({"t": "hello"}).encode(),
                 json.dumps({"t": "connect", "host": "api.test.example", "port": 0}).encode(),
                 json.dumps({"t": "connect", "host": "a" * 300, "port": 80}).encode(),
                 json.dumps({"t": "connect", "host": "exa mple", "port": 80}).encode()):
        out = await run(send_raw, _struct.pack(">I", len(body)) + body)
        assert b'"refused"' in out, (body, out)
    # a silent client is dropped after the first-frame timeout (10 s)
    t = time.monotonic()
    assert await run(send_raw, b"", 15) == b""
    assert 8 < time.monotonic() - t < 20
