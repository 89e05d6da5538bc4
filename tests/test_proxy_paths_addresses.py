"""Issue 15 items 2 and 4 through the real proxy service: guest-protocol client -> EgressBridge ->
proxy service (mitmproxy, own process) -> real servers that record the raw request targets they
receive (tests/raw_upstream.py), on 127.0.0.1, 127.0.0.2 and this machine's own address
(`hostname -I`).

- Path spellings: the oracle is the path the server received. No generated spelling of a denied
  path (or of the DoH path) reaches it in any form a liberal server resolves to the denied path
  (tests/path_spellings.py), and RFC 3986 spellings of an allowed path arrive as the canonical path.
- Addresses: numeric spellings of a denied IP, a name resolving into a denied CIDR, this host's
  own address by name (unnamed, or only inside a named network) and by hex spelling are refused;
  the server behind them never gets a request. A rule naming the address exactly still reaches it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from contextlib import asynccontextmanager

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from capsem_vm.policy import parse_policy

from path_spellings import denied_spelling, reads_as, rfc_spelling
from raw_upstream import RawUpstream, own_ipv4
from proxy_world import ProxyWorld, upstream_tls
from proxy_helpers import Guest, recv_exact  # noqa: F401

pytestmark = pytest.mark.asyncio(loop_scope="module")

DENIED_GLOBS = ["/admin*", "/private/*"]
DOH_GLOBS = ["/dns-query", "/dns-query/*"]
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))


@asynccontextmanager
async def build_world(tmp_path_factory):
    """This module's `world` (conftest.py)."""
    tmp = tmp_path_factory.mktemp("paths")
    w = ProxyWorld(tmp, env={})
    tls = upstream_tls(tmp, "capsem paths test upstream CA")
    w.upstream_ca = tls.ca_file
    w.own = own_ipv4()
    if w.own is None:
        w.mp.undo()
        pytest.fail("hostname -I lists no non-loopback IPv4 address of this machine")
    w.http = RawUpstream("127.0.0.1")
    w.https = RawUpstream("127.0.0.1", ssl_ctx=tls.server_context())
    w.lab = RawUpstream("127.0.0.2")
    w.own_up = RawUpstream(w.own)
    w.ups = [w.http, w.https, w.lab, w.own_up]
    for u in w.ups:
        w.on_close(u.close)
    H, S, L, O = w.http.port, w.https.port, w.lab.port, w.own_up.port
    paths_policy = f"""
[[rule]]
name = "admin"
host = "api.test.example"
paths = ["/admin*", "/private/*"]
action = "deny"
reason = "admin is off limits"

[[rule]]
name = "api"
host = "api.test.example"
port = [{H}, {S}]
addresses = ["127.0.0.1"]
action = "allow"

[[rule]]
name = "public"
host = "pub.test.example"
port = {H}
paths = ["/public/*"]
addresses = ["127.0.0.1"]
action = "allow"
"""
    addr_policy = f"""
[[rule]]
name = "no-loop-ip"
host = "127.0.0.1"
port = {H}
action = "deny"
reason = "this service is off limits by address"

[[rule]]
name = "no-lab"
host = "127.0.0.2/32"
action = "deny"
reason = "the lab network is off limits"

[[rule]]
name = "lab"
host = "lab.test.example"
port = {L}
addresses = ["127.0.0.0/8"]
action = "allow"

[[rule]]
name = "own-lan"
host = "own.test.example"
port = {O}
addresses = ["{w.own}/24"]
action = "allow"

[[rule]]
name = "own-exact"
host = "ownx.test.example"
port = {O}
addresses = ["{w.own}"]
action = "allow"

[[rule]]
name = "own-unnamed"
host = "ownu.test.example"
port = {O}
action = "allow"

[[rule]]
name = "all"
host = "*"
port = [{H}, {O}]
addresses = ["127.0.0.0/8", "{w.own}/24"]
action = "allow"
"""
    resolve = {"api.test.example": "127.0.0.1", "pub.test.example": "127.0.0.1", "lab.test.example": "127.0.0.2",
               "own.test.example": w.own, "ownx.test.example": w.own, "ownu.test.example": w.own}
    await w.start({kid: parse_policy(text, f"{kid}.toml") for kid, text in (("k-paths", paths_policy),
                                                                          ("k-addr", addr_policy))},
                  upstream_ca=w.upstream_ca, resolve=resolve, header_timeout=10.0, workers=2)
    w.g = w.guests
    yield w
    await w.close()


def raw_get(g: Guest, host: str, port: int, target: bytes, tls: bool = False) -> tuple[dict, int | None, bytes]:
    """(egress reply, HTTP status, response head) for one raw request line sent as the guest would."""
    s, reply = g.open(host, port)
    if reply.get("t") != "connected":
        s.close()
        return reply, None, b""
    try:
        if tls:
            s = g.tls(s, host)
        s.sendall(b"GET " + target + f" HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionError, socket.timeout, ssl.SSLError):
                break
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    head = data.split(b"\r\n\r\n", 1)[0]
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        status = None
    return reply, status, head


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def rows(w, **match) -> list[dict]:
    return w.rows(**match)


# --- item 2: path spellings ------------------------------------------------------------------------------

async def test_no_spelling_of_a_denied_path_reaches_the_server(world):
    w, g = world, world.g["k-paths"]

    @PROPERTY
    @given(st.data(), st.sampled_from(["/admin", "/admin/users", "/private/key", "/dns-query", "/dns-query/x"]))
    def prop(data, base):
        target = data.draw(denied_spelling(base))
        w.http.clear()
        reply, status, head = raw_get(g, "api.test.example", w.http.port, _bytes(target))
        assert reply == {"t": "connected"}
        for got in w.http.seen():
            assert not reads_as(got, DENIED_GLOBS + DOH_GLOBS), (target, got, status)
        if status == 403:
            assert any(f'rule="{r}"'.encode() in head for r in ("admin", "ambiguous-path", "doh-path")), head
    await asyncio.to_thread(prop)
    for rule in ("admin", "ambiguous-path", "doh-path"):
        assert await asyncio.to_thread(rows, w, kernel="k-paths", kind="http", rule=rule, status=403), rule


async def test_rfc_spellings_of_an_allowed_path_arrive_canonical(world):
    w, g = world, world.g["k-paths"]

    @PROPERTY
    @given(st.data(), st.sampled_from(["/public/a", "/public/x-y_z~1", "/public/a/b/"]),
           st.sampled_from(["", "?q=%61&x=/../admin"]))
    def prop(data, base, query):
        target = data.draw(rfc_spelling(base)) + query
        w.http.clear()
        reply, status, head = raw_get(g, "pub.test.example", w.http.port, _bytes(target))
        assert status == 200, (target, head)
        assert w.http.seen() == [_bytes(base + query)], (target, w.http.seen())
    await asyncio.to_thread(prop)


async def test_listed_spellings_over_tls_and_what_the_server_gets(world):
    w, g = world, world.g["k-paths"]
    S = w.https.port
    for target in ("/%61dmin", "//admin", "/ADMIN", "/admin;x", "/x/..;/admin", "/echo/%2e%2e/admin",
                   "/echo/..%2fadmin", "/%2561dmin", "/echo\\..\\admin", "/admin%00", "/\uff41dmin",
                   "/dns-query;x", "/DNS-QUERY", "//dns-query", "/x/../dns%2dquery"):
        w.https.clear()
        reply, status, head = await asyncio.to_thread(raw_get, g, "api.test.example", S, _bytes(target), True)
        assert status == 403 and not w.https.seen(), (target, status, w.https.seen())
    w.https.clear()
    reply, status, head = await asyncio.to_thread(raw_get, g, "api.test.example", S, b"/%65cho/./x/../y?a=%2e%2e", True)
    assert status == 200 and w.https.seen() == [b"/echo/y?a=%2e%2e"], w.https.seen()


# --- item 4: addresses -----------------------------------------------------------------------------------

async def test_numeric_spellings_of_a_denied_ip_are_that_ip(world):
    w, g = world, world.g["k-addr"]
    for spelled in ("127.0.0.1", "0x7f.1", "0x7F.0.0.1", "0177.0.0.1", "2130706433", "127.1", "0x7f000001",
                    "0177.0x0.1", "::ffff:127.0.0.1", "[::ffff:7f00:1]"):
        w.http.clear()
        reply, status, _ = await asyncio.to_thread(raw_get, g, spelled, w.http.port, b"/")
        assert reply["t"] == "refused" and reply["rule"] == "no-loop-ip", (spelled, reply)
        assert not w.http.seen(), spelled
    assert await asyncio.to_thread(rows, w, kernel="k-addr", kind="connect", host="127.0.0.1", rule="no-loop-ip")


async def test_a_name_resolving_into_a_denied_cidr_is_refused(world):
    w, g = world, world.g["k-addr"]
    w.lab.clear()
    reply, status, _ = await asyncio.to_thread(raw_get, g, "lab.test.example", w.lab.port, b"/")
    assert status is None and not w.lab.seen(), (reply, w.lab.seen())
    got = await asyncio.to_thread(rows, w, kernel="k-addr", kind="connect", host="lab.test.example", rule="no-lab")
    assert got and got[0]["decision"] == "deny" and "127.0.0.2" in got[0]["reason"], got


async def test_this_hosts_own_address_needs_a_rule_naming_it(world):
    w, g = world, world.g["k-addr"]
    O = w.own_up.port
    hexed = "0x" + socket.inet_aton(w.own).hex()
    for host in ("own.test.example", "ownu.test.example", w.own, hexed):
        w.own_up.clear()
        reply, status, _ = await asyncio.to_thread(raw_get, g, host, O, b"/")
        assert status is None and not w.own_up.seen(), (host, reply, w.own_up.seen())
        assert reply["t"] == "refused"
    for host in ("own.test.example", "ownu.test.example"):
        assert await asyncio.to_thread(rows, w, kernel="k-addr", kind="connect", host=host, rule="address"), host
    assert await asyncio.to_thread(rows, w, kernel="k-addr", kind="connect", host=w.own, rule="address")
    # named exactly: reached
    w.own_up.clear()
    reply, status, _ = await asyncio.to_thread(raw_get, g, "ownx.test.example", O, b"/hello")
    assert status == 200 and w.own_up.seen() == [b"/hello"]
