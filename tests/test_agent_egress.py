"""The guest agent's egress pieces on the host (no VM): egress_setup outside a VM starts the real
stub resolver, HTTP proxy and capture listener on free ports, pointed at a real EgressBridge
(Unix sockets, as vhost-user vsock delivers them) and the real proxy service. Clients are real
programs (curl, urllib, requests) using the proxy variables the agent hands to execs.

What needs the VM (nftables capture, resolv.conf, the trust store) is in test_egress_vm.py."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from egress_world import SECRET, SEEN, World

from capsem_agent import dns_stub, egress as agent_egress, egress_stream, httpproxy, procs
from capsem_vm.proxy import EgressBridge, ca_cert_pem, dns

pytestmark = pytest.mark.asyncio(loop_scope="module")
KID = "k-agent-egress"


@asynccontextmanager
async def build_world(tmp_path_factory):
    """This module's `world` (conftest.py)."""
    tmp = tmp_path_factory.mktemp("agent-egress")
    w = await World.create(tmp)
    ep = await w.service.register(KID, w.policy)
    w.bridge = EgressBridge(KID, w.policy, ep, audit=w.runtime.audit)
    e, d = str(tmp / "v.sock_5002"), str(tmp / "v.sock_5003")
    await w.bridge.start(e, d)
    mp = pytest.MonkeyPatch()
    mp.setenv(egress_stream.ENV_EGRESS, f"unix:{e}")
    mp.setenv(dns_stub.ENV_DNS, f"unix:{d}")
    mp.setenv("CAPSEM_AGENT_RUNDIR", str(tmp / "run"))
    w.agent = agent_egress.Egress()
    w.reply = await asyncio.to_thread(w.agent.setup, {
        "t": "egress_setup", "id": 1, "ca_pem": ca_cert_pem().decode(), "env": w.policy.guest_env()})
    w.env = {**procs.base_env(None, "dumb"), "PYTHONPATH": ""}
    yield w
    mp.undo()
    procs.EGRESS_ENV.clear()
    for s in w.agent.servers.values():
        for srv in (s if isinstance(s, tuple) else (s,)):
            srv.close()
    await w.bridge.close()
    await w.close()


def run(w, argv, timeout=60, **kw):
    return asyncio.to_thread(subprocess.run, argv, env=w.env, capture_output=True, text=True, timeout=timeout, **kw)


PY = sys.executable


async def test_setup_reply_and_env(world):
    w = world
    assert w.reply["proxy"].startswith("http://127.0.0.1:") and w.reply["seconds"] < 5
    env = w.env
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        assert env[k] == w.reply["proxy"]
    assert env["NO_PROXY"] == "localhost,127.0.0.1,::1"
    for k in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT", "CURL_CA_BUNDLE"):
        text = Path(env[k]).read_text()
        assert "BEGIN CERTIFICATE" in text and "PRIVATE KEY" not in text
    assert env["SVC_TOKEN"] == w.policy.guest_env()["SVC_TOKEN"] and SECRET not in json.dumps(env)


async def test_setup_refuses_private_key_and_bad_env(world):
    from capsem_agent import protocol
    key_pem = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    with pytest.raises(protocol.MessageError):
        world.agent.setup({"t": "egress_setup", "id": 2, "ca_pem": ca_cert_pem().decode() + key_pem})
    with pytest.raises(protocol.MessageError):
        world.agent.setup({"t": "egress_setup", "id": 3, "ca_pem": "not a cert"})
    with pytest.raises(protocol.MessageError):
        world.agent.setup({"t": "egress_setup", "id": 4, "ca_pem": ca_cert_pem().decode(), "env": {"A B": "x"}})


async def test_curl_https_through_connect(world):
    w = world
    out = await run(w, ["curl", "-sS", "--max-time", "30", f"https://api.test.example:{w.HTTPS}/echo?via=curl"])
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["path"] == "/echo?via=curl"


async def test_urllib_plain_http_absolute_form_keepalive_and_host_switch(world):
    w = world
    code = f"""
import http.client, json
c = http.client.HTTPConnection("127.0.0.1", {w.reply['proxy'].rsplit(':', 1)[1]}, timeout=30)
out = []
for host, path, body in [("api.test.example", "/echo/1", None), ("api.test.example", "/echo/2", b"x" * 70000),
                         ("nows.test.example", "/echo/3", None), ("api.test.example", "/echo/4", None)]:
    port = {w.HTTP}
    c.request("POST" if body else "GET", f"http://{{host}}:{{port}}{{path}}", body=body)
    r = c.getresponse()
    data = r.read()
    out.append([r.status, r.getheader("X-Capsem-Policy"), data.decode(errors="replace")[:300]])
print(json.dumps(out))
"""
    out = await run(w, [PY, "-c", code])
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res[0][0] == 200 and json.loads(res[0][2])["path"] == "/echo/1"
    assert res[1][0] == 200 and json.loads(res[1][2])["body_len"] == 70000
    # nows.test.example allows only its HTTPS port: the host refuses, the proxy answers 403
    assert res[2][0] == 403 and 'rule="default"' in res[2][1] and "blocked by egress policy" in res[2][2]
    assert res[3][0] == 200 and json.loads(res[3][2])["path"] == "/echo/4"  # a new connection


async def test_chunked_post_through_proxy(world):
    w = world
    proxy = w.reply["proxy"].rsplit(":", 1)[1]
    code = f"""
import http.client, json
c = http.client.HTTPConnection("127.0.0.1", {proxy}, timeout=30)
def gen():
    for i in range(5):
        yield b"chunk%d-" % i * 1000
c.request("POST", "http://api.test.example:{w.HTTP}/echo/chunked", body=gen(), encode_chunked=True,
          headers={{"Transfer-Encoding": "chunked"}})
r = c.getresponse(); print(r.status, r.read().decode())
c.request("GET", "http://api.test.example:{w.HTTP}/echo/after")
r = c.getresponse(); print(r.status, r.read().decode())
"""
    out = await run(w, [PY, "-c", code])
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.strip().splitlines()
    assert first.startswith("200 ") and json.loads(first[4:])["body_len"] == sum(len(b"chunk%d-" % i * 1000) for i in range(5))
    assert second.startswith("200 ") and json.loads(second[4:])["path"] == "/echo/after"


async def test_requests_https_and_credentials(world):
    w = world
    code = f"""
import os, json, requests
r = requests.get("https://secret.test.example:{w.HTTPS}/echo", headers={{"X-Api-Key": os.environ["SVC_TOKEN"]}}, timeout=30)
print(json.dumps({{"status": r.status_code, "body": r.text, "auth": r.headers.get("X-Echo-Auth")}}))
"""
    SEEN.clear()
    out = await run(w, [PY, "-c", code])
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["status"] == 200
    # the secret goes only into the declared header; X-Api-Key keeps the placeholder (issue 15: on purpose)
    assert SEEN[-1]["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert SEEN[-1]["headers"]["X-Api-Key"].startswith("capsem-placeholder")
    assert SECRET not in out.stdout


async def test_connect_denied_gives_403_with_reason(world):
    w = world
    out = await run(w, ["curl", "-sS", "-v", "--max-time", "30", "https://evil.example.org/"])
    assert out.returncode != 0
    assert "403" in out.stderr and 'X-Capsem-Policy: deny; rule="default"' in out.stderr
    out = await run(w, ["curl", "-sS", "-i", "--max-time", "30", "http://evil.example.org/x"])
    assert out.stdout.startswith("HTTP/1.1 403") and "rule: default" in out.stdout
    rows = await asyncio.to_thread(w.wait_rows, kernel=KID, kind="connect", host="evil.example.org", decision="deny")
    assert rows


async def test_proxy_rejects_garbage_and_origin_form(world):
    w = world
    port = int(w.reply["proxy"].rsplit(":", 1)[1])

    def talk(data: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(data)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out
    assert (await asyncio.to_thread(talk, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(b"HTTP/1.1 400")
    assert (await asyncio.to_thread(talk, b"\x16\x03\x01garbage\r\n\r\n")).startswith(b"HTTP/1.1 400")
    assert (await asyncio.to_thread(talk, b"GET http://a/ HTTP/1.1\r\nX: " + b"a" * 70000)).startswith(b"HTTP/1.1 431")
    assert (await asyncio.to_thread(talk, b"GET ftp://a/ HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 501")
    assert (await asyncio.to_thread(talk, b"CONNECT noport HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 400")


def udp_query(port: int, name: str, qtype=dns.TYPE_A, qid=0x4242) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(10)
        s.sendto(dns.build_query(name, qtype, qid), ("127.0.0.1", port))
        return s.recv(4096)


def tcp_query(port: int, name: str, qtype=dns.TYPE_A) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        q = dns.build_query(name, qtype)
        s.sendall(struct.pack("!H", len(q)) + q)
        (n,) = struct.unpack("!H", egress_stream.recv_exact(s, 2))
        return egress_stream.recv_exact(s, n)


async def test_dns_stub_udp_and_tcp(world):
    w = world
    udp = w.agent.servers["dns"][0].sock.getsockname()[1]
    tcp = w.agent.servers["dns"][1].listener.getsockname()[1]
    qid, rcode, ips = dns.parse_response(await asyncio.to_thread(udp_query, udp, "api.test.example"))
    assert qid == 0x4242 and rcode == dns.NOERROR and ips[0].startswith("198.18.")
    assert dns.parse_response(await asyncio.to_thread(udp_query, udp, "evil.example.org"))[1] == dns.NXDOMAIN
    assert dns.parse_response(await asyncio.to_thread(udp_query, udp, "api.test.example", dns.TYPE_AAAA))[1:] == (dns.NOERROR, [])
    _, rcode, ips2 = dns.parse_response(await asyncio.to_thread(tcp_query, tcp, "api.test.example"))
    assert rcode == dns.NOERROR and ips2 == ips
    # many at once over the one stream, answered in order
    results = await asyncio.gather(*(asyncio.to_thread(udp_query, udp, "api.test.example", dns.TYPE_A, i)
                                     for i in range(1, 41)))
    assert sorted(dns.parse_response(r)[0] for r in results) == list(range(1, 41))
    # the synthetic address maps back to the name on 5002
    sock = await asyncio.to_thread(egress_stream.open_stream, ips[0], w.HTTP)
    sock.sendall(f"GET /echo/synthetic HTTP/1.1\r\nHost: api.test.example:{w.HTTP}\r\nConnection: close\r\n\r\n".encode())
    data = await asyncio.to_thread(lambda: b"".join(iter(lambda: sock.recv(65536), b"")))
    sock.close()
    assert data.startswith(b"HTTP/1.1 200") and b"/echo/synthetic" in data


async def test_dns_stub_servfail_fast_when_host_is_gone(world, tmp_path):
    fwd = dns_stub.Forwarder(addr=f"unix:{tmp_path}/nobody")
    srv = dns_stub.UdpServer(fwd, port=0).start()
    try:
        t = time.monotonic()
        ans = await asyncio.to_thread(udp_query, srv.sock.getsockname()[1], "api.test.example")
        assert dns.parse_response(ans)[1] == dns.SERVFAIL and time.monotonic() - t < 2
    finally:
        srv.close()


async def test_dns_stub_times_out_a_silent_host(world, tmp_path):
    path = str(tmp_path / "silent.sock")
    lst = socket.socket(socket.AF_UNIX)
    lst.bind(path)
    lst.listen()
    held = []
    threading.Thread(target=lambda: held.append(lst.accept()), daemon=True).start()
    fwd = dns_stub.Forwarder(addr=f"unix:{path}", timeout=1.0)
    srv = dns_stub.UdpServer(fwd, port=0).start()
    try:
        t = time.monotonic()
        ans = await asyncio.to_thread(udp_query, srv.sock.getsockname()[1], "api.test.example")
        assert dns.parse_response(ans)[1] == dns.SERVFAIL and 0.9 < time.monotonic() - t < 4
    finally:
        srv.close()
        lst.close()


async def test_websocket_over_plain_proxy_upgrade(world):
    w = world
    port = int(w.reply["proxy"].rsplit(":", 1)[1])

    def ws():
        s = socket.create_connection(("127.0.0.1", port), timeout=20)
        s.sendall((f"GET http://api.test.example:{w.HTTP}/ws HTTP/1.1\r\nHost: api.test.example:{w.HTTP}\r\n"
                   "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                   "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(4096)
        assert head.startswith(b"HTTP/1.1 101"), head
        mask, msg = os.urandom(4), b"hi"
        s.sendall(bytes([0x81, 0x80 | len(msg)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(msg)))
        b0, b1 = egress_stream.recv_exact(s, 2)
        payload = egress_stream.recv_exact(s, b1 & 0x7F)
        s.close()
        return payload
    assert await asyncio.to_thread(ws) == b"echo:hi"


async def test_measure_latency_through_agent_proxy_vs_direct(world):
    """Numbers for the record (no VM): the agent's proxy + bridge + proxy service vs direct."""
    w = world
    code = f"""
import json, time, requests
def timed(f, n):
    ts = []
    for _ in range(n):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    ts.sort()
    return [round(ts[len(ts) // 2] * 1000, 2), round(ts[int(len(ts) * 0.9)] * 1000, 2)]
via = "https://api.test.example:{w.HTTPS}/echo"
direct = "https://127.0.0.1:{w.HTTPS}/echo"
s = requests.Session(); s.get(via, timeout=30)
d = requests.Session(); d.trust_env = False; d.get(direct, timeout=30, verify="{w.upstream_ca}")
out = {{"via_keepalive": timed(lambda: s.get(via, timeout=30), 100),
       "via_fresh": timed(lambda: requests.get(via, timeout=30), 30),
       "direct_keepalive": timed(lambda: d.get(direct, timeout=30, verify="{w.upstream_ca}"), 100),
       "direct_fresh": timed(lambda: requests.get(direct, timeout=30, verify="{w.upstream_ca}",
                                                  proxies={{"https": None, "http": None}}), 30)}}
t = time.perf_counter(); r = s.get("https://api.test.example:{w.HTTPS}/big?n={64 << 20}", timeout=120)
out["via_mb_s"] = round(len(r.content) / (time.perf_counter() - t) / 1e6, 1)
t = time.perf_counter(); r = d.get("https://127.0.0.1:{w.HTTPS}/big?n={64 << 20}", timeout=120, verify="{w.upstream_ca}")
out["direct_mb_s"] = round(len(r.content) / (time.perf_counter() - t) / 1e6, 1)
print(json.dumps(out))
"""
    out = await run(w, [PY, "-c", code], timeout=600)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    print(f"\nhost, HTTPS GET p50/p90 ms: through agent proxy keep-alive {res['via_keepalive']}, new connection "
          f"{res['via_fresh']}; direct keep-alive {res['direct_keepalive']}, new connection {res['direct_fresh']}; "
          f"64 MiB: {res['via_mb_s']} MB/s through, {res['direct_mb_s']} MB/s direct")


def _deaf_host(path: str, answer: bytes, seen: list):
    """A host end like the one behind vhost-device-vsock: accepts a 5002 stream, answers, and never
    learns of the guest's half-close (it keeps the stream open until the guest really closes)."""
    lst = socket.socket(socket.AF_UNIX)
    lst.bind(path)
    lst.listen()

    def serve():
        conn, _ = lst.accept()
        (n,) = struct.unpack(">I", egress_stream.recv_exact(conn, 4))
        egress_stream.recv_exact(conn, n)
        body = json.dumps({"t": "connected"}).encode()
        conn.sendall(struct.pack(">I", len(body)) + body)
        t0 = time.monotonic()
        got = b""
        while chunk := conn.recv(65536):  # EOF here only when the guest closes for real
            got += chunk
            if got.endswith(b"\r\n\r\n"):
                conn.sendall(answer)
        seen.append((got, time.monotonic() - t0))
        conn.close()
        lst.close()
    threading.Thread(target=serve, daemon=True).start()


async def test_client_eof_ends_the_host_stream_after_a_quiet_linger(world, tmp_path, monkeypatch):
    """vhost-device-vsock drops half-closes: without the linger the host would hold every stream a
    client has finished with until the proxy's own timeouts (seen as header-timeout rows)."""
    path = str(tmp_path / "deaf.sock")
    seen: list = []
    _deaf_host(path, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", seen)
    monkeypatch.setenv(egress_stream.ENV_EGRESS, f"unix:{path}")
    monkeypatch.setattr(egress_stream, "LINGER", 1.0)
    srv = httpproxy.start(port=0)
    try:
        def client():
            with socket.create_connection(srv.listener.getsockname(), timeout=10) as s:
                s.sendall(b"GET http://api.test.example/x HTTP/1.1\r\nHost: api.test.example\r\n\r\n")
                return s.recv(100)
        assert (await asyncio.to_thread(client)).endswith(b"ok")
        await asyncio.to_thread(wait_for_list, seen, 10)
        assert seen and seen[0][0].startswith(b"GET /x HTTP/1.1") and seen[0][1] < 5, seen
    finally:
        srv.close()


def wait_for_list(lst, timeout):
    deadline = time.monotonic() + timeout
    while not lst and time.monotonic() < deadline:
        time.sleep(0.05)


async def test_ca_trusted_at_prepare_is_not_written_again_at_setup(tmp_path, monkeypatch):
    """A pooled VM trusts the user's CA in egress_prepare (before the claim); egress_setup with the
    same CA leaves the bundle alone, and a different CA replaces it."""
    from capsem_vm.proxy.ca import _generate
    monkeypatch.setenv("CAPSEM_AGENT_RUNDIR", str(tmp_path / "run"))
    agent = agent_egress.Egress()
    saved_env = dict(procs.EGRESS_ENV)
    try:
        ca = ca_cert_pem().decode()
        prep = await asyncio.to_thread(agent.prepare, ca)
        assert "trust" in prep["steps"]
        bundle = tmp_path / "run" / "egress" / "ca-bundle.crt"
        assert bundle.read_text().count(ca.strip()) == 1
        before = bundle.stat()
        reply = await asyncio.to_thread(agent.setup, {"t": "egress_setup", "id": 1, "ca_pem": ca})
        after = bundle.stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
        assert procs.EGRESS_ENV["SSL_CERT_FILE"] == str(bundle) and reply["proxy"].startswith("http://127.0.0.1:")
        other = _generate("another capsem CA")[1].decode()
        await asyncio.to_thread(agent.setup, {"t": "egress_setup", "id": 2, "ca_pem": other})
        text = bundle.read_text()
        assert other.strip() in text and ca.strip() not in text
    finally:
        procs.EGRESS_ENV.clear()
        procs.EGRESS_ENV.update(saved_env)
        for s in agent.servers.values():
            for srv in (s if isinstance(s, tuple) else (s,)):
                srv.close()
