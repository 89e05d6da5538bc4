"""Every name a request carries must agree with the destination that was judged (issue 15, items 1
and 5), checked end to end on the host: guest-protocol client -> EgressBridge -> the real proxy
service -> a real "edge" server that records the raw request line and headers it received.

The edge (proxy_helpers.EDGE_SERVER) stands in for a CDN that serves several names on one
address and routes by the absolute-form authority, :authority or Host, which is what makes domain
fronting work. `allowed.test.example` carries a credential; `also.test.example` is allowed without
one; `other.test.example` is not allowed at all. Every attack is sent on a connection judged as
allowed.test.example, and the checks are what the edge actually received: either nothing (the
request was refused, 403 "host-mismatch", audited), or origin form with the judged Host. Never a
request the edge would route to another name, and never the credential there.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from contextlib import asynccontextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capsem_vm.policy import parse_policy
from capsem_vm.proxy.service import find_proxy_python

from proxy_world import ProxyWorld, upstream_tls
from proxy_helpers import H2_RAW_CLIENT, Edge, header_values, read_http_response, routed_name, wait_for

pytestmark = pytest.mark.asyncio(loop_scope="module")

SECRET = "fronted-" + os.urandom(8).hex()
A = "allowed.test.example"
OTHER = "other.test.example"
ALSO = "also.test.example"
IDN, IDN_U = "xn--bcher-kva.test.example", "bücher.test.example"
NAMES = (A, OTHER, ALSO, IDN, "nows.test.example", "ws.test.example")


@asynccontextmanager
async def build_world(tmp_path_factory):
    """This module's `world` (conftest.py)."""
    tmp = tmp_path_factory.mktemp("names")
    w = ProxyWorld(tmp, env={"CAPSEM_NAMES_SECRET": SECRET})
    tls = upstream_tls(tmp, "capsem names test upstream CA")
    w.edge = await asyncio.to_thread(Edge, find_proxy_python(), tls.cert_file, tls.key_file)
    w.on_close(w.edge.close)
    w.T, w.T1, w.P = w.edge.TLS, w.edge.TLS1, w.edge.PLAIN
    ports = f"[{w.T}, {w.T1}, {w.P}]"
    def allow(name: str, host: str) -> str:
        return f'[[rule]]\nname = "{name}"\nhost = "{host}"\nport = {ports}\naddresses = ["127.0.0.1"]\naction = "allow"\n\n'
    # nows.test.example: https yes, wss no; ws.test.example: both
    w.policy = parse_policy(allow("front", A) + allow("also", ALSO) + allow("idn", IDN) + """
[[rule]]
name = "no-websockets"
host = "nows.test.example"
scheme = ["ws", "wss"]
action = "deny"
reason = "no websockets here"

""" + allow("nows", "nows.test.example") + allow("ws", "ws.test.example") + f"""
[[credential]]
name = "front"
hosts = ["{A}", "{IDN}"]
env = "CAPSEM_NAMES_SECRET"
header = "Authorization"
format = "Bearer {{value}}"
""", "names-policy.toml")
    await w.start({"k-names": w.policy}, upstream_ca=tls.ca_file, resolve={n: "127.0.0.1" for n in NAMES},
                  header_timeout=10.0, workers=1)
    w.bridge, w.g = w.bridges["k-names"], w.guests["k-names"]
    yield w
    await w.close()


def run(fn, *a, **kw):
    return asyncio.to_thread(fn, *a, **kw)


_tags = iter(range(1, 1 << 30))


def tag() -> str:
    return f"t{next(_tags)}x{os.getpid()}"


def h1(w, raw: bytes, *, host: str = A, port: int | None = None, tls: bool = True, sni: str | None = None):
    """Send raw HTTP/1 bytes on an egress stream judged as host:port; (status, headers, body)."""
    s, reply = w.g.open(host, port or (w.T if tls else w.P))
    assert reply == {"t": "connected"}, reply
    if tls:
        s = w.g.tls(s, sni or host)
    try:
        s.sendall(raw)
        return read_http_response(s)
    finally:
        s.close()


def h2(w, requests: list[dict], host: str = A, port: int | None = None) -> list[dict]:
    out = subprocess.run([find_proxy_python(), "-c", H2_RAW_CLIENT, w.g.egress_path, host, str(port or w.T),
                          w.ca_file], input=json.dumps(requests), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def seen(w, t: str) -> list[dict]:
    """What the edge received for the request tagged `t` (its tag is in the path)."""
    return [r for r in w.edge.requests() if t in (r.get("line") or json.dumps(r["headers"]))]


def rows(w, **match):
    return w.rows(**match)


def code_of(row: dict) -> str:
    """The row's stable reason code (the `code` column where the audit log has one; a built-in
    refusal's rule is its code)."""
    return row.get("code") or row["rule"]


def assert_fronting_impossible(w) -> None:
    """The invariant over everything the edge ever received: routed to a judged name only, never
    in absolute form, and the credential only ever with allowed.test.example (or its IDN twin)."""
    for rec in w.edge.requests():
        name = routed_name(rec)
        assert name not in (OTHER, ALSO) or not header_values(rec, "authorization"), rec
        assert name != OTHER, rec
        if rec["proto"] == "http/1.1":
            assert rec["line"].split(" ")[1].startswith("/"), rec
        else:
            assert dict(rec["headers"]).get(":path", "/").startswith("/"), rec


def canonical_ok(w, t: str, host: str = A, port: int | None = None, credential: bool = True,
                 method: str = "GET") -> None:
    """The edge received the tagged request exactly once: origin form, the judged Host."""
    port = port or w.T
    got = wait_for(lambda: seen(w, t), 10)
    assert len(got) == 1, got
    rec = got[0]
    assert rec["line"] == f"{method} /x/{t} HTTP/1.1", rec
    assert header_values(rec, "host") == [f"{host}:{port}"], rec
    assert header_values(rec, "authorization") == ([f"Bearer {SECRET}"] if credential else []), rec


# --- HTTP/1: absolute form, Host, CONNECT ------------------------------------------------------------

async def test_absolute_form_and_host_naming_anything_else_are_refused(world):
    w = world
    T, P = w.T, w.P
    ok_host = f"Host: {A}:{T}\r\n"
    cases = {
        "absolute other": ("https://{OTHER}:{T}", ok_host),
        "absolute other no port": ("https://{OTHER}", ok_host),
        "absolute allowed-but-other host": ("https://{ALSO}:{T}", ok_host),
        "absolute same host other port": ("https://{A}:{P}", ok_host),
        "absolute same host default port": ("https://{A}", ok_host),
        "absolute http scheme other port": ("http://{A}", ok_host),
        "absolute other trailing dot": ("https://{OTHER}.:{T}", ok_host),
        "absolute other uppercase": ("https://OTHER.TEST.EXAMPLE:{T}", ok_host),
        "absolute other punycode": ("https://{IDN}:{T}", ok_host),
        "absolute other unicode": ("https://{IDN_U}:{T}", ok_host),
        "absolute ip": ("https://127.0.0.1:{T}", ok_host),
        "absolute ipv6": ("https://[::1]:{T}", ok_host),
        "absolute mapped ipv6": ("https://[::ffff:127.0.0.1]:{T}", ok_host),
        "absolute decimal ip": ("https://2130706433:{T}", ok_host),
        "absolute userinfo": ("https://u:p@{A}:{T}", ok_host),
        "absolute user only": ("https://u@{A}:{T}", ok_host),
        "absolute userinfo naming other": ("https://{A}:{T}@{OTHER}:{T}", ok_host),
        "host other": ("", f"Host: {OTHER}:{T}\r\n"),
        "host other port": ("", f"Host: {A}:{P}\r\n"),
        "host without port": ("", f"Host: {A}\r\n"),
        "host other, absolute allowed": ("https://{A}:{T}", f"Host: {OTHER}:{T}\r\n"),
        "two hosts": ("", f"Host: {A}:{T}\r\nHost: {OTHER}:{T}\r\n"),
        "host list": ("", f"Host: {A}:{T}, {OTHER}:{T}\r\n"),
        "host userinfo": ("", f"Host: u@{A}:{T}\r\n"),
        "host unicode other": ("", f"Host: {IDN_U}:{T}\r\n"),
        "host ipv6 unbracketed": ("", f"Host: ::1\r\n"),
        "host empty port": ("", f"Host: {A}:\r\n"),
        "host port with leading zero": ("", f"Host: {A}:0{T}\r\n"),
        "absolute port with leading zero": ("https://{A}:0{T}", ok_host),
    }
    refused = {}
    for what, (prefix, host) in cases.items():
        t = tag()
        target = prefix.format(**globals(), T=T, P=P) + f"/x/{t}"
        raw = f"GET {target} HTTP/1.1\r\n{host}Connection: close\r\n\r\n".encode()
        status, headers, body = await run(h1, w, raw)
        assert status in (400, 403), (what, status, body)
        if status == 403:
            assert b"code: host-mismatch" in body and 'rule="host-mismatch"' in headers["x-capsem-policy"], (what, body)
            assert await run(rows, w, kind="http", rule="host-mismatch", decision="deny",
                             url=lambda u, t=t: t in (u or "")), what
        refused[what] = (t, status)
    await asyncio.sleep(0.5)
    for what, (t, _) in refused.items():
        assert not seen(w, t), (what, seen(w, t))
    # mitmproxy's own parser refuses userinfo and Unicode in a request line (400, before any hook);
    # every other spelling reached the guard and was refused there, audited
    assert {k for k, (_, s) in refused.items() if s == 400} <= {
        "absolute userinfo", "absolute user only", "absolute userinfo naming other", "absolute other unicode"}
    # and with everything else agreeing, a TLS SNI naming another host
    t = tag()
    status, headers, _ = await run(h1, w, f"GET /x/{t} HTTP/1.1\r\nHost: {A}:{T}\r\n\r\n".encode(), sni=OTHER)
    assert status == 403 and 'rule="sni-mismatch"' in headers["x-capsem-policy"]
    await asyncio.sleep(0.3)
    assert not seen(w, t)
    assert_fronting_impossible(w)


async def test_agreeing_spellings_go_upstream_in_origin_form_with_the_judged_host(world):
    w = world
    T, P = w.T, w.P
    cases = [
        (f"https://{A}:{T}", f"Host: {A}:{T}\r\n"),
        (f"https://ALLOWED.Test.Example.:{T}", f"Host: allowed.test.example.:{T}\r\n"),
        (f"https://{A}:{T}", ""),  # absolute form, no Host at all
        ("", f"Host: Allowed.TEST.example.:{T}\r\n"),
        ("", ""),  # origin form and no Host: the judged one is added
    ]
    for prefix, host in cases:
        t = tag()
        raw = f"GET {prefix}/x/{t} HTTP/1.1\r\n{host}Connection: close\r\n\r\n".encode()
        status, _, body = await run(h1, w, raw)
        assert status == 200, (prefix, host, body)
        canonical_ok(w, t)
    # a POST with a body keeps its body
    t = tag()
    status, _, body = await run(h1, w, f"POST https://{A}:{T}/x/{t} HTTP/1.1\r\nHost: {A}:{T}\r\n"
                                       f"Content-Length: 5\r\nConnection: close\r\n\r\nhello".encode())
    assert status == 200
    canonical_ok(w, t, method="POST")
    # plain HTTP: the same, and no credential on a plaintext wire
    t = tag()
    status, _, _ = await run(h1, w, f"GET http://{A}:{P}/x/{t} HTTP/1.1\r\nHost: {A}:{P}\r\n\r\n".encode(), tls=False)
    assert status == 200
    canonical_ok(w, t, port=P, credential=False)
    t = tag()
    status, _, _ = await run(h1, w, f"GET http://{OTHER}:{P}/x/{t} HTTP/1.1\r\nHost: {A}:{P}\r\n\r\n".encode(),
                             tls=False)
    assert status == 403
    # IDNA: the Unicode spelling of the judged (punycode) name agrees; upstream gets punycode
    for prefix, host in ((f"https://XN--BCHER-KVA.test.example:{T}", f"Host: {IDN}:{T}\r\n"),
                         ("", f"Host: {IDN_U}:{T}\r\n"), ("", f"Host: BÜCHER.test.example.:{T}\r\n")):
        t = tag()
        raw = f"GET {prefix}/x/{t} HTTP/1.1\r\n{host}Connection: close\r\n\r\n".encode()
        status, _, body = await run(h1, w, raw, host=IDN_U)
        assert status == 200, (prefix, host, body)
        canonical_ok(w, t, host=IDN)
    # the destination spelled with a trailing dot and in capitals (SNI too) is the same host
    t = tag()
    status, _, _ = await run(h1, w, f"GET /x/{t} HTTP/1.1\r\nHost: {A}.:{T}\r\n\r\n".encode(), host="ALLOWED.test.example.")
    assert status == 200
    canonical_ok(w, t)
    assert_fronting_impossible(w)


async def test_keep_alive_requests_are_each_checked(world):
    """A first, agreeing request, then one naming another host on the same connection."""
    w = world
    t1, t2 = tag(), tag()

    def two():
        s, reply = w.g.open(A, w.T)
        s = w.g.tls(s, A)
        s.sendall(f"GET /x/{t1} HTTP/1.1\r\nHost: {A}:{w.T}\r\n\r\n".encode())
        first = read_http_response(s)
        s.sendall(f"GET https://{OTHER}:{w.T}/x/{t2} HTTP/1.1\r\nHost: {A}:{w.T}\r\n\r\n".encode())
        second = read_http_response(s)
        s.close()
        return first, second
    first, second = await run(two)
    assert first[0] == 200 and second[0] == 403
    canonical_ok(w, t1)
    await asyncio.sleep(0.3)
    assert not seen(w, t2)


async def test_connect_inside_the_tunnel_is_refused(world):
    """A CONNECT request inside the judged connection: mitmproxy refuses it (400) in this mode; a
    target naming another host is judged and audited as a host mismatch even when Host agrees."""
    w = world
    for target in (f"{OTHER}:443", f"{OTHER}:{w.T}", f"{A}:{w.P}", f"{A}:{w.T}"):
        n = len(w.edge.records)
        status, _, body = await run(h1, w, f"CONNECT {target} HTTP/1.1\r\nHost: {A}:{w.T}\r\n\r\n".encode())
        assert status in (400, 403), (target, status, body)
        await asyncio.sleep(0.3)
        assert len(w.edge.records) == n
    # three refusals of one key (kernel, method, url, code): itemised, or one row and a count
    # (the audit contract aggregates repeats), the first naming its target
    def connect_refusals():
        got = [r for r in rows(w, kind="http", method="CONNECT", rule="host-mismatch", decision="deny")
               if code_of(r) == "host-mismatch"]
        return got if sum(r.get("count") or 1 for r in got) >= 3 else []
    got = await run(wait_for, connect_refusals, 15)
    assert got and f"{OTHER}:443" in got[0]["reason"], got


async def test_any_spelling_through_the_real_proxy(world):
    """Property, with the upstream as the oracle: whatever authority the guest writes into the
    request line and/or Host, the edge receives either nothing or origin form with the judged
    Host, and the request went through exactly when the spelling names the judged host and port."""
    w = world
    T = w.T
    bases = {A: True, OTHER: False, ALSO: False, IDN: False, "127.0.0.1": False, "[::1]": False,
             "allowed.test.example.evil": False, "evil-allowed.test.example": False, IDN_U: False,
             "\u0430llowed.test.example": False}  # (a Cyrillic a)

    def spell(base: str, flips: list[bool], dot: bool) -> str:
        text = "".join(c.upper() if f else c for c, f in zip(base, flips + [False] * len(base)))
        return text + ("." if dot and not base.startswith(("[", "1")) else "")

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(base=st.sampled_from(sorted(bases)), flips=st.lists(st.booleans(), max_size=30), dot=st.booleans(),
           port=st.sampled_from([None, T, w.P, 443, 80, T + 65536]),
           userinfo=st.sampled_from(["", "u@", "u:p@", f"{A}:{T}@"]),
           where=st.sampled_from(["absolute", "host", "both"]))
    def prop(base, flips, dot, port, userinfo, where):
        auth = userinfo + spell(base, flips, dot) + ("" if port is None else f":{port}")
        t = tag()
        target = (f"https://{auth}" if where != "host" else "") + f"/x/{t}"
        host = auth if where != "absolute" else f"{A}:{T}"
        raw = f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        status, _, body = h1(w, raw)
        expect_ok = bases[base] and port == T and not userinfo
        if expect_ok:
            assert status == 200, (auth, where, body)
            canonical_ok(w, t)
        else:
            assert status in (400, 403), (auth, where, status, body)
            time.sleep(0.05)
            assert not seen(w, t), (auth, where)
    await run(prop)
    await asyncio.sleep(0.5)
    assert_fronting_impossible(w)


# --- HTTP/2: :authority, Host, :path ------------------------------------------------------------------

def _h2_req(t: str, authority: str | None, host: str | None = None, path: str | None = None,
            method: str = "GET", extra: list | None = None) -> dict:
    hdrs = [[":method", method], [":scheme", "https"], [":path", path or f"/x/{t}"]]
    if authority is not None:
        hdrs.append([":authority", authority])
    if host is not None:
        hdrs.append(["host", host])
    return {"headers": hdrs + (extra or [])}


async def test_http2_authority_and_host_must_both_name_the_destination(world):
    """(HTTP/2 to the guest means HTTP/2 upstream: mitmproxy, connecting upstream first, mirrors the
    server's ALPN to the client, so the HTTP/2 -> HTTP/1 conversion is not reachable here.)"""
    w = world
    for port, upstream in ((w.T, "h2"),):
        ok = f"{A}:{port}"
        bad = [
            (f"{OTHER}:{port}", None, None),
            (ok, f"{OTHER}:{port}", None),          # :authority agrees, Host names another host
            (f"{OTHER}:{port}", ok, None),
            (f"{A}:{w.P}", None, None),
            (A, None, None),                         # no port: 443
            (None, f"{OTHER}:{port}", None),
            (ok, f"{A}:{w.P}", None),
            (ok, None, f"https://{OTHER}:{port}/x/"),  # :path in absolute form
            (ok, None, f"{OTHER}:{port}/x/"),
            (f"u@{A}:{port}", None, None),
            (f"{IDN}:{port}", None, None),
        ]
        tags = [tag() for _ in bad]
        reqs = [_h2_req(t, a, h, (p + t) if p else None) for t, (a, h, p) in zip(tags, bad)]
        res = await run(h2, w, reqs, port=port)
        await asyncio.sleep(0.5)
        for t, case, r in zip(tags, bad, res):
            assert not seen(w, t), (upstream, case, r, seen(w, t))
        for t, case, r in zip(tags, bad, res):
            # 403 from the guard; or the h2 library's own refusal (GOAWAY) of :authority != Host
            # and of userinfo, before any hook
            assert r.get("status") == 403 or "closed" in r and "status" not in r, (upstream, case, r)
            if r.get("status") == 403:
                assert 'rule="host-mismatch"' in r["policy"] and "code: host-mismatch" in r["body"], (case, r)
        # agreeing spellings: upstream gets the judged authority, once, and origin form
        good = [(f"ALLOWED.test.example.:{port}", None), (None, f"{A}.:{port}"), (ok, ok)]
        tags = [tag() for _ in good]
        res = await run(h2, w, [_h2_req(t, a, h) for t, (a, h) in zip(tags, good)], port=port)
        for t, case, r in zip(tags, good, res):
            assert r.get("status") == 200, (upstream, case, r)
            rec = wait_for(lambda: seen(w, t), 10)[0]
            assert rec["proto"] == upstream, rec
            if upstream == "h2":
                assert header_values(rec, ":authority") == [ok] and header_values(rec, "host") == [], rec
                assert header_values(rec, ":path") == [f"/x/{t}"]
            else:
                assert rec["line"] == f"GET /x/{t} HTTP/1.1" and header_values(rec, "host") == [ok], rec
            assert header_values(rec, "authorization") == [f"Bearer {SECRET}"], rec
    assert await run(rows, w, kind="http", rule="host-mismatch", url=lambda u: "/x/" in (u or ""))
    assert_fronting_impossible(w)


# --- WebSocket judgement (item 5) -----------------------------------------------------------------------

WS_HEADERS = "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"


async def test_any_websocket_token_in_upgrade_is_judged_as_wss(world):
    """nows.test.example allows https but denies wss: every way of asking for a WebSocket is
    refused before the upstream sees it."""
    w = world
    h = f"nows.test.example:{w.T}"
    for upgrade in ("Upgrade: websocket\r\n", "Upgrade: websocket, foo\r\n", "Upgrade: foo, WebSocket\r\n",
                    "Upgrade: foo\r\nUpgrade: websocket\r\n", "Upgrade:   WEBSOCKET/13  \r\n",
                    "Upgrade: h2c,websocket\r\n", "Upgrade: x\r\nUPGRADE:\twebsocket\r\n"):
        t = tag()
        raw = f"GET /ws/{t} HTTP/1.1\r\nHost: {h}\r\n{upgrade}{WS_HEADERS}\r\n".encode()
        status, headers, body = await run(h1, w, raw, host="nows.test.example")
        assert status == 403 and 'rule="no-websockets"' in headers.get("x-capsem-policy", ""), (upgrade, status, body)
        await asyncio.sleep(0.2)
        assert not seen(w, t), upgrade
        assert await run(rows, w, kind="websocket", rule="no-websockets", url=lambda u, t=t: t in (u or ""))
    # where wss is allowed, the token list works (judged and allowed as a WebSocket)
    t = tag()

    def ws_ok():
        s, _ = w.g.open("ws.test.example", w.T)
        s = w.g.tls(s, "ws.test.example")
        s.sendall(f"GET /ws/{t} HTTP/1.1\r\nHost: ws.test.example:{w.T}\r\nUpgrade: foo, websocket\r\n{WS_HEADERS}\r\n".encode())
        status, _, _ = read_http_response(s)
        s.sendall(bytes([0x81, 0x82, 0, 0, 0, 0]) + b"hi")
        echo = s.recv(100)
        s.close()
        return status, echo
    status, echo = await run(ws_ok)
    assert status == 101 and echo == b"\x81\x04echo"
    assert await run(rows, w, kind="websocket", rule="ws", url=f"wss://ws.test.example:{w.T}/ws/{t}")
    # RFC 8441 WebSocket over HTTP/2 (:protocol): mitmproxy 11's HTTP/2 parser refuses the pseudo
    # header (GOAWAY) before any hook; whatever a later version does, it must never start unjudged
    t = tag()
    req = {"headers": [[":method", "CONNECT"], [":protocol", "websocket"], [":scheme", "https"],
                       [":path", f"/ws/{t}"], [":authority", f"nows.test.example:{w.T}"],
                       ["sec-websocket-version", "13"]], "end_stream": False}
    res = await run(h2, w, [req], host="nows.test.example")
    assert res[0].get("status") in (None, 403), res
    await asyncio.sleep(0.5)
    assert not seen(w, t)


async def test_a_101_to_a_request_not_judged_as_websocket_is_killed(world):
    """An upstream that switches protocols anyway (to a request judged as https, or to something
    other than the WebSocket that was judged): the guest never gets the 101, no byte crosses."""
    w = world

    def attempt(host: str, path: str, headers: str) -> tuple:
        s, _ = w.g.open(host, w.T)
        s = w.g.tls(s, host)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{w.T}\r\n{headers}\r\n".encode())
        status, _, _ = read_http_response(s)
        try:
            s.sendall(bytes([0x81, 0x82, 0, 0, 0, 0]) + b"hi")
            s.settimeout(2)
            extra = s.recv(100)
        except OSError:
            extra = b""
        s.close()
        return status, extra
    cases = [
        ("nows.test.example", "/force101", WS_HEADERS),      # a WebSocket handshake without Upgrade
        ("nows.test.example", "/force101", ""),              # a plain GET
        ("ws.test.example", "/force101-raw", "Upgrade: websocket\r\n" + WS_HEADERS),  # judged wss, switched to x-raw
    ]
    for host, path, headers in cases:
        t = tag()
        status, extra = await run(attempt, host, f"/x/{t}{path}", headers)
        assert status != 101 and extra == b"", (host, path, status, extra)
        assert wait_for(lambda: seen(w, t), 10), "the request itself was allowed and reached the edge"
        await asyncio.sleep(0.3)
        conns = {r["conn"] for r in seen(w, t)}
        assert not [r for r in w.edge.records if r.get("event") == "after-101" and r["conn"] in conns]
        got = await run(rows, w, rule="upgrade-mismatch", decision="deny", url=lambda u, t=t: t in (u or ""))
        assert got and "101" in got[0]["reason"], got
