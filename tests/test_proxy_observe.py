"""Observe mode end to end on the host: the real proxy service and bridges, real servers on 127.0.0.1.

Two kernels share one world and one policy text, one with `[settings] observe = true` (k-obs), one
without (k-strict). Under observe, what the rules refuse (default-deny, rule-deny) reaches the
upstream and is audited `would-deny` with the code it would have had; every built-in protection
(DoH, protected addresses, Host/SNI agreement, ambiguous paths) still refuses; no credential goes
into a request the policy would refuse. The strict kernel refuses all of it as before."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import ssl
from contextlib import asynccontextmanager

import pytest
import tornado.httpserver
import tornado.netutil
import tornado.web
import tornado.websocket

from capsem_vm.policy import parse_policy
from capsem_vm.proxy import dns, read_events

from proxy_world import ProxyWorld, upstream_tls

pytestmark = pytest.mark.asyncio(loop_scope="module")

SECRET = "obs-s3cr3t-" + os.urandom(8).hex()
SEEN: list[dict] = []


class Echo(tornado.web.RequestHandler):
    SUPPORTED_METHODS = ("GET", "POST", "PUT", "DELETE")

    def _do(self):
        info = {"method": self.request.method, "path": self.request.uri, "headers": dict(self.request.headers)}
        SEEN.append(info)
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps(info))

    get = post = put = delete = _do


class WsEcho(tornado.websocket.WebSocketHandler):
    def open(self, *args):
        SEEN.append({"method": "WEBSOCKET", "path": self.request.uri, "headers": dict(self.request.headers)})

    def on_message(self, message):
        self.write_message("echo:" + message)


def start_server(ssl_ctx=None):
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    server = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/ws.*", WsEcho), (r"/.*", Echo)]),
                                           ssl_options=ssl_ctx)
    server.add_sockets(sockets)
    return server, sockets[0].getsockname()[1]


def policy_text(http: int, https: int, lan: int, observe: bool) -> str:
    return (("[settings]\nobserve = true\n\n" if observe else "") + f"""
[[rule]]
name = "admin"
host = "api.test.example"
paths = ["/admin*"]
action = "deny"
reason = "admin is off limits"

[[rule]]
name = "api"
host = "api.test.example"
port = [{http}, {https}]
methods = ["GET"]
paths = ["/echo*", "/ws/ok*"]
addresses = ["127.0.0.1"]
action = "allow"

[[rule]]
name = "blocked"
host = "blocked.test.example"
action = "deny"
reason = "this host is blocked"

[[rule]]
name = "no-loopback"
host = "127.0.0.0/8"
port = {lan}
action = "deny"
reason = "a deny rule whose host is the protected network itself"

[[rule]]
name = "secret-api"
host = "secret.test.example"
port = {https}
methods = ["GET"]
paths = ["/echo*"]
addresses = ["127.0.0.1"]
action = "allow"

[[credential]]
name = "svc"
hosts = ["secret.test.example"]
env = "CAPSEM_OBSERVE_SECRET"
header = "Authorization"
format = "Bearer {{value}}"
guest_env = "SVC_TOKEN"
""")


@asynccontextmanager
async def build_world(tmp_path_factory):
    """This module's `world` (conftest.py)."""
    tmp = tmp_path_factory.mktemp("observe")
    w = ProxyWorld(tmp, env={"CAPSEM_OBSERVE_SECRET": SECRET})
    tls = upstream_tls(tmp, "capsem observe test CA")
    w.http_srv, w.HTTP = start_server()
    w.https_srv, w.HTTPS = start_server(tls.server_context())
    w.lan_srv, w.LAN = start_server()
    for srv in (w.http_srv, w.https_srv, w.lan_srv):
        w.on_close(srv.stop)
    w.obs_policy = parse_policy(policy_text(w.HTTP, w.HTTPS, w.LAN, True), "observe.toml")
    w.strict_policy = parse_policy(policy_text(w.HTTP, w.HTTPS, w.LAN, False), "strict.toml")
    assert w.obs_policy.observe and not w.strict_policy.observe
    resolve = {n: "127.0.0.1" for n in ("api.test.example", "secret.test.example", "blocked.test.example",
                                         "unknown.test.example")}
    resolve["internal.test.example"] = "10.0.0.5"  # refused before any connection: never contacted
    # the kernelspec trait (capsem kernel install --observe): a file without the setting, observe set
    # on the Policy and carried to the service by register()
    w.trait_policy = dataclasses.replace(w.strict_policy, observe=True)
    await w.start({"k-obs": w.obs_policy, "k-strict": w.strict_policy, "k-trait": w.trait_policy},
                  upstream_ca=tls.ca_file,
                  resolve=resolve, workers=1)
    w.obs, w.strict = w.guests["k-obs"], w.guests["k-strict"]
    yield w
    await w.close()


def run(fn, *a, **kw):
    return asyncio.to_thread(fn, *a, **kw)


async def rows(w, **match):
    return await run(w.rows, **match)


def seen(method: str, path: str) -> list[dict]:
    return [s for s in SEEN if s["method"] == method and s["path"] == path]


# --- what the rules refuse is reached and recorded would-deny ------------------------------------

async def test_dns_of_names_the_rules_refuse_is_answered_and_recorded(world):
    w = world
    for name, code in (("unknown.test.example", "default-deny"), ("blocked.test.example", "rule-deny")):
        rcode, ips = await run(w.obs.dns, name)
        assert rcode == dns.NOERROR and ips[0].startswith("198.18."), name
        got = await rows(w, kernel="k-obs", kind="dns", url=name, decision="would-deny")
        assert got[0]["code"] == code, got
        assert (await run(w.strict.dns, name))[0] == dns.NXDOMAIN
        assert (await rows(w, kernel="k-strict", kind="dns", url=name))[0]["decision"] == "deny"


async def test_requests_no_rule_allows_reach_the_upstream_and_are_recorded(world):
    w = world
    for method, path in (("POST", "/echo/post"), ("GET", "/other"), ("DELETE", "/echo/x")):
        SEEN.clear()
        r = await run(w.obs.http, method, "api.test.example", w.HTTPS, path, tls=True)
        assert r.status == 200 and seen(method, path), (method, path, r)
        got = await rows(w, kernel="k-obs", kind="http", method=method,
                         url=f"https://api.test.example:{w.HTTPS}{path}")
        assert got[0]["decision"] == "would-deny" and got[0]["code"] == "default-deny", got
        assert got[0]["rule"] == "default" and got[0]["status"] == 200
        SEEN.clear()
        r = await run(w.strict.http, method, "api.test.example", w.HTTPS, path, tls=True)
        assert r.status == 403 and 'rule="default"' in r.policy and not SEEN
    # the connection itself was allowed by rule api: an ordinary allow row
    assert await rows(w, kernel="k-obs", kind="connect", host="api.test.example", decision="allow")


async def test_a_path_a_deny_rule_names_is_reached_and_recorded(world):
    w = world
    SEEN.clear()
    r = await run(w.obs.http, "GET", "api.test.example", w.HTTP, "/admin/users")
    assert r.status == 200 and seen("GET", "/admin/users")
    got = await rows(w, kernel="k-obs", kind="http", rule="admin", decision="would-deny")
    assert got[0]["code"] == "rule-deny" and "admin is off limits" in got[0]["reason"]
    SEEN.clear()
    r = await run(w.strict.http, "GET", "api.test.example", w.HTTP, "/admin/users")
    assert r.status == 403 and 'rule="admin"' in r.policy and not SEEN


async def test_a_websocket_no_rule_allows_is_reached_and_recorded(world):
    w = world
    assert await run(w.obs.websocket, "api.test.example", w.HTTPS, "/ws/ok") == "echo:hello"
    assert await run(w.obs.websocket, "api.test.example", w.HTTPS, "/ws/other") == "echo:hello"
    got = await rows(w, kernel="k-obs", kind="websocket", url=f"wss://api.test.example:{w.HTTPS}/ws/other")
    assert got[0]["decision"] == "would-deny" and got[0]["code"] == "default-deny" and got[0]["status"] == 101
    assert (await rows(w, kernel="k-obs", kind="websocket", url=f"wss://api.test.example:{w.HTTPS}/ws/ok"))[0][
        "decision"] == "allow"
    r = await run(w.strict.websocket, "api.test.example", w.HTTPS, "/ws/other")
    assert r.status == 403 and 'rule="default"' in r.policy


# --- built-in protections stay enforced ----------------------------------------------------------

async def test_doh_is_still_refused(world):
    w = world
    # a known DoH host: refused by DNS and by the bridge
    assert (await run(w.obs.dns, "dns.google"))[0] == dns.NXDOMAIN
    assert (await rows(w, kernel="k-obs", kind="dns", url="dns.google"))[0]["code"] == "doh"
    r = await run(w.obs.http, "GET", "dns.google", 443, "/resolve", tls=True)
    assert r.reply["t"] == "refused" and r.reply["code"] == "doh"
    # the DoH path on any host, over a connection that is otherwise fine
    SEEN.clear()
    for path in ("/dns-query", "/dns-query/x", "/DNS-QUERY"):
        r = await run(w.obs.http, "GET", "api.test.example", w.HTTPS, path, tls=True)
        assert r.status == 403 and 'rule="doh-path"' in r.policy, path
    assert not SEEN
    assert await rows(w, kernel="k-obs", kind="http", code="doh", decision="deny")


async def test_protected_addresses_are_still_refused(world):
    w = world
    SEEN.clear()
    # names no rule allows (or a deny rule names) that resolve to loopback or a private address:
    # past the bridge as would-deny, refused by the proxy before any connection
    for host in ("unknown.test.example", "blocked.test.example", "internal.test.example"):
        r = await run(w.obs.http, "GET", host, w.HTTP, "/echo")
        assert r.reply["t"] == "refused", host
        got = await rows(w, kernel="k-obs", kind="connect", host=host, code="address")
        assert got[0]["decision"] == "deny" and "observe mode never reaches" in got[0]["reason"], got
    assert not SEEN
    # IP literals of protected classes: refused at the bridge
    for host in ("127.0.0.1", "10.0.0.5", "169.254.169.254", "::1", "0x7f.1"):
        s, reply = await run(w.obs.open, host, w.HTTP)
        s.close()
        assert reply["t"] == "refused" and reply["code"] == "address", (host, reply)
    # a would-deny from a deny rule whose host is that very network does not "name" the address
    r = await run(w.obs.http, "GET", "127.0.0.1", w.LAN, "/echo")
    assert r.reply["t"] == "refused" and r.reply["code"] == "address", r
    r = await run(w.obs.http, "GET", "unknown.test.example", w.LAN, "/echo")
    assert r.reply["t"] == "refused"
    assert await rows(w, kernel="k-obs", kind="connect", host="unknown.test.example", port=w.LAN, code="address")


async def test_host_and_sni_disagreement_is_still_refused(world):
    w = world
    SEEN.clear()
    r = await run(w.obs.http, "GET", "api.test.example", w.HTTP, "/other", headers={"Host": "evil.example.org"})
    assert r.status == 403 and 'rule="host-mismatch"' in r.policy
    r = await run(w.obs.http, "GET", "api.test.example", w.HTTPS, "/other", tls=True, sni="other.test.example",
                  headers={"Host": f"api.test.example:{w.HTTPS}"})
    assert r.status == 403 and 'rule="sni-mismatch"' in r.policy
    assert not SEEN
    assert await rows(w, kernel="k-obs", kind="http", code="host-mismatch", decision="deny")
    assert await rows(w, kernel="k-obs", kind="http", code="sni-mismatch", decision="deny")


@pytest.mark.parametrize("path", ["/admin%2fx", "/echo/..;/admin", "/echo%2f..%2fadmin", "/admin;x=1",
                                  "/echo\\..\\admin"])
async def test_ambiguous_paths_are_still_refused(world, path):
    w = world
    SEEN.clear()
    r = await run(w.obs.http, "GET", "api.test.example", w.HTTP, path)
    assert r.status == 403 and "ambiguous-path" in r.body.decode(), (path, r)
    assert not SEEN


# --- credentials ---------------------------------------------------------------------------------

async def test_no_credential_goes_into_a_request_the_policy_would_refuse(world):
    w = world
    placeholder = w.obs_policy.guest_env()["SVC_TOKEN"]
    # allowed: the credential is injected (it works in this world)
    SEEN.clear()
    r = await run(w.obs.http, "GET", "secret.test.example", w.HTTPS, "/echo", tls=True,
                  headers={"Authorization": f"Bearer {placeholder}"})
    assert r.status == 200 and SEEN[-1]["headers"]["Authorization"] == f"Bearer {SECRET}"
    # would-deny (method, path): reached, without the credential
    for method, path in (("POST", "/echo"), ("GET", "/private")):
        SEEN.clear()
        r = await run(w.obs.http, method, "secret.test.example", w.HTTPS, path, tls=True,
                      headers={"Authorization": f"Bearer {placeholder}"})
        assert r.status == 200 and len(SEEN) == 1, (method, path, r)
        assert SEEN[-1]["headers"]["Authorization"] == f"Bearer {placeholder}"
        assert SECRET not in json.dumps(SEEN[-1])
        got = await rows(w, kernel="k-obs", kind="http", method=method,
                         url=f"https://secret.test.example:{w.HTTPS}{path}")
        assert got[0]["decision"] == "would-deny" and "credential injected" not in got[0]["reason"]


async def test_a_policy_without_observe_refuses_everything_as_before(world):
    w = world
    r = await run(w.strict.http, "GET", "unknown.test.example", w.HTTP, "/echo")
    assert r.reply["t"] == "refused" and r.reply["code"] == "default-deny"
    r = await run(w.strict.http, "GET", "blocked.test.example", w.HTTP, "/echo")
    assert r.reply["t"] == "refused" and r.reply["code"] == "rule-deny"
    w.audit.flush()
    assert not [r for r in read_events(w.audit_db, limit=100000)
                if r["kernel"] == "k-strict" and r["decision"] == "would-deny"]


async def test_observe_set_by_the_kernel_config_reaches_the_proxy_service(world):
    w = world
    assert "observe" not in w.trait_policy.text
    g = w.guests["k-trait"]
    assert (await run(g.dns, "unknown.test.example"))[0] == dns.NOERROR  # the bridge observes
    SEEN.clear()
    r = await run(g.http, "POST", "api.test.example", w.HTTPS, "/echo/trait", tls=True)  # the service observes
    assert r.status == 200 and seen("POST", "/echo/trait")
    got = await rows(w, kernel="k-trait", kind="http", url=f"https://api.test.example:{w.HTTPS}/echo/trait")
    assert got[0]["decision"] == "would-deny" and got[0]["code"] == "default-deny"


async def test_suggest_from_what_observe_mode_recorded_allows_exactly_that(world):
    """The point of observe mode: its would-deny rows become narrow rules (method and path, which
    connection-level refusals never show), and the strict policy plus them lets those requests through
    and nothing beside them."""
    from capsem_vm.policy.suggest import render, suggest
    from capsem_vm.policy.suggest_io import read_refusals
    w = world
    path = "/echo/suggest-me"
    r = await run(w.obs.http, "POST", "api.test.example", w.HTTPS, path, tls=True)
    assert r.status == 200
    await rows(w, kernel="k-obs", kind="http", url=f"https://api.test.example:{w.HTTPS}{path}")
    got = [r for r in read_refusals(w.audit_db, kernel="k-obs") if r["url"].endswith(path)]
    assert got and got[0]["decision"] == "would-deny"
    base = policy_text(w.HTTP, w.HTTPS, w.LAN, False)
    text = render(suggest(got, w.strict_policy, base_text=base))
    combined = parse_policy(base + "\n" + text)
    url = f"https://api.test.example:{w.HTTPS}"
    assert combined.decide("POST", url + path).allowed, text
    assert not combined.decide("POST", url + "/echo/other").allowed
    assert not combined.decide("PUT", url + path).allowed
    assert not combined.decide("POST", f"https://other.test.example:{w.HTTPS}{path}").allowed
