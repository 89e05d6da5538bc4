"""`capsem policy suggest` on real audit rows (issue 22): the guest-protocol client -> EgressBridge ->
the real mitmproxy service -> a real HTTPS server on 127.0.0.1; requests get refused, the command
reads the resulting audit database, applies its suggestions to a policy file, and the same requests
pass under the new policy while a neighbouring host and path stay denied.

The stand-in for the internet lives on loopback, which the proxy refuses unless a rule names the
address (`addresses`): suggest never writes that (a real public host needs none), so the kernel run
after applying gets the applied file with `addresses = ["127.0.0.1"]` added to each suggested rule,
and nothing else changed. The applied file itself is checked as written, by the policy engine.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

import pytest
import tornado.httpserver
import tornado.netutil
import tornado.web

from capsem_vm.policy import parse_policy
from capsem_vm.policy.cli import main as policy_main
from capsem_vm.policy.suggest import REASON, user_rules
from capsem_vm.proxy import EgressBridge, read_events
from capsem_vm.proxy.service import find_proxy_python

from proxy_helpers import Guest
from proxy_world import ProxyWorld, upstream_tls

pytestmark = pytest.mark.asyncio(loop_scope="module")

API, FILES, INTERNAL, OTHER = "api.test.example", "files.test.example", "internal.test.example", "other.test.example"
SEEN: list[tuple[str, str]] = []


class Handler(tornado.web.RequestHandler):
    def get(self):
        SEEN.append((self.request.host, self.request.uri))
        self.write("ok")

    def post(self):
        SEEN.append((self.request.host, self.request.uri))
        self.write("ok")


def base_policy(port: int) -> str:
    return f"""version = 1

# files: only /public/* so far
[[rule]]
name = "files-public"
host = "{FILES}"
port = {port}
paths = ["/public/*"]
addresses = ["127.0.0.1"]
action = "allow"

# a name allowed without naming its (loopback) address: the proxy refuses it ("address")
[[rule]]
name = "internal"
host = "{INTERNAL}"
port = {port}
action = "allow"
"""


@asynccontextmanager
async def build_world(tmp_path_factory):
    """This module's `world` (conftest.py)."""
    try:
        find_proxy_python()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"proxy venv missing: {exc}")
    tmp = tmp_path_factory.mktemp("suggest")
    w = ProxyWorld(tmp, env={})
    tls = upstream_tls(tmp, "capsem suggest test upstream CA")
    socks = tornado.netutil.bind_sockets(0, "127.0.0.1")
    srv = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/.*", Handler)]),
                                        ssl_options=tls.server_context())
    srv.add_sockets(socks)
    w.on_close(srv.stop)
    w.port = socks[0].getsockname()[1]
    w.policy_file = tmp / "policy.toml"
    w.policy_file.write_text(base_policy(w.port))
    await w.start({"k-before": parse_policy(w.policy_file.read_text(), str(w.policy_file))}, upstream_ca=tls.ca_file,
                  resolve={n: "127.0.0.1" for n in (API, FILES, INTERNAL, OTHER)}, workers=1)
    yield w
    await w.close()


async def add_kernel(w: ProxyWorld, kid: str, policy) -> Guest:
    """One more kernel on the running service (as ProxyWorld.start does for its first ones)."""
    ep = await w.service.register(kid, policy)
    bridge = EgressBridge(kid, policy, ep, audit=w.audit)
    egress, dns = str(w.tmp / f"{kid}.vsock_5002"), str(w.tmp / f"{kid}.vsock_5003")
    await bridge.start(egress, dns)
    w.bridges[kid] = bridge
    return Guest(egress, dns, w.ca_file)


def run(fn, *a, **kw):
    return asyncio.to_thread(fn, *a, **kw)


def workload(g: Guest, port: int) -> dict:
    """What the notebook does: a name lookup, an API call, a download and an upload."""
    return {
        "dns": g.dns(API),
        "api": g.http("GET", API, port, "/v1/models", tls=True),
        "download": g.http("GET", FILES, port, "/data/a.csv", tls=True),
        "upload": g.http("POST", FILES, port, "/data/upload", tls=True, body=b"x"),
    }


async def test_suggest_from_real_refusals_then_the_same_requests_pass_and_neighbours_stay_denied(world, capsys):
    w = world
    g = w.guests["k-before"]
    before = await run(workload, g, w.port)
    assert before["dns"][0] == 3                                   # NXDOMAIN
    assert before["api"].reply.get("t") == "refused" and before["api"].reply.get("code") == "default-deny"
    assert before["download"].status == 403 and before["upload"].status == 403
    doh = await run(g.http, "GET", FILES, w.port, "/dns-query", tls=True)
    assert doh.status == 403
    internal = await run(g.http, "GET", INTERNAL, w.port, "/", tls=True)
    assert internal.status != 200
    assert not [s for s in SEEN if s[1].startswith(("/v1", "/data", "/dns-query"))]

    assert await w.service.flush_audit() and await asyncio.to_thread(w.audit.flush)
    codes = {r["code"] for r in read_events(w.audit_db, kernel="k-before")}
    assert {"default-deny", "doh", "address"} <= codes, codes

    args = ["policy", "suggest", "--db", str(w.audit_db), "--kernel", "k-before"]
    assert policy_main(args + ["--policy", str(w.policy_file)]) == 0
    shown = capsys.readouterr().out
    assert "[doh]" in shown and "[address]" in shown and "SSRF protection" in shown
    old_text = w.policy_file.read_text()
    assert policy_main(args + ["--apply", str(w.policy_file), "--yes"]) == 0
    out, err = capsys.readouterr()
    assert "+[[rule]]" in err and parse_policy(out)                # the diff on stderr; stdout stays TOML
    applied_text = w.policy_file.read_text()
    assert applied_text.startswith(old_text)
    applied = parse_policy(applied_text, str(w.policy_file))
    new = [r for r in user_rules(applied) if r.reason == REASON]
    # exactly what was seen: the API host from a refused connection (host, scheme, port only), the
    # file host from the requests (their methods, the /data/ prefix); nothing for DoH or the address
    assert sorted((r.host.text, tuple(sorted(r.schemes)), tuple(r.ports), r.methods and tuple(sorted(r.methods)),
                   r.paths) for r in new) == [
        (API, ("https",), (w.port,), None, None),
        (FILES, ("https",), (w.port,), ("GET", "POST"), ("/data/*",))]

    # the file as written: the same requests are allowed, the neighbours are not
    assert applied.decide_connect(API).allowed and applied.decide_connect(API, w.port).allowed
    assert applied.decide("GET", f"https://{FILES}:{w.port}/data/a.csv").allowed
    assert not applied.decide("GET", f"https://{FILES}:{w.port}/secret/x").allowed
    assert not applied.decide_connect(OTHER, w.port).allowed
    assert not applied.decide("GET", f"https://{FILES}:{w.port}/dns-query").allowed

    # and through the real proxy, on a kernel started with it (loopback named: see the docstring)
    stand_in = applied_text.replace(f'reason = "{REASON}"', f'addresses = ["127.0.0.1"]\nreason = "{REASON}"')
    g2 = await add_kernel(w, "k-after", parse_policy(stand_in, "applied + loopback"))
    after = await run(workload, g2, w.port)
    assert after["dns"][0] == 0 and after["dns"][1]                # answered
    assert (after["api"].status, after["download"].status, after["upload"].status) == (200, 200, 200)
    assert (API, "/v1/models") in [(h.split(":")[0], u) for h, u in SEEN]
    neighbour_path = await run(g2.http, "GET", FILES, w.port, "/secret/x", tls=True)
    assert neighbour_path.status == 403
    neighbour_host = await run(g2.http, "GET", OTHER, w.port, "/v1/models", tls=True)
    assert neighbour_host.reply.get("t") == "refused"
    assert not [s for s in SEEN if s[1] == "/secret/x" or s[0].startswith(OTHER)]

    # a second run finds nothing new to suggest for the first kernel's refusals
    assert policy_main(args + ["--policy", str(w.policy_file)]) == 0
    again = parse_policy(capsys.readouterr().out)
    assert [r for r in user_rules(again)] == []
